"""SGDM and RDConv: the Static-Guided Dynamic Module with Razor Dynamic Convolution.

Paper: W. Xing, Z. Cui, J. Qi, "SGDM: Static-Guided Dynamic Module Make Stronger Visual Models". No code was
published; every choice the paper leaves open is named below and in each docstring as "dynzoo's choice".

Building blocks, from small to large:

* :func:`razor_split` -- the Razor Operation (Eq. 6-7): only the leading ``c_i = int(r_z * c)`` "intrinsic"
  channels get dynamic processing; the rest pass through (Eq. 7's ``(1 - r) X``, the "cheap operation").
* :func:`strip_to_square` (the paper's ``psi``) and :func:`static_guide` (Eq. 10's ``psi(W_h) + psi(W_w)``).
* :class:`GuidedDynamicConv2d` -- a CondConv-routed dynamic conv on the shared core whose experts are multiplied
  element-wise by an optional static guide ``S`` (Eq. 2, 5, 10): ``W(x) = (sum_k alpha_k(x) D_k) (.) S``.
* :class:`StripSpatialAttention` -- RDConv's spatial branch (H-GAP -> H-Conv, W-GAP -> W-Conv, sigmoid, product).
* :class:`RDConv2d` -- razor + guided dynamic conv + BN + spatial branch (§3.3).
* :class:`StaticStripConv` -- the asymmetric static ``k_s x 1`` / ``1 x k_s`` conv + BN (Eq. 8).
* :class:`SGDM` -- the module: a 4-way channel split ``[r, r, r, 1 - 3r]`` into RDConv, the two static strips and
  an identity, concatenated (Eq. 8-9), with the strips' kernels guiding RDConv's experts (Eq. 10).

dynzoo's choices where the paper is silent:

* the paper calls two different strip lengths ``k_s``: the static strips (9, so they reshape to 3x3) are
  ``static_kernel``; the spatial-branch strips (15, Table 7) are ``spatial_kernel``;
* the razor is a channel slice (first ``c_i`` channels); the dynamic conv maps ``c_i -> c_i``; the other
  channels are copied (no GhostNet-style cheap conv: Eq. 7 has none);
* Eq. 10 multiplies a ``c_i x c_i`` dynamic kernel with ``c x c`` static kernels: the guide is built from the
  leading ``c_i x c_i`` sub-block of each static kernel (the paper's "directly mapped" remark, §4.4);
* Eq. 10's ``*`` is the Hadamard ("dot") product; ``psi`` is a row-major reshape of 9 taps into 3x3;
* kernel attention ``alpha = sigmoid(Linear(GAP(X_int)))`` (CondConv routing, Eq. 5's sigmoid; no softmax, no
  temperature); a BN after the dynamic conv and after each static strip; no activation anywhere in SGDM; dense
  static strips; depthwise spatial strips on ``X_int``; PyTorch-default (kaiming-uniform, a = sqrt 5) init;
* Eq. 9 writes ``Cat(X'_rd, X'_h, X'_h, X'_id)``: read as ``X'_w`` in the third slot;
* the guide is recomputed from the live static weights at every training forward, without ``detach``: the
  static strips get gradients from their own branch and through RDConv;
* no residual around the module and no final norm/activation.

Reparameterization (timm's contract: each module folds only itself, ``timm.utils.reparameterize_model`` visits a
parent before its children): :class:`SGDM` stores the guide computed from the *raw* strip kernels as its own buffer
``guide`` (the guide multiplies the experts at run time, ``K * numel(S)`` products per call, batch-independent);
then each :class:`StaticStripConv` folds its BN into its strip kernel + bias and :class:`RDConv2d` folds its BN into
the dynamic conv (:meth:`~dynzoo.layers.dynamic.DynamicConv2dBase.fuse_bn`). The ACNet "1xk + kx1 -> kxk" merge
does not apply: the two strips act on disjoint channel groups and are concatenated, not summed onto a common kernel
(merging them into one block-diagonal 9x9 conv would multiply their FLOPs by ~9), so each strip keeps its own
folded kernel.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import register_notrace_module, to_2tuple

from .dynamic import DynamicAttention, DynamicConv2dBase
from .fusion import fuse_conv_bn, is_batchnorm, norm_act_remainder
from .heads import RoutingAttention

__all__ = [
    'razor_split', 'intrinsic_channels', 'strip_to_square', 'static_guide', 'GuidedDynamicConv2d',
    'StripSpatialAttention', 'RDConv2d', 'StaticStripConv', 'SGDM', 'sgdm_num_params',
]


def intrinsic_channels(channels: int, razor_ratio: float) -> int:
    """``c_i = int(r_z * c)``: the channels the razor keeps for dynamic processing (Eq. 7)."""
    if not 0.0 < razor_ratio <= 1.0:
        raise ValueError(f'razor_ratio must be in (0, 1], got {razor_ratio}')
    c_i = int(razor_ratio * channels)
    if c_i < 1:
        raise ValueError(
            f'razor_ratio={razor_ratio} leaves no intrinsic channel out of {channels} (need int(r * c) >= 1)')
    return c_i


def razor_split(x: torch.Tensor, num_intrinsic: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Razor Operation (Eq. 6-7): ``(X_int, X_rest) = (X[:, :c_i], X[:, c_i:])``.

    dynzoo's choice: the paper's channel compression ``delta`` "that prioritises intrinsic features" is realised as a
    parameter-free slice (PConv/FasterNet-style); Eq. 7's ``r (sum alpha D) X + (1 - r) X`` is read as a channel
    split (Table 6's params grow ~quadratically with r, which a scalar blend would not do).
    """
    if num_intrinsic < 1 or num_intrinsic > x.shape[1]:
        raise ValueError(f'num_intrinsic must be in [1, {x.shape[1]}], got {num_intrinsic}')
    return x[:, :num_intrinsic], x[:, num_intrinsic:]


def strip_to_square(weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The paper's ``psi`` (Eq. 10): reshape a ``(O, I, k*k, 1)`` or ``(O, I, 1, k*k)`` strip to ``(O, I, k, k)``.

    dynzoo's choice: row-major, tap ``t`` goes to ``(t // k, t % k)``.
    """
    if weight.dim() != 4 or weight.shape[2] * weight.shape[3] != kernel_size * kernel_size \
            or min(weight.shape[2], weight.shape[3]) != 1:
        raise ValueError(
            f'psi needs a strip kernel of {kernel_size * kernel_size} taps (k_s = k_d^2), got shape {weight.shape}')
    return weight.reshape(weight.shape[0], weight.shape[1], kernel_size, kernel_size)


def static_guide(weight_h: torch.Tensor, weight_w: torch.Tensor, num_channels: int, kernel_size: int) -> torch.Tensor:
    """Eq. 10's guide ``S = psi(W_h) + psi(W_w)`` on the leading ``c_i x c_i`` sub-blocks -> ``(c_i, c_i, k, k)``.

    The static kernels are ``c x c``, the dynamic kernel ``c_i x c_i``: the leading sub-block is used (dynzoo's
    reading of §4.4's "directly mapped").
    """
    return (strip_to_square(weight_h[:num_channels, :num_channels], kernel_size)
            + strip_to_square(weight_w[:num_channels, :num_channels], kernel_size))


def _centre_identity(channels: int, kernel_size: Tuple[int, int], dtype: torch.dtype, device) -> torch.Tensor:
    """The ``(channels, channels, kh, kw)`` kernel that copies each channel through its centre tap."""
    weight = torch.zeros((channels, channels) + tuple(kernel_size), dtype=dtype, device=device)
    weight[:, :, kernel_size[0] // 2, kernel_size[1] // 2] = torch.eye(channels, dtype=dtype, device=device)
    return weight


def _identity_norm_state(norm: nn.Module) -> Dict[str, torch.Tensor]:
    """The state of a BatchNorm that passes its input through in eval (mean 0, variance ``1 - eps``, weight 1,
    bias 0); empty for the ``nn.Identity`` of an inference form."""
    if not is_batchnorm(norm):
        return {}
    state = {k: v.clone() for k, v in norm.state_dict().items()}
    state['running_mean'].zero_()
    state['running_var'].fill_(1.0 - norm.eps)
    if 'weight' in state:
        state['weight'].fill_(1.0)
        state['bias'].zero_()
    return state


@register_notrace_module
class GuidedDynamicConv2d(DynamicConv2dBase):
    """Dynamic conv whose experts are modulated by a static guide (Eq. 2, 5, 10) on the shared core.

    ``y = conv(x, (sum_k alpha_k(x) D_k) (.) S)`` with ``alpha = sigmoid(FC(GAP x))`` (dynzoo's choice: CondConv
    routing; the paper's Eq. 5 only says "sigmoid of a sub-network"). Because the Hadamard product distributes over
    the mixture, ``(sum_k alpha_k D_k) (.) S = sum_k alpha_k (D_k (.) S)``: the guide multiplies the ``K`` experts
    (:meth:`transform_bank`, ``K * numel(S)`` products, batch-independent) and the core aggregates/convolves as
    usual, so every execution strategy of :func:`dynzoo.layers.dynamic.dynamic_conv2d` applies.
    ``forward(x, guide=None)``: ``guide`` (the core's conditioning tensor) is ``(C_out, C_in/groups, kh, kw)``.
    Full ``nn.Conv2d`` geometry (stride, padding, dilation, groups); init (dynzoo's choice): kaiming-uniform
    (a = sqrt 5) per expert, the PyTorch ``Conv2d`` default, as timm's CondConv2d. ``inference_mode`` is accepted
    for the hosts (no fold of its own); ``post_bias`` see :class:`~dynzoo.layers.dynamic.DynamicConv2dBase`.
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

    def reset_bank_parameters(self) -> None:
        """PyTorch ``Conv2d`` init per expert: ``kaiming_uniform_(a=sqrt(5))``, biases ``U(-1/sqrt(fan_in), ..)``."""
        fan_in = self.weight.shape[2] * self.weight.shape[3] * self.weight.shape[4]
        for k in range(self.num_kernels):
            nn.init.kaiming_uniform_(self.weight.data[k], a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward_attention(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None) -> DynamicAttention:
        return DynamicAttention(self.routing(F.adaptive_avg_pool2d(x, 1)), None, None, None)

    def transform_bank(self, weight: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``D_k (.) S`` for every expert when a guide ``S`` is given."""
        if cond is None:
            return weight
        if not torch.jit.is_scripting():
            self._check_guide_eager(cond)
        return weight * cond.to(weight.dtype).unsqueeze(0)

    @torch.jit.unused
    def _check_guide_eager(self, guide: torch.Tensor) -> None:
        if guide.shape != self.weight.shape[1:]:
            raise ValueError(f'guide must have shape (C_out, C_in/groups, kh, kw) = {tuple(self.weight.shape[1:])}, '
                             f'got {tuple(guide.shape)}')


@register_notrace_module
class StripSpatialAttention(nn.Module):
    """RDConv's spatial branch (Fig. 2a): ``A = sigmoid(H-Conv(H-GAP x)) (.) sigmoid(W-Conv(W-GAP x))``.

    * H-GAP: mean over height -> ``(B, C, 1, W)``; H-Conv: depthwise ``1 x k`` (pad ``(0, k//2)``, bias).
    * W-GAP: mean over width -> ``(B, C, H, 1)``; W-Conv: depthwise ``k x 1`` (pad ``(k//2, 0)``, bias).
    * ``A`` broadcasts to ``(B, C, H, W)``.

    The components and the 1x15 / 15x1 sizes are the paper's (§3.3, Table 7); dynzoo's choices: the wiring, the
    depthwise groups and the sigmoid on each strip (the paper only says the branch output "is also a weight").
    """

    def __init__(self, channels: int, kernel_size: int = 15, device=None, dtype=None):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'spatial_kernel must be a positive odd integer, got {kernel_size}')
        dd = {'device': device, 'dtype': dtype}
        self.channels = channels
        self.conv_h = nn.Conv2d(channels, channels, (1, kernel_size), padding=(0, kernel_size // 2),
                                groups=channels, bias=True, **dd)
        self.conv_w = nn.Conv2d(channels, channels, (kernel_size, 1), padding=(kernel_size // 2, 0),
                                groups=channels, bias=True, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn_h = torch.sigmoid(self.conv_h(x.mean(dim=2, keepdim=True)))  # (B, C, 1, W)
        attn_w = torch.sigmoid(self.conv_w(x.mean(dim=3, keepdim=True)))  # (B, C, H, 1)
        return attn_h * attn_w


@register_notrace_module
class RDConv2d(nn.Module):
    """Razor Dynamic Convolution (§3.3): ``RDConv(X) = Cat(BN(DConv(X_int; S)) (.) A(X_int), X_rest)``.

    1. Razor (Eq. 6-7): ``X_int = X[:, :c_i]``, ``X_rest = X[:, c_i:]``, ``c_i = int(razor_ratio * c)``.
    2. Dynamic conv (Eq. 2, 5) ``c_i -> c_i``, ``k x k``, ``K`` experts, sigmoid routing from ``GAP(X_int)``, with the
       optional static guide ``S`` of Eq. 10 multiplying the aggregated kernel.
    3. BN on the ``c_i`` outputs (dynzoo's choice: the Hadamard product of two kaiming-scale tensors makes the raw
       output tiny). The BN sits before the spatial product, so it folds exactly into the experts.
    4. Spatial branch :class:`StripSpatialAttention` on ``X_int``, multiplied into the conv output.

    Channel-preserving, stride 1 only (the paper's only form, ``rc_in -> rc_in``); ``dilation`` keeps the shape
    (padding ``dilation * (k // 2)``). ``forward(x, guide=None)``; ``reparameterize()`` folds the BN into the dynamic
    conv; ``inference_mode=True`` builds that form (dynamic conv with ``post_bias``, no BN).
    """

    def __init__(
            self,
            channels: int,
            kernel_size: int = 3,
            razor_ratio: float = 0.5,
            num_kernels: int = 4,
            spatial_kernel: int = 15,
            dilation: int = 1,
            strategy: str = 'auto',
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if channels < 1:
            raise ValueError(f'channels must be >= 1, got {channels}')
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'kernel_size must be a positive odd integer (shape-preserving), got {kernel_size}')
        dd = {'device': device, 'dtype': dtype}
        self.channels = channels
        self.kernel_size = kernel_size
        self.num_intrinsic = intrinsic_channels(channels, razor_ratio)
        self.dynamic = GuidedDynamicConv2d(
            self.num_intrinsic, self.num_intrinsic, kernel_size, padding=dilation * (kernel_size // 2),
            dilation=dilation, num_kernels=num_kernels, strategy=strategy, post_bias=inference_mode, **dd)
        self.bn = nn.Identity() if inference_mode else nn.BatchNorm2d(self.num_intrinsic, **dd)
        self.spatial = StripSpatialAttention(self.num_intrinsic, spatial_kernel, **dd)

    def forward(self, x: torch.Tensor, guide: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f'RDConv2d expects (B, {self.channels}, H, W), got shape {x.shape}')
        x_int, x_rest = razor_split(x, self.num_intrinsic)
        y = self.bn(self.dynamic(x_int, guide))
        y = y * self.spatial(x_int)
        return torch.cat([y, x_rest], dim=1)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the BN into the experts: ``D^_k = s (.) D_k``, shift ``t`` as the core's ``post_bias`` (exact, from
        the running statistics, any mode). The fold commutes with the guide (both scale the experts)."""
        if is_batchnorm(self.bn):
            self.dynamic.fuse_bn(self.bn)
            self.bn = norm_act_remainder(self.bn)

    @torch.no_grad()
    def identity_state(self, guide: torch.Tensor, generator: Optional[torch.Generator] = None,
                       perturbation: float = 0.1) -> Dict[str, torch.Tensor]:
        """This module's state dict (its own keys) for which it passes its input through unchanged in eval, given
        the guide ``S`` it will run with; the module is left unchanged. The spatial strips are zero (the branch is
        the constant ``sigmoid(0)^2``), the BN an identity (:func:`_identity_norm_state`), and the dynamic conv an
        exact copy of the centre-tap identity kernel divided by that constant
        (:meth:`~dynzoo.layers.dynamic.DynamicConv2dBase.upcycled_state`, seeded experts, routing weights 1/2)."""
        state = {f'spatial.{k}': torch.zeros_like(v) for k, v in self.spatial.state_dict().items()}
        spatial_gain = torch.sigmoid(torch.zeros((), dtype=torch.float64)) ** 2  # zero strips: sigmoid(0) sigmoid(0)
        w = self.dynamic.weight
        target = _centre_identity(self.num_intrinsic, (self.kernel_size, self.kernel_size), torch.float64, w.device)
        state.update({f'bn.{k}': v for k, v in _identity_norm_state(self.bn).items()})
        state.update({f'dynamic.{k}': v for k, v in self.dynamic.upcycled_state(
            target / spatial_gain, generator=generator, perturbation=perturbation, cond=guide).items()})
        return state

    def extra_repr(self) -> str:
        return f'{self.channels}, intrinsic={self.num_intrinsic}, kernel_size={self.kernel_size}'


@register_notrace_module
class StaticStripConv(nn.Module):
    """Asymmetric static conv of Eq. 8: ``BN(Conv_{k_s x 1}(X))`` or ``BN(Conv_{1 x k_s}(X))``, ``c -> c``.

    dynzoo's choice: dense (groups=1, which reproduces the paper's parameter deltas), no bias, BN, no activation.
    "Shared weights" in the paper is the ordinary weight sharing of a static conv, not tying between the two strips.
    ``reparameterize()`` folds the BN into the strip kernel and a bias (same ``k_s x 1`` / ``1 x k_s`` shape);
    ``inference_mode=True`` builds that form.
    """

    def __init__(self, channels: int, kernel_size: Tuple[int, int], inference_mode: bool = False, device=None,
                 dtype=None):
        super().__init__()
        kernel_size = to_2tuple(kernel_size)
        if min(kernel_size) != 1 or max(kernel_size) % 2 == 0:
            raise ValueError(f'a strip kernel is (k, 1) or (1, k) with odd k, got {kernel_size}')
        dd = {'device': device, 'dtype': dtype}
        self.channels = channels
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=(kernel_size[0] // 2, kernel_size[1] // 2),
                              bias=inference_mode, **dd)
        self.bn = nn.Identity() if inference_mode else nn.BatchNorm2d(channels, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """``W' = s W``, ``b' = t`` (exact, from the running statistics, any mode)."""
        if is_batchnorm(self.bn):
            self.conv = fuse_conv_bn(self.conv, self.bn)
            self.bn = nn.Identity()


def sgdm_num_params(
        channels: int,
        split_ratio: float = 0.25,
        razor_ratio: float = 0.5,
        num_kernels: int = 4,
        kernel_size: int = 3,
        static_kernel: int = 9,
        spatial_kernel: int = 15,
) -> int:
    """Closed-form parameter count of an :class:`SGDM` (training form), term by term from the blocks above."""
    c = int(split_ratio * channels)
    c_i = int(razor_ratio * c)
    return (2 * (static_kernel * c * c + 2 * c)                    # two dense strips + their BNs
            + num_kernels * kernel_size ** 2 * c_i * c_i             # experts
            + c_i * num_kernels + num_kernels                        # routing FC
            + 2 * c_i                                                # dynamic-conv BN
            + 2 * (spatial_kernel * c_i + c_i))                      # depthwise H/W strips with bias


@register_notrace_module
class SGDM(nn.Module):
    """Static-Guided Dynamic Module (§3.4, Eq. 8-10): a channel-preserving, plug-and-play layer.

    ``X_rd, X_h, X_w, X_id = split(X, [c, c, c, C - 3c])`` with ``c = int(split_ratio * C)``;
    ``X'_rd = RDConv(X_rd; S)``, ``X'_h = BN(Conv_{k_s x 1} X_h)``, ``X'_w = BN(Conv_{1 x k_s} X_w)``, ``X'_id = X_id``;
    ``SGDM(X) = Cat(X'_rd, X'_h, X'_w, X'_id)`` (Eq. 9, its second ``X'_h`` read as ``X'_w``), where the guide
    ``S = psi(W_h[:c_i, :c_i]) + psi(W_w[:c_i, :c_i])`` multiplies RDConv's dynamic kernel (Eq. 10).

    Defaults are the paper's: ``split_ratio`` 0.25 (Table 8), ``razor_ratio`` 0.5 (Table 6), ``num_kernels`` 4,
    ``kernel_size`` (k_d) 3, ``static_kernel`` (k_s) 9 = k_d^2 (required by ``psi``), ``spatial_kernel`` 15
    (Table 7; a separate parameter from ``static_kernel``). Every other choice is listed in the module docstring of
    :mod:`dynzoo.layers.sgdm`.

    Inference form: ``reparameterize()`` stores ``S``, computed from the raw strip kernels, as the buffer ``guide``
    (``None`` in the training form, where ``S`` follows the live kernels); the strips and RDConv fold their BNs
    themselves afterwards (a parent is visited first). ``inference_mode=True`` builds that form directly.
    """

    def __init__(
            self,
            channels: int,
            split_ratio: float = 0.25,
            razor_ratio: float = 0.5,
            num_kernels: int = 4,
            kernel_size: int = 3,
            static_kernel: int = 9,
            spatial_kernel: int = 15,
            strategy: str = 'auto',
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if not 0.0 < split_ratio <= 1.0 / 3.0:
            raise ValueError(f'split_ratio must be in (0, 1/3] (split [r, r, r, 1 - 3r]), got {split_ratio}')
        if static_kernel != kernel_size * kernel_size:
            raise ValueError(
                f'static_kernel ({static_kernel}) must equal kernel_size^2 ({kernel_size}^2) so that psi can reshape '
                'the strip kernels into the dynamic kernel (Eq. 10)')
        split = int(split_ratio * channels)
        if split < 1:
            raise ValueError(f'split_ratio={split_ratio} gives no channel per branch out of {channels}')
        dd = {'device': device, 'dtype': dtype}
        self.channels = channels
        self.split_channels = split
        self.split_sizes: List[int] = [split, split, split, channels - 3 * split]
        self.kernel_size = kernel_size
        self.rdconv = RDConv2d(split, kernel_size, razor_ratio, num_kernels, spatial_kernel, strategy=strategy,
                               inference_mode=inference_mode, **dd)
        self.num_intrinsic = self.rdconv.num_intrinsic
        self.conv_h = StaticStripConv(split, (static_kernel, 1), inference_mode=inference_mode, **dd)
        self.conv_w = StaticStripConv(split, (1, static_kernel), inference_mode=inference_mode, **dd)
        guide_shape = (self.num_intrinsic, self.num_intrinsic, kernel_size, kernel_size)
        self.register_buffer('guide', torch.zeros(guide_shape, **dd) if inference_mode else None)

    def static_guide(self) -> torch.Tensor:
        """Eq. 10's ``psi(W_h) + psi(W_w)`` from the live strip kernels (gradients flow to both strips)."""
        return static_guide(self.conv_h.conv.weight, self.conv_w.conv.weight, self.num_intrinsic, self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f'SGDM expects (B, {self.channels}, H, W), got shape {x.shape}')
        x_rd, x_h, x_w, x_id = torch.split(x, self.split_sizes, dim=1)
        guide: Optional[torch.Tensor] = self.guide
        if guide is None:
            guide = self.static_guide()
        return torch.cat([self.rdconv(x_rd, guide), self.conv_h(x_h), self.conv_w(x_w), x_id], dim=1)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Store the guide from the raw strip kernels (before the strips fold their BNs). Idempotent."""
        if self.guide is not None:
            return
        if not (is_batchnorm(self.conv_h.bn) and is_batchnorm(self.conv_w.bn)):
            raise RuntimeError(
                'the static strips of this SGDM were folded before the SGDM, which changed the kernels the guide is '
                'built from; reparameterize the SGDM first (timm.utils.reparameterize_model visits it first)')
        self.guide = self.static_guide().detach().clone()

    @torch.no_grad()
    def identity_state(self, generator: Optional[torch.Generator] = None,
                       perturbation: float = 0.1) -> Dict[str, torch.Tensor]:
        """This module's state dict (its own keys) for which ``SGDM(X) = X`` in eval, so that inserting it into a
        static network keeps the network's function (upcycling, :mod:`dynzoo.models._upcycle`); the module is left
        unchanged. Each static strip is the centre-tap identity with an identity BN, which makes the guide ``S``
        twice the centre-tap identity on the intrinsic channels, and RDConv passes its channels through
        (:meth:`RDConv2d.identity_state`); its experts are trainable and differ, masked by ``S`` outside the
        centre taps until the strips move."""
        state: Dict[str, torch.Tensor] = {}
        for name in ('conv_h', 'conv_w'):
            strip = getattr(self, name)
            conv = strip.conv
            state[f'{name}.conv.weight'] = _centre_identity(
                self.split_channels, conv.kernel_size, conv.weight.dtype, conv.weight.device)
            if conv.bias is not None:
                state[f'{name}.conv.bias'] = torch.zeros_like(conv.bias)
            state.update({f'{name}.bn.{k}': v for k, v in _identity_norm_state(strip.bn).items()})
        guide = static_guide(state['conv_h.conv.weight'], state['conv_w.conv.weight'], self.num_intrinsic,
                             self.kernel_size)
        if self.guide is not None:
            state['guide'] = guide.clone()
        state.update({f'rdconv.{k}': v for k, v in self.rdconv.identity_state(guide, generator, perturbation).items()})
        return state

    def extra_repr(self) -> str:
        return f'{self.channels}, split={self.split_sizes}, intrinsic={self.num_intrinsic}'
