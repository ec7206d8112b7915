"""Dynamic convolution operators: one shared core (``dynamic``), attention heads (``heads``), one file per method."""
from .dynamic import (
    STRATEGIES, DynamicConv2dBase, aggregate_kernels, dynamic_conv2d, per_sample_conv2d, select_strategy,
    set_default_strategy, get_default_strategy,
)
from .heads import KernelAttention, ODConvAttention, RoutingAttention, TemperatureMixin
from .fmdconv import FMDConv2d
from .a2d2c import A2D2CConv2d
from .odconv import ODConv2d, DynamicConv2d, CondConv2d
from .atconv import ATConv2d
from .drconv import DynamicResidualConv2d, DRKernelAttention, PooledBatchNorm2d
from .sgdm import SGDM, RDConv2d, GuidedDynamicConv2d, StaticStripConv, StripSpatialAttention, razor_split
