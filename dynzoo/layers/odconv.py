"""The dynamic-convolution baselines on the shared core: ODConv, DynamicConv and CondConv.

* :class:`ODConv2d` -- omni-dimensional dynamic convolution (Li, Zhou, Yao, ICLR 2022, Eq. 2):
  ``y = (sum_i a_wi a_fi a_ci a_si W_i) * x`` with four attentions from one squeeze trunk (GAP -> 1x1 conv -> BN ->
  ReLU): spatial (kernel taps), input-channel, output-channel (filter) and kernel. Input/output attention are
  applied to the feature maps (same result, cheaper -- the authors' code does so). Head rules of the authors'
  code: no filter head for depthwise layers, no spatial head for 1x1 kernels, no kernel head for ``K = 1``;
  every logit is divided by the temperature (Eq. 2 / their ``Attention``). No bias. Key names are the authors'
  (``weight``, ``attention.{fc,bn,channel_fc,filter_fc,spatial_fc,kernel_fc}``).
* :class:`DynamicConv2d` -- dynamic convolution (Chen et al., CVPR 2020, Eq. 1-3): ``K`` kernels and biases mixed
  by ``pi = softmax(z / T)`` from ``GAP -> FC (C_in/4) -> ReLU -> FC (K)``. The hidden width
  ``int(C_in/4) + 1`` is the common open re-implementation's rule (the authors published no code).
* :class:`RoutedCondConv2d` -- conditionally parameterised convolution (Yang et al., NeurIPS 2019, Eq. 1-2):
  ``K`` experts mixed by independent sigmoid gates ``r(x) = sigmoid(FC(GAP x))``; no temperature. Named apart
  from ``timm.layers.CondConv2d`` (timm's EfficientNet CondConv, another signature).

Every layer takes ``inference_mode`` (ODConv: the attention trunk's BatchNorm folded, see
:meth:`~dynzoo.layers.heads.ODConvAttention.reparameterize`; the others have no fold of their own) and ``post_bias``
(see :class:`~dynzoo.layers.dynamic.DynamicConv2dBase`).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from timm.layers import register_notrace_module

from .dynamic import DynamicAttention, DynamicConv2dBase
from .heads import KernelAttention, ODConvAttention, RoutingAttention

__all__ = ['ODConv2d', 'DynamicConv2d', 'RoutedCondConv2d']


@register_notrace_module
class ODConv2d(DynamicConv2dBase):
    """ODConv layer with full ``nn.Conv2d`` geometry.

    Args (beyond ``nn.Conv2d``'s): ``num_kernels`` (the authors' ``kernel_num``: 1 for "ODConv (1x)", 4 for
    "(4x)"), ``reduction`` r (1/16) and ``min_channels`` (16) of the trunk ``A = max(int(C_in r), 16)``,
    ``temperature`` (all four heads; trained 30 -> 1 over 10 epochs, inference at 1), ``single_sample_bn`` the
    trunk BatchNorm on a training batch of one sample (``'running'``: its running statistics, where the authors'
    code fails; ``'error'``: raise; :class:`~dynzoo.layers.heads.PooledBatchNorm2d`).
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size,
            stride=1,
            padding=0,
            dilation=1,
            groups: int = 1,
            bias: bool = False,
            num_kernels: int = 4,
            reduction: float = 0.0625,
            min_channels: int = 16,
            temperature: float = 1.0,
            single_sample_bn: str = 'running',
            strategy: str = 'auto',
            padding_mode: str = 'zeros',
            inference_mode: bool = False,
            post_bias: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__(
            in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride,
            padding=padding, dilation=dilation, groups=groups, bias=bias, num_kernels=num_kernels,
            post_bias=post_bias, strategy=strategy, padding_mode=padding_mode, device=device, dtype=dtype)
        self.attention = ODConvAttention(
            in_channels, out_channels, self.kernel_size, groups=groups, num_kernels=num_kernels,
            reduction=reduction, min_channels=min_channels, temperature=temperature,
            single_sample_bn=single_sample_bn, inference_mode=inference_mode, device=device, dtype=dtype)

    def forward_attention(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None) -> DynamicAttention:
        return self.attention(F.adaptive_avg_pool2d(x, 1))


@register_notrace_module
class DynamicConv2d(DynamicConv2dBase):
    """DynamicConv layer (``K`` kernels + per-kernel biases, softmax attention with temperature).

    Args (beyond ``nn.Conv2d``'s): ``num_kernels`` K (paper: 4), ``ratio`` of the attention's hidden width (1/4),
    ``temperature`` (paper: 30 -> 1 linearly over the first 10 epochs; inference at 1). ``bias=True`` by default:
    the paper aggregates the biases with the same attention (Eq. 1).
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size,
            stride=1,
            padding=0,
            dilation=1,
            groups: int = 1,
            bias: bool = True,
            num_kernels: int = 4,
            ratio: float = 0.25,
            temperature: float = 1.0,
            strategy: str = 'auto',
            padding_mode: str = 'zeros',
            inference_mode: bool = False,
            post_bias: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__(
            in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride,
            padding=padding, dilation=dilation, groups=groups, bias=bias, num_kernels=num_kernels,
            post_bias=post_bias, strategy=strategy, padding_mode=padding_mode, device=device, dtype=dtype)
        self.attention = KernelAttention(in_channels, num_kernels, ratio, temperature, device=device, dtype=dtype)

    def forward_attention(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None) -> DynamicAttention:
        return DynamicAttention(self.attention(F.adaptive_avg_pool2d(x, 1)), None, None, None)


@register_notrace_module
class RoutedCondConv2d(DynamicConv2dBase):
    """CondConv layer: ``K`` experts (paper: 8 for its larger models) mixed by independent sigmoid routing weights.

    ``bias=False`` by default (a BatchNorm follows every CondConv in the paper's networks); with ``bias=True`` the
    expert biases are mixed by the same routing weights.
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size,
            stride=1,
            padding=0,
            dilation=1,
            groups: int = 1,
            bias: bool = False,
            num_kernels: int = 8,
            strategy: str = 'auto',
            padding_mode: str = 'zeros',
            inference_mode: bool = False,
            post_bias: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__(
            in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride,
            padding=padding, dilation=dilation, groups=groups, bias=bias, num_kernels=num_kernels,
            post_bias=post_bias, strategy=strategy, padding_mode=padding_mode, device=device, dtype=dtype)
        self.routing = RoutingAttention(in_channels, num_kernels, device=device, dtype=dtype)

    def forward_attention(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None) -> DynamicAttention:
        return DynamicAttention(self.routing(F.adaptive_avg_pool2d(x, 1)), None, None, None)
