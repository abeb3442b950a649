"""Networks of agingnet, with the parameter names of the published checkpoints."""

from agingnet.nn.aging_net import AgingNet, add_age_channel, blend_codes
from agingnet.nn.blender import Blender
from agingnet.nn.dex import DEX
from agingnet.nn.irse import GradualStyleEncoder, IRSEBackbone
from agingnet.nn.stylegan2 import Generator

__all__ = ["AgingNet", "Blender", "DEX", "Generator", "GradualStyleEncoder", "IRSEBackbone", "add_age_channel",
           "blend_codes"]
