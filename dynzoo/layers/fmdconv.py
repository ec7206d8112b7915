"""FMDConv: fast multi-attention dynamic convolution (Zhang et al., KBS 317, 2025).

``y = alpha_out * conv(alpha_in * x, sum_i alpha_k,i W_i, sum_i alpha_k,i b_i)`` -- the paper's Eq. 5 computed the
ODConv way (Algorithm 1): input- and output-channel sigmoid attention from ODConv's trunk (``attention``) and a
separate DynamicConv-style temperature softmax kernel attention (``attention2``, Eq. 6). ODConv's spatial and
kernel heads are removed (§3.3.1). Key names are the authors' (``attention.{fc,bn,channel_fc,filter_fc}``,
``attention2.{fc1,fc2}``), so their checkpoints load after stripping the DDP ``module.`` prefix.

Temperatures: ``kernel_temperature`` divides the kernel softmax (paper §3.3.2: annealed 40 -> 1 by 3 per epoch;
the authors' code keeps it at 34 for ever), ``gate_temperature`` divides the sigmoid logits (paper: none, i.e. 1;
the authors' code anneals it 30 -> 1). Both are buffers, saved with the weights.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from timm.layers import register_notrace_module

from .dynamic import DynamicAttention, DynamicConv2dBase
from .heads import KernelAttention, ODConvAttention

__all__ = ['FMDConv2d']


@register_notrace_module
class FMDConv2d(DynamicConv2dBase):
    """FMDConv layer with full ``nn.Conv2d`` geometry (stride, padding, dilation, groups incl. depthwise).

    Args (beyond ``nn.Conv2d``'s): ``num_kernels`` K (paper: 4), ``reduction`` of the channel/filter trunk
    (``A = max(int(C_in*reduction), min_channels)``), ``kernel_ratio`` of the kernel branch
    (``H = int(C_in*kernel_ratio) + 1``), the two temperatures, the ablation toggles of Fig. 4, and
    ``single_sample_bn``, the trunk BatchNorm on a training batch of one sample (``'running'``: its running
    statistics, where the authors' code fails; ``'error'``: raise; :class:`~dynzoo.layers.heads.PooledBatchNorm2d`).
    ``bias=True`` (a per-kernel bias ``(K, C_out)``) is required to reproduce the paper's Table 9 counts.
    ``inference_mode`` builds the channel/filter trunk with its BatchNorm folded; ``post_bias`` see the base.
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
            reduction: float = 0.0625,
            min_channels: int = 16,
            kernel_ratio: float = 0.25,
            kernel_temperature: float = 1.0,
            gate_temperature: float = 1.0,
            use_input_attn: bool = True,
            use_output_attn: bool = True,
            use_kernel_attn: bool = True,
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
        dd = {'device': device, 'dtype': dtype}
        if use_input_attn or use_output_attn:
            self.attention = ODConvAttention(
                in_channels, out_channels, self.kernel_size, groups=groups, num_kernels=num_kernels,
                reduction=reduction, min_channels=min_channels, temperature=gate_temperature,
                channel_head=use_input_attn, filter_head=use_output_attn, spatial_head=False, kernel_head=False,
                single_sample_bn=single_sample_bn, inference_mode=inference_mode, **dd)
        else:
            self.attention = None
        self.attention2 = KernelAttention(in_channels, num_kernels, kernel_ratio, kernel_temperature, **dd) \
            if use_kernel_attn else None
        if self.attention2 is None and num_kernels != 1:
            raise ValueError(
                f'use_kernel_attn=False requires num_kernels=1 (nothing would mix the kernels), got {num_kernels}')

    def forward_attention(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None) -> DynamicAttention:
        pooled = F.adaptive_avg_pool2d(x, 1)
        kernel_attn: Optional[torch.Tensor] = None
        in_scale: Optional[torch.Tensor] = None
        out_scale: Optional[torch.Tensor] = None
        if self.attention is not None:
            odconv = self.attention(pooled)
            in_scale, out_scale = odconv.in_scale, odconv.out_scale
        if self.attention2 is not None:
            kernel_attn = self.attention2(pooled)
        return DynamicAttention(kernel_attn, in_scale, out_scale, None)
