"""Attention heads of the dynamic convolutions, computed from pooled context.

* :class:`ODConvAttention` -- ODConv's squeeze trunk ``GAP -> 1x1 conv (no bias) -> BN -> ReLU`` with any subset
  of its four heads: channel (input, sigmoid), filter (output, sigmoid), spatial (kernel taps, sigmoid) and
  kernel (softmax over K). Logits are divided by the temperature (ODConv Eq. 2; FMDConv's authors' code).
  Key names follow the authors' code: ``fc``, ``bn``, ``channel_fc``, ``filter_fc``, ``spatial_fc``, ``kernel_fc``.
* :class:`KernelAttention` -- DynamicConv's (Chen et al. 2020) two-layer kernel branch
  ``GAP -> 1x1 conv -> ReLU -> 1x1 conv -> softmax(z / T)`` (FMDConv's "Attention2", keys ``fc1``, ``fc2``).
* :class:`RoutingAttention` -- CondConv's (Yang et al. 2019) routing ``sigmoid(FC(GAP(x)))``.

The BatchNorm of a trunk (ODConv's and FMDConv's ``bn``, DMF's kernel attention) is a :class:`PooledBatchNorm2d`,
which also trains on a single sample (``single_sample_bn``). Temperatures are
:class:`~dynzoo.layers.temperature.TemperatureMixin` buffers (an authors' FMDConv checkpoint converts with its kernel
softmax at T = 34, as their code runs it).

``inference_mode=True`` builds :class:`ODConvAttention` with its trunk BatchNorm folded into ``fc`` (which then has
a bias), the form :meth:`ODConvAttention.reparameterize` leaves.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dynamic import DynamicAttention
from .fusion import fuse_conv_bn, is_batchnorm
from .temperature import TemperatureMixin

__all__ = [
    'ODConvAttention', 'KernelAttention', 'RoutingAttention', 'PooledBatchNorm2d', 'SINGLE_SAMPLE_BN_MODES',
    'softmax_fp32', 'zero_layers_',
]


def softmax_fp32(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Softmax computed in at least float32: fp16/bf16 logits (autocast) are upcast, float64 stays float64."""
    if logits.dtype == torch.float16 or logits.dtype == torch.bfloat16:
        logits = logits.float()
    return torch.softmax(logits, dim=dim)


@torch.no_grad()
def zero_layers_(*layers: Optional[nn.Module]) -> None:
    """Zero the weight and bias of each layer given (``None`` skipped): a head whose last layer is zero outputs a
    constant, the start of upcycling (:meth:`~dynzoo.layers.dynamic.DynamicConv2dBase.upcycled_state`)."""
    for layer in layers:
        if layer is not None:
            nn.init.zeros_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def _kaiming_conv_init(m: nn.Conv2d) -> None:
    nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
    if m.bias is not None:
        nn.init.zeros_(m.bias)


SINGLE_SAMPLE_BN_MODES = ('running', 'error')


class PooledBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` for an attention head's pooled ``(B, C, 1, 1)`` vectors that can also train on one sample.

    In training a pooled batch of one sample has one value per channel, from which batch statistics do not exist:
    ``nn.BatchNorm2d`` raises there (the authors' ODConv and DMF code fails at batch 1, OSVAI/ODConv issue #27, which
    breaks YOLO-style warm-ups). With ``single_sample='running'`` (dynzoo's default) such a batch is normalised with
    the running statistics, which it leaves untouched; ``'error'`` raises a ``ValueError`` naming the fix. Every
    other case is exactly ``nn.BatchNorm2d`` (same parameters, buffers, keys and results; an empty batch included).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 single_sample: str = 'running', device=None, dtype=None):
        if single_sample not in SINGLE_SAMPLE_BN_MODES:
            raise ValueError(f'single_sample_bn must be one of {SINGLE_SAMPLE_BN_MODES}, got {single_sample!r}')
        super().__init__(num_features, eps=eps, momentum=momentum, device=device, dtype=dtype)
        self.single_sample_running = single_sample == 'running'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_stats = self.training
        if batch_stats and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            if not self.single_sample_running:
                raise ValueError(
                    f'an attention head\'s BatchNorm got a training input of shape ({x.shape[0]}, {x.shape[1]}, '
                    f'{x.shape[2]}, {x.shape[3]}): one value per channel, from which batch statistics do not exist '
                    '(expected >= 2): train with a per-device batch >= 2, convert it to SyncBatchNorm, or build the '
                    "model with single_sample_bn='running' (normalise single samples with the running statistics)")
            batch_stats = False
        momentum = 0.0
        if batch_stats:
            num_batches_tracked = self.num_batches_tracked
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
            else:
                momentum = float(self.momentum)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, batch_stats, momentum, self.eps)


class ODConvAttention(nn.Module, TemperatureMixin):
    """ODConv trunk ``GAP -> fc (C_in -> A, no bias) -> BN -> ReLU`` with optional sigmoid/softmax heads.

    ``A = max(int(C_in * reduction), min_channels)``. The filter head is not built for depthwise layers and the
    spatial head not for 1x1 kernels (ODConv rules); an absent head returns ``None``. Heads:
    channel ``A -> C_in`` sigmoid, filter ``A -> C_out`` sigmoid, spatial ``A -> kh*kw`` sigmoid,
    kernel ``A -> K`` softmax (only when ``K > 1``), each logit divided by the temperature.
    ``single_sample_bn``: the trunk BatchNorm's behaviour on a training batch of one sample (see
    :class:`PooledBatchNorm2d`). ``inference_mode=True``: ``fc`` with a bias and no ``bn`` (what
    :meth:`reparameterize` leaves).
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: Tuple[int, int],
            groups: int = 1,
            num_kernels: int = 4,
            reduction: float = 0.0625,
            min_channels: int = 16,
            temperature: float = 1.0,
            channel_head: bool = True,
            filter_head: bool = True,
            spatial_head: bool = True,
            kernel_head: bool = True,
            single_sample_bn: str = 'running',
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        attn_channels = max(int(in_channels * reduction), min_channels)
        self._init_temperature(temperature, 'gate' if not kernel_head else 'kernel', device=device)
        self.fc = nn.Conv2d(in_channels, attn_channels, 1, bias=inference_mode, **dd)
        self.bn = nn.Identity() if inference_mode else PooledBatchNorm2d(
            attn_channels, single_sample=single_sample_bn, **dd)
        self.channel_fc = nn.Conv2d(attn_channels, in_channels, 1, bias=True, **dd) if channel_head else None
        depthwise = in_channels == groups == out_channels
        self.filter_fc = nn.Conv2d(attn_channels, out_channels, 1, bias=True, **dd) \
            if filter_head and not depthwise else None
        k_taps = kernel_size[0] * kernel_size[1]
        self.spatial_fc = nn.Conv2d(attn_channels, k_taps, 1, bias=True, **dd) \
            if spatial_head and k_taps > 1 else None
        self.kernel_fc = nn.Conv2d(attn_channels, num_kernels, 1, bias=True, **dd) \
            if kernel_head and num_kernels > 1 else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _kaiming_conv_init(m)

    def forward(self, pooled: torch.Tensor) -> DynamicAttention:
        """``pooled``: ``(B, C_in, 1, 1)``. Returns the kernel, channel (input), filter (output) and spatial
        attentions, 2-D."""
        a = F.relu(self.bn(self.fc(pooled)))
        t = self.temperature
        kernel: Optional[torch.Tensor] = None
        channel: Optional[torch.Tensor] = None
        filt: Optional[torch.Tensor] = None
        spatial: Optional[torch.Tensor] = None
        if self.kernel_fc is not None:
            kernel = softmax_fp32(self.kernel_fc(a).flatten(1) / t, dim=1)
        if self.channel_fc is not None:
            channel = torch.sigmoid(self.channel_fc(a).flatten(1) / t)
        if self.filter_fc is not None:
            filt = torch.sigmoid(self.filter_fc(a).flatten(1) / t)
        if self.spatial_fc is not None:
            spatial = torch.sigmoid(self.spatial_fc(a).flatten(1) / t)
        return DynamicAttention(kernel, channel, filt, spatial)

    def zero_logits_(self) -> None:
        """Zero every head's last layer: uniform kernel softmax and gates of 1/2 at any temperature."""
        zero_layers_(self.channel_fc, self.filter_fc, self.spatial_fc, self.kernel_fc)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the trunk's BatchNorm into ``fc`` (exact, from the running statistics, any mode)."""
        if is_batchnorm(self.bn):
            self.fc = fuse_conv_bn(self.fc, self.bn)
            self.bn = nn.Identity()


class KernelAttention(nn.Module, TemperatureMixin):
    """DynamicConv kernel branch: ``softmax(fc2(ReLU(fc1(GAP x))) / T)`` over the K kernels.

    Hidden width ``H = int(C_in * ratio) + 1`` (``H = K`` when ``C_in == 3``, DynamicConv's code rule).
    """

    def __init__(
            self,
            in_channels: int,
            num_kernels: int,
            ratio: float = 0.25,
            temperature: float = 1.0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        hidden = num_kernels if in_channels == 3 else int(in_channels * ratio) + 1
        self._init_temperature(temperature, 'kernel', device=device)
        self.fc1 = nn.Conv2d(in_channels, hidden, 1, bias=False, **dd)
        self.fc2 = nn.Conv2d(hidden, num_kernels, 1, bias=True, **dd)
        for m in (self.fc1, self.fc2):
            _kaiming_conv_init(m)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        z = self.fc2(F.relu(self.fc1(pooled))).flatten(1)
        return softmax_fp32(z / self.temperature, dim=1)

    def zero_logits_(self) -> None:
        """Zero ``fc2``: uniform mixing weights ``1/K`` at any temperature."""
        zero_layers_(self.fc2)


class RoutingAttention(nn.Module):
    """CondConv routing ``r(x) = sigmoid(FC(GAP x))``, one independent gate per expert (Yang et al. 2019, Eq. 2)."""

    def __init__(self, in_channels: int, num_kernels: int, device=None, dtype=None):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_kernels, device=device, dtype=dtype)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(pooled.flatten(1)))

    def zero_logits_(self) -> None:
        """Zero ``fc``: every routing weight ``1/2``."""
        zero_layers_(self.fc)
