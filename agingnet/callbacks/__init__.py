"""Lightning callbacks of agingnet: EMA, the fork's run log and plateau breadcrumbs, fork-layout exports, the
personal bank, miner refresh and image grids (see each module's docstring)."""

from agingnet.callbacks.ema import EMACallback
from agingnet.callbacks.fork_export import ForkExportCallback
from agingnet.callbacks.images import ImageLogger
from agingnet.callbacks.miner_refresh import MinerRefreshCallback
from agingnet.callbacks.personal_bank import PersonalBankCallback
from agingnet.callbacks.plateau import PlateauCallback
from agingnet.callbacks.resume import check_resume_compatible
from agingnet.callbacks.run_log import RunLogCallback

__all__ = ["EMACallback", "ForkExportCallback", "ImageLogger", "MinerRefreshCallback", "PersonalBankCallback",
           "PlateauCallback", "RunLogCallback", "check_resume_compatible"]
