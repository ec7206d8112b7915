"""Dynamic convolution operators: one shared core (``dynamic``, executing through ``per_sample``), the folds of the
inference forms (``fusion``), attention heads (``heads``) and their temperatures (``temperature``), one file per
method."""
from .per_sample import DEPTHWISE_STRATEGIES, conv_output_size, per_sample_conv2d, per_sample_depthwise_conv2d
from .dynamic import (
    STRATEGIES, DynamicAttention, DynamicConv2dBase, aggregate_kernels, dynamic_conv2d, expert_responses,
    select_strategy, set_default_strategy, get_default_strategy,
)
from .temperature import TemperatureMixin, fmdconv_temperature, get_temperatures, linear_temperature, set_temperature
from .heads import KernelAttention, ODConvAttention, PooledBatchNorm2d, RoutingAttention
from .fmdconv import FMDConv2d
from .a2d2c import A2D2CConv2d
from .odconv import ODConv2d, DynamicConv2d, RoutedCondConv2d
from .atconv import ATConv2d
from .drconv import DynamicResidualConv2d, DRKernelAttention
from .sgdm import SGDM, RDConv2d, GuidedDynamicConv2d, StaticStripConv, StripSpatialAttention, razor_split
from .atconv_tokens import ATConvTokens, ATConvAttention, ATConvSwinBlock, swap_attention_for_atconv
