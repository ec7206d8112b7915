"""A2D2C / A2D2C+: adaptive attention-driven dynamic convolution (Zhang et al., "A2D2C: Adaptive
Attention-Driven Dynamic Convolution for Local Feature Adaptation").

Routing (paper §3.2-3.3, Eq. 2-5): every base kernel ``W_i`` answers the layer input, ``F_i = conv(x, W_i) + b_i``
(Eq. 2); its response is summarised by multi-point random sampling (MRS, Eq. 3-4), the mean of ``F_i`` over ``M``
positions drawn uniformly with replacement, ``p_i = mean_j F_i[:, u_ij]`` (``C_out`` values); one linear router
shared by all kernels turns each summary into a logit ``z_i = w . p_i + b`` and ``pi = softmax(z / T)`` over the
``K`` kernels (Eq. 5; dynzoo's choice: the paper's ``softmax(p_i)`` read as a softmax over the kernels). The
sampled means are computed without the ``K`` response maps, by linearity ``p_i = W_i (*) P_i + b_i`` where ``P_i``
is the mean input patch under the sampled positions (exact, zero padding included). Two modes with identical
parameters and identical outputs for the same positions, which differ in how the mixture is convolved:

* ``mode='fused'`` (A2D2C, Eq. 6-7): ONE convolution with the aggregated kernel ``sum_i pi_i W_i`` (any strategy of
  the shared core);
* ``mode='sum'`` (A2D2C+, Eq. 8, Alg. 2): the ``K`` response maps as one dense conv with ``K*C_out`` outputs, mixed,
  ``y = sum_i pi_i F_i`` -- the core's ``'dense'`` strategy, which this mode always runs. ``K`` times the
  convolution FLOPs (the paper's printed A2D2C+ MAdds do not count them).

Decisions the paper leaves open (dynzoo's choices):

* sampling shares one index set per kernel across the mini-batch (``sample_per='batch'``) or draws one per
  sample (``'sample'``); indices come from the global torch RNG, so ``torch.manual_seed`` reproduces a run;
* evaluation (``model.eval()``) is deterministic and batch-independent: ``eval_sampling='mean'`` (default) uses
  the expectation of the MRS estimator, every output position with equal weight (as dropout uses its
  expectation); ``'fixed'`` uses a deterministic golden-ratio (Weyl) set of ``M`` positions per kernel, a
  stand-in for the paper's "fixed sampling" ablation; ``'random'`` keeps the paper-literal stochastic sampling;
* the temperature is a persistent buffer of the router (role ``'kernel'``), default 1 (an inference-ready
  model); training anneals it 30 -> 1 over the first 10 epochs (§4.3; the end value 1 is dynzoo's choice), per
  step: :func:`~dynzoo.layers.temperature.linear_temperature`;
* a following BatchNorm folds into a per-channel ``post_scale`` / ``post_bias`` after the mixture rather than
  into the bank, because the router reads the raw responses ``F_i``; this is exact for every BN, zero gamma included.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import register_notrace_module

from .dynamic import DynamicAttention, DynamicConv2dBase, conv_output_size, resolve_strategy
from .fusion import bn_scale_shift
from .heads import softmax_fp32, zero_layers_
from .temperature import TemperatureMixin

__all__ = ['A2D2CConv2d', 'A2D2CRouter', 'A2D2C_MODES', 'A2D2C_EVAL_SAMPLING']

A2D2C_MODES = ('fused', 'sum')
A2D2C_SAMPLE_PER = ('batch', 'sample')
A2D2C_EVAL_SAMPLING = ('mean', 'fixed', 'random')


class A2D2CRouter(nn.Linear, TemperatureMixin):
    """The shared scalar router ``z_i = w . p_i + b`` (``w``: ``C_out`` values) and ``pi = softmax(z / T)`` over
    the kernels (§3.3). Keys ``router.weight`` ``(1, C_out)``, ``router.bias`` ``(1,)`` (zero init),
    ``router.temperature``."""

    def __init__(self, out_channels: int, temperature: float = 1.0, device=None, dtype=None):
        super().__init__(out_channels, 1, bias=True, device=device, dtype=dtype)
        nn.init.zeros_(self.bias)
        self._init_temperature(temperature, 'kernel', device=device)

    def forward(self, descriptors: torch.Tensor) -> torch.Tensor:
        """``descriptors`` ``(B, K, C_out)`` -> routing weights ``pi`` ``(B, K)`` (softmax in at least fp32)."""
        z = F.linear(descriptors, self.weight.to(descriptors.dtype), self.bias.to(descriptors.dtype)).squeeze(-1)
        return softmax_fp32(z / self.temperature, dim=1)

    def zero_logits_(self) -> None:
        """Zero the router: uniform routing weights ``1/K`` at any temperature (upcycling's start)."""
        zero_layers_(self)


@register_notrace_module
class A2D2CConv2d(DynamicConv2dBase):
    """A2D2C (``mode='fused'``) / A2D2C+ (``mode='sum'``) layer with full ``nn.Conv2d`` geometry.

    Args (beyond ``nn.Conv2d``'s): ``num_kernels`` K (paper: 4), ``num_points`` M (paper: 100), ``mode``,
    ``temperature`` (router softmax), ``sample_per`` (``'batch'`` | ``'sample'``), ``eval_sampling``
    (``'mean'`` | ``'fixed'`` | ``'random'``). ``bias=False`` in the backbones (BN follows). Parameters:
    ``K*C_out*C_in/g*kh*kw + C_out + 1`` (+ ``K*C_out`` with bias).

    ``forward(x, positions=None)``: ``positions`` (the core's conditioning tensor; int64, ``(K, M)`` shared by the
    batch or ``(B, K, M)``, values in ``[0, H_out*W_out)``, row-major output positions) overrides the sampling --
    for tests and analysis. ``inference_mode`` is accepted for the hosts (A2D2C has no fold of its own);
    ``post_bias`` see :class:`~dynzoo.layers.dynamic.DynamicConv2dBase`.
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
            num_points: int = 100,
            mode: str = 'fused',
            temperature: float = 1.0,
            sample_per: str = 'batch',
            eval_sampling: str = 'mean',
            strategy: str = 'auto',
            padding_mode: str = 'zeros',
            inference_mode: bool = False,
            post_bias: bool = False,
            device=None,
            dtype=None,
    ):
        if mode not in A2D2C_MODES:
            raise ValueError(f'mode must be one of {A2D2C_MODES} (fused = A2D2C, sum = A2D2C+), got {mode!r}')
        if sample_per not in A2D2C_SAMPLE_PER:
            raise ValueError(f'sample_per must be one of {A2D2C_SAMPLE_PER}, got {sample_per!r}')
        if eval_sampling not in A2D2C_EVAL_SAMPLING:
            raise ValueError(f'eval_sampling must be one of {A2D2C_EVAL_SAMPLING}, got {eval_sampling!r}')
        if num_points < 1:
            raise ValueError(f'num_points must be >= 1, got {num_points}')
        super().__init__(
            in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride,
            padding=padding, dilation=dilation, groups=groups, bias=bias, num_kernels=num_kernels,
            post_bias=post_bias, strategy=strategy, padding_mode=padding_mode, device=device, dtype=dtype)
        self.num_points = num_points
        self.mode = mode
        self.sample_per = sample_per
        self.eval_sampling = eval_sampling
        self.router = A2D2CRouter(out_channels, temperature, device=device, dtype=dtype)
        # the scale of a folded following BatchNorm (see fuse_bn); registered with post_bias
        self.register_buffer('post_scale', torch.ones(out_channels, device=device, dtype=dtype) if post_bias else None)

    # ---------------------------------------------------------------- sampling (Eq. 3-4)
    def sample_positions(
            self,
            batch: int,
            out_hw: Tuple[int, int],
            device: torch.device,
            positions: Optional[torch.Tensor] = None,
    ) -> Optional[torch.Tensor]:
        """The sampled output positions (row-major, int64): ``(K, M)`` shared by the batch or ``(B, K, M)``.

        Training (and eval ``'random'``): uniform with replacement from the global torch RNG; eval ``'fixed'``:
        a golden-ratio (Weyl) sequence of ``M`` positions per kernel; eval ``'mean'``: ``None``, meaning every
        position with weight ``1/L`` (the expectation of the MRS estimator). Explicit ``positions`` are checked.
        """
        num_pos = out_hw[0] * out_hw[1]
        k = self.num_kernels
        m = self.num_points
        if positions is None:
            if self.training or self.eval_sampling == 'random':
                shape: List[int] = [k, m] if self.sample_per == 'batch' else [batch, k, m]
                return torch.randint(0, num_pos, shape, device=device)
            if self.eval_sampling == 'fixed':
                j = torch.arange(k * m, device=device, dtype=torch.float64)
                frac = torch.remainder(0.5 + (j + 1.0) * 0.6180339887498949, 1.0)  # (sqrt(5) - 1) / 2
                return (frac * num_pos).floor().long().clamp_(max=num_pos - 1).reshape(k, m)
            return None
        if positions.dim() not in (2, 3) or positions.shape[-2] != k or (
                positions.dim() == 3 and positions.shape[0] != batch):
            raise ValueError(
                f'positions must have shape ({k}, M) or ({batch}, {k}, M), got {positions.shape}')
        if positions.dtype != torch.int64:
            raise ValueError(f'positions must be int64, got {positions.dtype}')
        if bool((positions < 0).any()) or bool((positions >= num_pos).any()):
            raise ValueError(f'positions must lie in [0, {num_pos}) for a {out_hw[0]}x{out_hw[1]} output, got values '
                             f'in [{int(positions.min())}, {int(positions.max())}]')
        return positions

    @staticmethod
    def sampling_weights(positions: torch.Tensor, num_pos: int, dtype: torch.dtype) -> torch.Tensor:
        """Weight of every output position in each kernel's descriptor, ``(..., L)``: the multiplicities of
        ``positions`` divided by ``M`` (rows sum to 1). float64 stays float64 (gradcheck), else float32."""
        wdtype = torch.float64 if dtype == torch.float64 else torch.float32
        counts = torch.zeros(list(positions.shape[:-1]) + [num_pos], device=positions.device, dtype=wdtype)
        ones = torch.full(positions.shape, 1.0 / positions.shape[-1], device=positions.device, dtype=wdtype)
        return counts.scatter_add_(-1, positions, ones)

    def output_size(self, x: torch.Tensor) -> Tuple[int, int]:
        return (
            conv_output_size(x.shape[-2], self.kernel_size[0], self.stride[0], self.padding[0], self.dilation[0]),
            conv_output_size(x.shape[-1], self.kernel_size[1], self.stride[1], self.padding[1], self.dilation[1]),
        )

    # ---------------------------------------------------------------- routing descriptors
    def mean_patches(self, x: torch.Tensor, positions: Optional[torch.Tensor], out_hw: Tuple[int, int]) -> torch.Tensor:
        """``P_i``: the mean input patch under kernel ``i``'s sampled positions, exact with zero padding ->
        ``(B, K, C_in, kh*kw)``; ``(B, 1, C_in, kh*kw)`` for the all-positions mean (``positions=None``).

        All positions: separable strided sums (rows per tap row, then columns per tap column). Sampled positions:
        the ``M`` patches are gathered when that is sparser than the map (``K*M < L``), else each tap's strided
        slice is contracted with the per-position sample weights."""
        batch, c_in = x.shape[0], x.shape[1]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        dh, dw = self.dilation
        ho, wo = out_hw
        num_pos = ho * wo
        x_pad = F.pad(x, [self.padding[1], self.padding[1], self.padding[0], self.padding[0]])
        if positions is None:
            rows = torch.stack([x_pad[:, :, ty * dh: ty * dh + sh * (ho - 1) + 1: sh, :].sum(2)
                                for ty in range(kh)], 2)                                    # (B, C, kh, Wp)
            cols = torch.stack([rows[:, :, :, tx * dw: tx * dw + sw * (wo - 1) + 1: sw].sum(-1)
                                for tx in range(kw)], -1)                                   # (B, C, kh, kw)
            return (cols / num_pos).reshape(batch, 1, c_in, kh * kw)
        k, m = positions.shape[-2], positions.shape[-1]
        if k * m < num_pos:
            wp = x_pad.shape[-1]
            base = torch.div(positions, wo, rounding_mode='floor') * (sh * wp) + torch.remainder(positions, wo) * sw
            ty = torch.arange(kh, device=x.device).reshape(kh, 1) * (dh * wp)
            tx = torch.arange(kw, device=x.device).reshape(1, kw) * dw
            index = base.unsqueeze(-1) + (ty + tx).reshape(-1)                                # (..., K, M, T)
            flat = x_pad.flatten(2)
            if positions.dim() == 2:
                picked = flat.index_select(2, index.reshape(-1))
            else:
                picked = flat.gather(2, index.reshape(batch, 1, k * m * kh * kw).expand(batch, c_in, k * m * kh * kw))
            picked = picked.reshape(batch, c_in, k, m, kh * kw).mean(3)                       # (B, C, K, T)
            return picked.permute(0, 2, 1, 3)
        weights = self.sampling_weights(positions, num_pos, x.dtype)
        taps: List[torch.Tensor] = []
        for ty in range(kh):
            for tx in range(kw):
                tap = x_pad[:, :, ty * dh: ty * dh + sh * (ho - 1) + 1: sh, tx * dw: tx * dw + sw * (wo - 1) + 1: sw]
                tap = tap.reshape(batch, c_in, num_pos)
                if weights.dim() == 2:
                    taps.append(torch.einsum('bcl,kl->bkc', tap, weights.to(tap.dtype)))
                else:
                    taps.append(torch.einsum('bcl,bkl->bkc', tap, weights.to(tap.dtype)))
        return torch.stack(taps, -1)

    def descriptors_fused(
            self, x: torch.Tensor, positions: Optional[torch.Tensor], out_hw: Tuple[int, int]) -> torch.Tensor:
        """``p_i = W_i (*) P_i + b_i`` -> ``(B, K, C_out)``: the sampled mean of ``F_i`` without computing ``F_i``."""
        patches = self.mean_patches(x, positions, out_hw)
        batch = x.shape[0]
        k, g = self.num_kernels, self.groups
        c_in_g = self.in_channels // g
        c_out_g = self.out_channels // g
        taps = self.kernel_size[0] * self.kernel_size[1]
        w = self.weight.to(patches.dtype).reshape(k, g, c_out_g, c_in_g, taps)
        if patches.shape[1] == 1:
            desc = torch.einsum('bgct,kgoct->bkgo', patches.reshape(batch, g, c_in_g, taps), w)
        else:
            desc = torch.einsum('bkgct,kgoct->bkgo', patches.reshape(batch, k, g, c_in_g, taps), w)
        desc = desc.reshape(batch, k, self.out_channels)
        if self.bias is not None:
            desc = desc + self.bias.to(desc.dtype).unsqueeze(0)
        return desc

    def routing(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``pi`` ``(B, K)`` computed the fused way (from mean patches)."""
        out_hw = self.output_size(x)
        positions = self.sample_positions(x.shape[0], out_hw, x.device, positions)
        return self.router(self.descriptors_fused(x, positions, out_hw))

    def forward_attention(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None) -> DynamicAttention:
        """``cond``: explicit sampled positions (see the class docstring), else drawn by :meth:`sample_positions`."""
        out_scale: Optional[torch.Tensor] = None
        if self.post_scale is not None:
            out_scale = self.post_scale.unsqueeze(0).expand(x.shape[0], -1)
        return DynamicAttention(self.routing(x, cond), None, out_scale, None)

    def effective_strategy(self) -> str:
        if self.mode == 'sum':  # A2D2C+ is the K-conv sum (Eq. 8): the core's dense strategy
            return 'dense'
        return resolve_strategy(self.strategy)

    @torch.no_grad()
    def fuse_bn(self, bn: nn.Module) -> None:
        """Fold a following BatchNorm (``y -> s y + t``, running statistics, any mode) into the layer's output map.

        The router reads the raw per-channel responses ``F_i`` (Eq. 3-5), so the bank is left as it is and the BN
        becomes the per-channel ``post_scale`` / ``post_bias`` applied after the mixture: exact for every ``s``,
        a zero BN gamma included (timm's ResNets zero-initialise the last BN of each block).
        """
        scale, shift = bn_scale_shift(bn)
        if scale.numel() != self.out_channels:
            raise ValueError(f'BatchNorm has {scale.numel()} features, layer has {self.out_channels} outputs')
        scale = scale.to(self.weight.dtype)
        shift = shift.to(self.weight.dtype)
        if self.post_bias is not None:
            shift = shift + scale * self.post_bias
        if self.post_scale is not None:
            scale = scale * self.post_scale
        self.post_scale = scale.detach().clone()
        self.post_bias = shift.detach().clone()

    def extra_repr(self) -> str:
        s = super().extra_repr() + f', num_points={self.num_points}, mode={self.mode!r}'
        if self.sample_per != 'batch':
            s += f', sample_per={self.sample_per!r}'
        if self.eval_sampling != 'mean':
            s += f', eval_sampling={self.eval_sampling!r}'
        return s
