"""Dynamic convolution operators: one shared core (``dynamic``), attention heads (``heads``), one file per method."""
from .dynamic import (
    STRATEGIES, DynamicConv2dBase, aggregate_kernels, dynamic_conv2d, per_sample_conv2d, select_strategy,
    set_default_strategy, get_default_strategy,
)
from .heads import KernelAttention, ODConvAttention, RoutingAttention, TemperatureMixin
from .fmdconv import FMDConv2d
