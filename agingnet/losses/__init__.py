"""Loss terms (one per file) and the registry that weights and sums them."""

from agingnet.losses.base import FrozenNets, LossContext, LossTerm
from agingnet.losses.registry import LossStack
from agingnet.losses.schedule import WeightSchedule

__all__ = ["FrozenNets", "LossContext", "LossStack", "LossTerm", "WeightSchedule"]
