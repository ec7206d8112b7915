"""Dynamic Mobile-Former (DMF): ``dmf_xxs``, ``dmf_xs``, ``dmf_s``.

Paper: S. Yun, Y. Ro, "Dynamic Mobile-Former: Strengthening Dynamic Convolution with Attention and Residual
Connection in Kernel Space" (official code github.com/ysj9909/DMF, no licence: nothing of it is copied here; the
layout below follows the paper and, where the paper is silent or differs, the authors' ``dmf_final.py``).

A DMF network keeps a local path (CNN feature maps) and ``M = 6`` global tokens of width ``d = 192``. Each of the
11 DMF blocks (§3.1-§3.2, Fig. 2) runs, in the authors' order::

    tokens = Mobile->Former(x, tokens)      # lightweight cross-attention, tokens attend to the block input (Eq. 3-5)
    tokens = Former(tokens)                  # pre-norm self-attention over the 6 tokens + MLP (ratio 2)
    x      = DY-Mobile(x, tokens[:, 0])      # [stride-2 dwconv] -> DYR-1x1 (G groups) -> DYR-dw3x3 -> DYR-1x1
    x      = x + DropPath(IRFFN(GroupNorm(x)))   # Eq. 6 with GRN

There is no Former->Mobile cross-attention: global information reaches the local path only through the kernel
attention of every dynamic residual conv (the first token ``z`` is concatenated with the pooled input, Fig. 3).
The stem is a stride-2 3x3 conv, stage 1 a pw-dw-pw "lite bottleneck"; after the last block a final
Mobile->Former + Former updates the tokens, a DYR-1x1 conv widens the map and the head classifies
``[GAP(x) ; z]`` with ``fc1 -> Hardswish -> dropout -> fc2``.

Decisions the paper leaves open (all from the authors' code): the Former has ``d // 32 = 6`` heads (Table 1
says 8); the Mobile->Former head dim is ``C_in / H`` with ``q: d -> C_in`` and ``out: C_in -> d`` projections and its
residual adds the *normalised* tokens; a pre-norm ``GroupNorm(1, C)`` before the IRFFN; no residual around DY-Mobile
or the lite bottleneck; GRN in the authors' "compat" form (it averages over a size-1 dim, so it is a per-channel
affine map; ``grn_compat=False`` gives ConvNeXt-V2's GRN); IRFFN width ``int(C * R)`` (truncation); the 0.1 expert
scale of the DYR convs.

timm integration: ``forward_features`` returns ``(B, C_final + d, H, W)``, the local map with the first token
broadcast over the grid as ``d`` extra channels, so that the head's global pooling yields the paper's "pool & concat"
``[GAP(x) ; z]`` and every timm API (``global_pool=''``, ``num_features``) stays a single tensor.
``forward_intermediates`` / ``features_only`` give the maps after the lite bottleneck and blocks 1, 3, 7, 10
(strides 2, 4, 8, 16, 32; the detectors use the last four). ``frozen_blocks=4`` freezes DMF blocks 0-3 as the
authors' detection setting (mmdet ``frozen_stages=1``) does; it is a training setting (``train()`` keeps those
blocks in eval mode), not a form of the network.

Kernel-attention temperature: the authors anneal it 30 -> 1 over the first 10 epochs, counting iterations from 1,
so at the 0-based optimizer step ``s`` it is ``dynzoo.linear_temperature(s + 1, steps_per_epoch)``; inference uses
1 (:meth:`DynamicMobileFormer.net_update_temperature`, ``dynzoo.set_temperature``).

Inference form (timm's ``reparameterize_model`` / ``dynzoo.reparameterize``, or built directly with
``inference_mode=True``): every module folds its own BatchNorms -- static convs (stem, downsampling, lite bottleneck,
IRFFN) into their kernels, DY-Mobile's and the final block's into their DYR convs' kernel banks -- the IRFFN its
depthwise shortcut and the authors' GRN, and each kernel attention its BN; the per-sample kernels stay dynamic.
"""
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import (
    Attention, DropPath, Mlp, SelectAdaptivePool2d, register_notrace_function, trunc_normal_,
)
from timm.layers.grn import GlobalResponseNorm
from timm.models import register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint

from dynzoo.layers.conv_norm import RepConvNormAct, fold_conv_norm
from dynzoo.layers.drconv import DynamicResidualConv2d
from dynzoo.layers.fusion import fold_affine_into_conv_
from dynzoo.layers.temperature import set_temperature
from . import _hub as hub
from ._builder import build_dynzoo_model, dynzoo_cfg, generate_dynzoo_cfgs, register_family, register_model_info

__all__ = [
    'DynamicMobileFormer', 'DMFBlock', 'DMFFinalBlock', 'DynamicMobile', 'InvertedResidualFFN', 'LiteBottleneck',
    'CompatGlobalResponseNorm', 'checkpoint_filter_fn',
]

register_family(
    'dmf', paper='Dynamic Mobile-Former: Strengthening Dynamic Convolution with Attention and Residual Connection '
                 'in Kernel Space (Yun & Ro)',
    paper_ids='github.com/ysj9909/DMF', temperature_schedule='dmf')


# ---------------------------------------------------------------------------------------------------- fusion helpers

def _norm(num_features: int, inference_mode: bool, dd: Dict[str, Any]) -> nn.Module:
    """A conv's BatchNorm, or in the inference form the ``nn.Identity`` it is folded into."""
    return nn.Identity() if inference_mode else nn.BatchNorm2d(num_features, **dd)


def _fold_conv_bn_pairs(module: nn.Module, pairs: Tuple[Tuple[str, str], ...]) -> None:
    """Fold each ``(conv, bn)`` attribute pair of ``module`` that still holds a BatchNorm (see ``fold_conv_norm``)."""
    for conv_name, bn_name in pairs:
        fold_conv_norm(module, conv_name, bn_name)


# ------------------------------------------------------------------------------------------------------------ blocks

class LiteBottleneck(nn.Module):
    """Stage 1 "bneck-lite" (§3.6, Table 1; the authors' ``dmf_final.py``): ``pw -> BN -> GELU -> dw3x3 -> BN ->
    GELU -> pw -> BN``, no residual. Inference form: each BN folded into its conv (which gains a bias)."""

    def __init__(self, in_chs: int, hidden_chs: int, out_chs: int, inference_mode: bool = False,
                 device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.pw_conv1 = nn.Conv2d(in_chs, hidden_chs, 1, bias=inference_mode, **dd)
        self.bn1 = _norm(hidden_chs, inference_mode, dd)
        self.dw_conv = nn.Conv2d(hidden_chs, hidden_chs, 3, 1, 1, groups=hidden_chs, bias=inference_mode, **dd)
        self.bn2 = _norm(hidden_chs, inference_mode, dd)
        self.pw_conv2 = nn.Conv2d(hidden_chs, out_chs, 1, bias=inference_mode, **dd)
        self.bn3 = _norm(out_chs, inference_mode, dd)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.pw_conv1(x)))
        x = self.act(self.bn2(self.dw_conv(x)))
        return self.bn3(self.pw_conv2(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the three BatchNorms into their convs (exact); a no-op once folded."""
        _fold_conv_bn_pairs(self, (('pw_conv1', 'bn1'), ('dw_conv', 'bn2'), ('pw_conv2', 'bn3')))


class CompatGlobalResponseNorm(GlobalResponseNorm):
    """The authors' GRN (their ``compat`` code path): timm's NCHW ``GlobalResponseNorm`` whose response is
    normalised over the trailing dim of ``g = ||x||_2`` (H, W), which has size 1.

    The authors average ``g`` over ``dim=-1`` of the ``(B, C, 1, 1)`` norm map, so ``n = g / (g + eps)`` and GRN is
    the per-channel affine map ``(1 + gamma) x + beta`` up to ``|gamma| * eps``; ConvNeXt-V2's GRN (timm's, the
    ``grn_compat=False`` choice) averages over the channels instead. Parameters are timm's ``weight`` / ``bias``
    ``(C,)``, the authors' ``gamma`` / ``beta`` ``(1, C, 1, 1)`` (:func:`checkpoint_filter_fn` maps them).
    """

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__(dim, eps=eps, channels_last=False, device=device, dtype=dtype)
        self.channel_dim = -1


class InvertedResidualFFN(nn.Module):
    """IRFFN (§3.5, Eq. 6): ``pw(C->F) -> BN -> GELU -> [v + dw3x3(v)] -> GRN -> GELU -> pw(F->C) -> BN``.

    The 1x1 convs are dense (they mix DY-Mobile's channel groups); no conv has a bias. Inference form
    (``inference_mode=True`` or :meth:`reparameterize`): BNs folded into the 1x1 convs, and the shortcut around the
    depthwise conv folded into its centre tap (RepVGG, Ding et al. 2021, §3.3) as ``dw_reparam``, which also takes
    the authors' GRN (an affine map up to ``|gamma| * 1e-6``, :class:`CompatGlobalResponseNorm`); ConvNeXt-V2's GRN
    stays.
    """

    def __init__(self, dim: int, hidden: int, grn_compat: bool = True, inference_mode: bool = False,
                 device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.pw_conv1 = nn.Conv2d(dim, hidden, 1, bias=inference_mode, **dd)
        self.bn1 = _norm(hidden, inference_mode, dd)
        # both registered, in this order, in either form (the other one None)
        dw_conv = partial(nn.Conv2d, hidden, hidden, 3, 1, 1, groups=hidden, **dd)
        self.register_module('dw_conv', None if inference_mode else dw_conv(bias=False))
        self.register_module('dw_reparam', dw_conv(bias=True) if inference_mode else None)
        if not grn_compat:
            self.grn = GlobalResponseNorm(hidden, eps=1e-6, channels_last=False, **dd)
        else:
            self.grn = nn.Identity() if inference_mode else CompatGlobalResponseNorm(hidden, **dd)
        self.pw_conv2 = nn.Conv2d(hidden, dim, 1, bias=inference_mode, **dd)
        self.bn3 = _norm(dim, inference_mode, dd)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.pw_conv1(x)))
        if self.dw_reparam is not None:
            x = self.dw_reparam(x)
        else:
            x = x + self.dw_conv(x)
        x = self.act(self.grn(x))
        return self.bn3(self.pw_conv2(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """``pw1' -> GELU -> dw' -> [GRN] -> GELU -> pw2'`` (see the class docstring); a no-op once folded."""
        _fold_conv_bn_pairs(self, (('pw_conv1', 'bn1'), ('pw_conv2', 'bn3')))
        if self.dw_conv is None:
            return
        dw = self.dw_conv
        fused = nn.Conv2d(dw.in_channels, dw.out_channels, 3, 1, 1, groups=dw.groups, bias=True,
                          device=dw.weight.device, dtype=dw.weight.dtype)
        fused.weight.copy_(dw.weight)
        fused.weight[:, 0, 1, 1] += 1.0  # v + dw(v): the identity is the centre tap of a depthwise kernel
        fused.bias.zero_()
        if isinstance(self.grn, CompatGlobalResponseNorm):
            fold_affine_into_conv_(fused, 1.0 + self.grn.weight, self.grn.bias)
            self.grn = nn.Identity()
        self.dw_reparam = fused.train(dw.training)
        self.dw_conv = None


class DynamicMobile(nn.Module):
    """DY-Mobile (§3.3, Fig. 3): ``[dw3x3 s2 -> BN -> GELU] -> DYR-1x1 (G groups) -> BN -> GELU -> DYR-dw3x3
    -> BN -> GELU -> DYR-1x1 (G groups) -> BN``; the three DYR convs share the token ``z``. No residual.

    Inference form: each BN folded into its DYR conv's kernel bank (``fuse_bn``; the shift goes to the conv's
    ``post_bias``), the per-sample kernel stays dynamic; the stride-2 ``downsample`` folds its own BN.
    """

    def __init__(
            self,
            in_chs: int,
            hidden_chs: int,
            out_chs: int,
            stride: int = 1,
            groups: int = 1,
            dyr_layer=DynamicResidualConv2d,
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if stride not in (1, 2):
            raise ValueError(f'DY-Mobile stride must be 1 or 2, got {stride}')
        self.downsample = RepConvNormAct(
            in_chs, in_chs, 3, stride=2, groups=in_chs, bias=True, act_layer=nn.GELU, inference_mode=inference_mode,
            **dd) if stride == 2 else None
        dyr_layer = partial(dyr_layer, inference_mode=inference_mode, post_bias=inference_mode, **dd)
        self.pw_conv1 = dyr_layer(in_chs, hidden_chs, 1, groups=groups)
        self.bn1 = _norm(hidden_chs, inference_mode, dd)
        self.dw_conv = dyr_layer(hidden_chs, hidden_chs, 3, groups=hidden_chs)
        self.bn2 = _norm(hidden_chs, inference_mode, dd)
        self.pw_conv2 = dyr_layer(hidden_chs, out_chs, 1, groups=groups)
        self.bn3 = _norm(out_chs, inference_mode, dd)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        x = self.act(self.bn1(self.pw_conv1(x, z)))
        x = self.act(self.bn2(self.dw_conv(x, z)))
        return self.bn3(self.pw_conv2(x, z))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold each BatchNorm into its DYR conv's kernel bank (exact); a no-op once folded."""
        _fold_conv_bn_pairs(self, (('pw_conv1', 'bn1'), ('dw_conv', 'bn2'), ('pw_conv2', 'bn3')))


class MobileToFormer(nn.Module):
    """Mobile->Former lightweight cross-attention (§3.4, Eq. 3-5): the ``M`` tokens query the raw pixels.

    ``t = LN(tokens)``; ``q = W_q t`` (``d -> C``, no bias) split into ``H`` heads of ``C / H``; keys = values = the
    pixels of ``x`` (no ``W^K``, ``W^V``), channel ``c`` in head ``c // (C / H)``; ``out = t + DropPath(drop(W_o o))``
    with ``W_o: C -> d`` (no bias) -- the residual adds the normalised tokens (authors' code).
    """

    def __init__(self, dim: int, token_dim: int = 192, num_heads: int = 2, drop: float = 0., drop_path: float = 0.,
                 device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'Mobile->Former: {dim} local channels do not split into {num_heads} heads')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(token_dim, **dd)
        self.q = nn.Linear(token_dim, dim, bias=False, **dd)
        self.fc = nn.Linear(dim, token_dim, bias=False, **dd)
        self.drop = nn.Dropout(drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        batch, chs, height, width = x.shape
        num_tokens = tokens.shape[1]
        t = self.norm(tokens)
        q = self.q(t).reshape(batch, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        kv = x.reshape(batch, self.num_heads, self.head_dim, height * width).transpose(2, 3)
        o = F.scaled_dot_product_attention(q, kv, kv)
        o = o.transpose(1, 2).reshape(batch, num_tokens, chs)
        return t + self.drop_path(self.drop(self.fc(o)))


class Former(nn.Module):
    """Former (§3.4): pre-norm Transformer block on the tokens; ``d // 32`` heads, qkv without bias, MLP ratio 2
    with bias-free ``fc1``/``fc2`` (authors' code)."""

    def __init__(self, dim: int = 192, num_heads: Optional[int] = None, mlp_ratio: float = 2., drop: float = 0.,
                 drop_path: float = 0., device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_heads = num_heads or max(1, dim // 32)
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.token_attention = Attention(dim, num_heads, qkv_bias=False, proj_bias=True, proj_drop=drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, bias=False, drop=drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.drop_path1(self.token_attention(self.norm1(tokens)))
        return tokens + self.drop_path2(self.mlp(self.norm2(tokens)))


class DMFBlock(nn.Module):
    """One "DMF block(H, G, R)" of Table 1 (§3.2, Fig. 2); ``forward(x, tokens) -> (x, tokens)``.

    The pre-norm ``GroupNorm(1, C)`` before the IRFFN is the authors' and stays in the inference form (it
    normalises each sample; its affine is this block's and the conv after it the IRFFN's).
    """

    def __init__(
            self,
            in_chs: int,
            hidden_chs: int,
            out_chs: int,
            stride: int = 1,
            num_heads: int = 2,
            groups: int = 1,
            ffn_ratio: float = 2.,
            token_dim: int = 192,
            former_mlp_ratio: float = 2.,
            drop: float = 0.,
            drop_path: float = 0.,
            grn_compat: bool = True,
            dyr_layer=DynamicResidualConv2d,
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.mobile2former = MobileToFormer(in_chs, token_dim, num_heads, drop, drop_path, **dd)
        self.former = Former(token_dim, None, former_mlp_ratio, drop, drop_path, **dd)
        self.dynamic_mobile = DynamicMobile(
            in_chs, hidden_chs, out_chs, stride, groups, dyr_layer, inference_mode=inference_mode, **dd)
        self.norm = nn.GroupNorm(1, out_chs, **dd)
        self.ffn = InvertedResidualFFN(
            out_chs, int(out_chs * ffn_ratio), grn_compat, inference_mode=inference_mode, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        tokens = self.mobile2former(x, tokens)
        tokens = self.former(tokens)
        x = self.dynamic_mobile(x, tokens[:, 0])
        x = x + self.drop_path(self.ffn(self.norm(x)))
        return x, tokens


class DMFFinalBlock(nn.Module):
    """After the last block (Table 1's last rows; the authors' ``dmf_final.py``): Mobile->Former and Former update
    the tokens, then ``GELU(BN(DYR-1x1(x, z)))`` widens the map (the authors' ``end_mobile2former``,
    ``end_former``, ``channel_conv``, ``bn``). Inference form: the BN folded into the DYR conv's kernel bank."""

    def __init__(self, in_chs: int, out_chs: int, num_heads: int, token_dim: int = 192, former_mlp_ratio: float = 2.,
                 drop: float = 0., drop_path_m2f: float = 0., drop_path_former: float = 0.,
                 dyr_layer=DynamicResidualConv2d, inference_mode: bool = False, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.mobile2former = MobileToFormer(in_chs, token_dim, num_heads, drop, drop_path_m2f, **dd)
        self.former = Former(token_dim, None, former_mlp_ratio, drop, drop_path_former, **dd)
        self.conv = dyr_layer(in_chs, out_chs, 1, inference_mode=inference_mode, post_bias=inference_mode, **dd)
        self.bn = _norm(out_chs, inference_mode, dd)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        tokens = self.former(self.mobile2former(x, tokens))
        x = self.act(self.bn(self.conv(x, tokens[:, 0])))
        return x, tokens

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the BatchNorm into the DYR conv's kernel bank (exact); a no-op once folded."""
        fold_conv_norm(self, 'conv', 'bn')


class DMFHead(nn.Module):
    """"Pool & concat, FC1, FC2" (Table 1): ``fc2(drop(Hardswish(fc1([pool(x) ; z]))))``.

    ``features`` is ``forward_features``' map whose last ``token_dim`` channels are the token ``z`` broadcast over
    the grid: the head pools the first ``in_features - token_dim`` channels and reads ``z`` back from one position
    (any pooling of a constant map is that constant; this keeps ``z`` bit-exact and skips pooling it).
    ``hidden_size=0`` (a pruned model's head) drops ``fc1``. ``pool_type=''`` runs the head at every position of
    the unpooled map (``fc1``/``fc2`` act on each position's ``[x_hw ; z]``, as timm's MLP heads do with 1x1 convs),
    so a pruned head with no classes returns the map itself. Concat pooling is refused when ``fc1`` is present
    (its input width is fixed).
    """

    def __init__(self, in_features: int, hidden_size: int, num_classes: int = 1000, pool_type: str = 'avg',
                 drop_rate: float = 0., token_dim: int = 0, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if not 0 <= token_dim < in_features:
            raise ValueError(f'token_dim ({token_dim}) must be in [0, in_features={in_features})')
        self.in_features = in_features
        self.hidden_size = hidden_size
        self.token_dim = token_dim
        self.drop_rate = drop_rate
        self._check(num_classes, pool_type)
        self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=True)
        self.use_pool = bool(pool_type)
        if hidden_size > 0:
            self.fc1 = nn.Linear(in_features, hidden_size, **dd)
            self.act = nn.Hardswish()
        else:
            self.fc1 = nn.Identity()
            self.act = nn.Identity()
        self.drop = nn.Dropout(drop_rate)
        self.num_classes = num_classes
        self.fc2 = nn.Linear(self.pre_logits_size(), num_classes, **dd) if num_classes > 0 else nn.Identity()

    def pre_logits_size(self) -> int:
        if self.hidden_size > 0:
            return self.hidden_size
        return (self.in_features - self.token_dim) * self.global_pool.feat_mult() + self.token_dim

    def _check(self, num_classes: int, pool_type: str) -> None:
        assert pool_type in ('', 'avg', 'max', 'avgmax', 'fast', 'catavgmax'), f'unknown pool type {pool_type!r}'
        assert pool_type != 'catavgmax' or self.hidden_size == 0, \
            'DMF head: concat pooling would change the width fc1 takes (num_features); use avg / max / avgmax'

    def reset(self, num_classes: int, pool_type: Optional[str] = None, device=None, dtype=None) -> None:
        if pool_type is None:
            pool_type = self.global_pool.pool_type
        self._check(num_classes, pool_type)
        self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=True)
        self.use_pool = bool(pool_type)
        self.num_classes = num_classes
        self.fc2 = nn.Linear(self.pre_logits_size(), num_classes, device=device, dtype=dtype) \
            if num_classes > 0 else nn.Identity()
        self.train(self.training)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if not self.use_pool:  # the MLP at every position, channels last
            x = self.drop(self.act(self.fc1(x.permute(0, 2, 3, 1))))
            if not pre_logits:
                x = self.fc2(x)
            return x.permute(0, 3, 1, 2)
        if self.token_dim > 0:
            chs = x.shape[1] - self.token_dim
            x = torch.cat([self.global_pool(x[:, :chs]), x[:, chs:, 0, 0]], dim=1)
        else:
            x = self.global_pool(x)
        x = self.drop(self.act(self.fc1(x)))
        if pre_logits:
            return x
        return self.fc2(x)


# ------------------------------------------------------------------------------------------------------------- model

@register_notrace_function
def check_image_input(x: torch.Tensor) -> None:
    """A clear error for non-image input (an FX leaf: torch.fx only wraps public module-level functions)."""
    if x.dim() != 4:
        raise ValueError(f'DynamicMobileFormer expects a 4-D input (B, C, H, W), got shape {tuple(x.shape)}')


BlockCfg = Tuple[int, int, int, int]  # (out_chs, hidden_chs, stride, mobile->former heads)


class DynamicMobileFormer(nn.Module):
    """Dynamic Mobile-Former (§3, Table 1). ``block_cfgs``: per DMF block ``(C_out, hidden E, stride, M2F heads)``."""

    def __init__(
            self,
            block_cfgs: Tuple[BlockCfg, ...],
            stem_chs: int = 24,
            lite_chs: Tuple[int, int] = (48, 24),
            groups: int = 4,
            ffn_ratio: float = 2.7,
            final_chs: int = 1440,
            head_hidden_size: int = 1920,
            num_tokens: int = 6,
            token_dim: int = 192,
            num_kernels: int = 8,
            former_mlp_ratio: float = 2.,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            grn_compat: bool = True,
            kernel_temperature: float = 1.0,
            single_sample_bn: str = 'running',
            dyr_strategy: str = 'auto',
            frozen_blocks: int = 0,
            dyr_kwargs: Optional[Dict[str, Any]] = None,
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        """
        Args (beyond timm's): ``groups`` G of DY-Mobile's 1x1 DYR convs, ``ffn_ratio`` R of the IRFFN,
        ``final_chs`` width of the final DYR-1x1, ``head_hidden_size`` FC1, ``num_kernels`` K experts per DYR conv,
        ``grn_compat`` the authors' GRN (see :class:`CompatGlobalResponseNorm`), ``kernel_temperature`` initial
        temperature of every kernel attention (1 = inference; training anneals 30 -> 1, see the module docstring),
        ``single_sample_bn`` batch-1 training behaviour of the kernel-attention BN (``'running'`` or ``'error'``),
        ``dyr_strategy`` the dynamic-conv execution strategy, ``frozen_blocks`` number of leading DMF blocks frozen
        (parameters and BN statistics; the authors' detection setting is 4), ``dyr_kwargs`` extra arguments of every
        :class:`~dynzoo.layers.drconv.DynamicResidualConv2d` (the paper's ablations, e.g. Table 3 "AFKA off":
        ``dict(token_dim=0, attn_hidden=30)``, "RCKS off": ``dict(agnostic_kernel=False)``; Table 6: ``gate``),
        ``inference_mode`` the inference form built directly (the state-dict keys reparameterizing leaves).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if not block_cfgs:
            raise ValueError('DMF needs at least one block')
        if not 0 <= frozen_blocks <= len(block_cfgs):
            raise ValueError(f'frozen_blocks must be in [0, {len(block_cfgs)}], got {frozen_blocks}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.token_dim = token_dim
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.frozen_blocks = frozen_blocks
        dyr_args = dict(
            num_kernels=num_kernels, token_dim=token_dim, temperature=kernel_temperature,
            single_sample_bn=single_sample_bn, strategy=dyr_strategy)
        dyr_args.update(dyr_kwargs or {})
        dyr_layer = partial(DynamicResidualConv2d, **dyr_args)

        self.tokens = nn.Parameter(torch.randn(1, num_tokens, token_dim, **dd))
        self.stem = RepConvNormAct(
            in_chans, stem_chs, 3, stride=2, bias=True, act_layer=nn.GELU, inference_mode=inference_mode, **dd)
        self.lite_bottleneck = LiteBottleneck(stem_chs, lite_chs[0], lite_chs[1], inference_mode=inference_mode, **dd)
        self.feature_info = [dict(num_chs=lite_chs[1], reduction=2, module='lite_bottleneck')]

        dpr = torch.linspace(0, drop_path_rate, len(block_cfgs) + 2, device='cpu').tolist()
        blocks = []
        in_chs = lite_chs[1]
        for i, (out_chs, hidden_chs, stride, heads) in enumerate(block_cfgs):
            blocks.append(DMFBlock(
                in_chs, hidden_chs, out_chs, stride, heads, groups, ffn_ratio, token_dim, former_mlp_ratio,
                drop_rate, dpr[i], grn_compat, dyr_layer, inference_mode=inference_mode, **dd))
            in_chs = out_chs
        self.blocks = nn.ModuleList(blocks)
        # feature taps: the last block before each downsampling and the last block (blocks 1, 3, 7, 10 in DMF)
        self.tap_blocks: List[int] = [
            i for i in range(len(block_cfgs)) if i == len(block_cfgs) - 1 or block_cfgs[i + 1][2] > 1]
        reduction = 2
        for i, (out_chs, _, stride, _) in enumerate(block_cfgs):
            reduction *= stride
            if i in self.tap_blocks:
                self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'blocks.{i}'))

        self.final_block = DMFFinalBlock(
            in_chs, final_chs, block_cfgs[-1][3], token_dim, former_mlp_ratio, drop_rate, dpr[-2], dpr[-1],
            dyr_layer, inference_mode=inference_mode, **dd)
        self.num_features = final_chs + token_dim
        self.head = DMFHead(
            self.num_features, head_hidden_size, num_classes, global_pool, drop_rate, token_dim=token_dim, **dd)
        self.head_hidden_size = self.head.pre_logits_size()

        self.apply(self._init_weights)
        if frozen_blocks:
            self._freeze_blocks()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Authors' init: Linear trunc-normal(0.02), Conv2d kaiming-normal(fan_out), norms 1/0; the DYR
        kernels, GRN and tokens keep their own init."""
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out')
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------------------- timm API
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^tokens|^stem|^lite_bottleneck',
            blocks=[(r'^blocks\.(\d+)', None), (r'^final_block', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # the authors' optimizer: only 1-D params and biases skip decay (timm's default filter); tokens and DYR
        # kernels decay
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc2

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace ``head.fc2`` only (``fc1`` is part of the pretrained pre-logits); ``num_classes=0`` removes it."""
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, device=self.tokens.device, dtype=self.tokens.dtype)
        self.head_hidden_size = self.head.pre_logits_size()

    @torch.jit.ignore
    def net_update_temperature(self, temperature: float) -> int:
        """The authors' name: set every kernel-attention temperature (the schedule: see the module docstring)."""
        return set_temperature(self, temperature, role='kernel')

    def _freeze_blocks(self) -> None:
        for blk in self.blocks[:self.frozen_blocks]:
            blk.eval()
            for p in blk.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.frozen_blocks:
            for blk in self.blocks[:self.frozen_blocks]:
                blk.eval()
        return self

    # -------------------------------------------------------------------------------------------------- forward
    def _forward_final(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.final_block is not None:
            x, tokens = self.final_block(x, tokens)
            z = tokens[:, 0].reshape(tokens.shape[0], tokens.shape[2], 1, 1)
            x = torch.cat([x, z.expand(-1, -1, x.shape[2], x.shape[3])], dim=1)
        return x

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Feature maps at ``feature_info`` taps (0: lite bottleneck, 1-4: blocks 1, 3, 7, 10); ``norm`` is a
        no-op (DMF has no final norm). Without ``intermediates_only`` also returns ``forward_features``' output."""
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        intermediates: List[torch.Tensor] = []
        if not torch.jit.is_scripting():
            check_image_input(x)
        x = self.lite_bottleneck(self.stem(x))
        if 0 in take_indices:
            intermediates.append(x)
        tokens = self.tokens.expand(x.shape[0], -1, -1)
        last_block = len(self.blocks) - 1
        if stop_early and not torch.jit.is_scripting():
            last_block = self.tap_blocks[max_index - 1] if max_index > 0 else -1
        for i, blk in enumerate(self.blocks):
            if i > last_block:
                break
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x, tokens = checkpoint(blk, x, tokens)
            else:
                x, tokens = blk(x, tokens)
            if i in self.tap_blocks and self.tap_blocks.index(i) + 1 in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        if last_block == len(self.blocks) - 1:
            x = self._forward_final(x, tokens)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks after the last tap in ``indices``; with ``prune_head`` (or when blocks go) also the final
        Mobile->Former / Former / DYR-1x1 and the head, as the authors' detection backbone has none of them."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        keep = self.tap_blocks[max_index - 1] + 1 if max_index > 0 else 0
        blocks_pruned = keep < len(self.blocks)
        self.blocks = self.blocks[:keep]
        if prune_head or blocks_pruned:
            self.final_block = None
            self.num_features = self.feature_info[max_index]['num_chs']
            num_classes = 0 if prune_head else self.num_classes
            self.head = DMFHead(
                self.num_features, 0, num_classes, '' if prune_head else 'avg', 0. if prune_head else self.drop_rate,
                device=self.tokens.device, dtype=self.tokens.dtype)
            self.head.train(self.training)
            self.num_classes = num_classes
            self.head_hidden_size = self.head.pre_logits_size()
        self.frozen_blocks = min(self.frozen_blocks, keep)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_final + d, H/32, W/32)``: the final map with the first token broadcast as ``d`` extra channels."""
        if not torch.jit.is_scripting():
            check_image_input(x)
        x = self.lite_bottleneck(self.stem(x))
        tokens = self.tokens.expand(x.shape[0], -1, -1)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x, tokens = checkpoint(blk, x, tokens)
            else:
                x, tokens = blk(x, tokens)
        return self._forward_final(x, tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------- checkpoint loading

# authors' key fragments -> dynzoo's
_KEY_MAP = (
    ('.Kernel_Attention.', '.kernel_attention.'),
    ('.downsample.0.', '.downsample.conv.'),
    ('.downsample.1.', '.downsample.bn.'),
)
# the authors' GRN ``gamma`` / ``beta`` (1, C, 1, 1) are timm's GlobalResponseNorm ``weight`` / ``bias`` (C,)
_GRN_MAP = (('.grn.gamma', '.grn.weight'), ('.grn.beta', '.grn.bias'))
_PREFIX_MAP = (
    ('end_mobile2former.', 'final_block.mobile2former.'),
    ('end_former.', 'final_block.former.'),
    ('channel_conv.', 'final_block.conv.'),
    ('bn.', 'final_block.bn.'),
)
# the temperature the authors' released / converted weights run at (the anneal ends at 1, inference uses 1)
AUTHORS_TEMPERATURE = 1.0


def _map_key(key: str) -> str:
    for old, new in _PREFIX_MAP:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    for old, new in _KEY_MAP:
        key = key.replace(old, new)
    for old, new in _GRN_MAP:
        if key.endswith(old):
            key = key[:-len(old)] + new
    return key


def _map_value(key: str, value: torch.Tensor) -> torch.Tensor:
    return value.reshape(-1) if key.endswith(('.grn.weight', '.grn.bias')) else value


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """dynzoo or authors' DMF checkpoint -> dynzoo state dict.

    The authors' training script saves ``{'model': sd, 'model_ema': sd?, 'optimizer': ..., ...}`` and evaluates
    ``model_ema`` when present (their ``main.py``), so the EMA weights are taken when the container has them. Their
    keys are renamed (``Kernel_Attention`` -> ``kernel_attention``, ``downsample.{0,1}`` -> ``downsample.{conv,bn}``,
    the final ``end_mobile2former`` / ``end_former`` / ``channel_conv`` / ``bn`` -> ``final_block.*``, the GRN's
    ``gamma`` / ``beta`` -> ``weight`` / ``bias`` flattened to ``(C,)``; a DDP ``module.`` prefix is dropped) and the
    kernel-attention temperatures their code keeps as plain attributes are added at 1.
    """
    use_ema = isinstance(state_dict, Mapping) and isinstance(state_dict.get('model_ema'), Mapping)
    sd = hub.strip_prefix(hub.unwrap_checkpoint(state_dict, use_ema=use_ema), 'module.')
    out = {}
    for k, v in sd.items():
        k = _map_key(k)
        out[k] = _map_value(k, v)
    for key in model.state_dict():
        if key.endswith('kernel_attention.temperature') and key not in out:
            out[key] = torch.tensor(AUTHORS_TEMPERATURE)
    return out


# ---------------------------------------------------------------------------------------------------------- builders

# (C_out, E, stride, M2F heads) per block: Table 1 of the paper; XS from the authors' mmdet config.
# Dropout / drop-path default to 0 as in timm; the authors train with drop_rate 0.3 (S), 0.2 (XXS) and
# drop_path_rate 0.1; their XS classifier recipe is not published (dynzoo's choice: 0.3): see
# dynzoo/tools/recipes/dmf_*.yaml.
_S_BLOCKS = (
    (40, 144, 2, 2), (40, 120, 1, 2),
    (72, 240, 2, 2), (72, 216, 1, 2),
    (128, 432, 2, 2), (128, 512, 1, 4), (176, 768, 1, 4), (176, 1056, 1, 4),
    (240, 1056, 2, 4), (240, 1440, 1, 8), (240, 1440, 1, 8),
)
_XS_BLOCKS = (
    (30, 108, 2, 2), (30, 90, 1, 2),
    (54, 180, 2, 2), (54, 162, 1, 2),
    (96, 324, 2, 2), (96, 384, 1, 3), (132, 576, 1, 3), (132, 792, 1, 4),
    (180, 792, 2, 4), (180, 1080, 1, 6), (180, 1080, 1, 6),
)
_XXS_BLOCKS = (
    (20, 72, 2, 2), (20, 60, 1, 2),
    (36, 120, 2, 2), (36, 108, 1, 2),
    (64, 216, 2, 2), (64, 256, 1, 2), (88, 384, 1, 2), (88, 528, 1, 4),
    (120, 528, 2, 4), (120, 720, 1, 4), (120, 720, 1, 4),
)

_MODEL_ARGS = {
    'dmf_s': dict(block_cfgs=_S_BLOCKS, stem_chs=24, lite_chs=(48, 24), groups=4, ffn_ratio=2.7, final_chs=1440,
                  head_hidden_size=1920),
    # XS: stem 16 -> bneck-lite 16 -> 32 -> 18 is intentional (authors' mmdet dmf_285)
    'dmf_xs': dict(block_cfgs=_XS_BLOCKS, stem_chs=16, lite_chs=(32, 18), groups=3, ffn_ratio=2., final_chs=1152,
                   head_hidden_size=1920),
    'dmf_xxs': dict(block_cfgs=_XXS_BLOCKS, stem_chs=12, lite_chs=(24, 12), groups=2, ffn_ratio=3., final_chs=960,
                    head_hidden_size=1600),
}


def _create_dmf(variant: str, pretrained: bool = False, **kwargs) -> DynamicMobileFormer:
    model_args = dict(_MODEL_ARGS[variant], **kwargs)
    return build_dynzoo_model(
        DynamicMobileFormer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3, 4)), **model_args)


def _cfg(**kwargs) -> Dict[str, Any]:
    return dynzoo_cfg(
        first_conv='stem.conv', classifier='head.fc2', crop_pct=0.9, interpolation='bicubic',
        license='unknown', paper_name='Dynamic Mobile-Former (Yun & Ro)', paper_ids='github.com/ysj9909/DMF',
        notes=('the authors say the models are released; their repository lists no download, so none is indexed',
               'crop_pct 0.9 is the authors\' default_cfg; their eval script may use 0.875'),
        **kwargs)


default_cfgs = generate_dynzoo_cfgs({
    'dmf_s.untrained': _cfg(),
    'dmf_xs.untrained': _cfg(),
    'dmf_xxs.untrained': _cfg(),
})

# What the paper states (Table 2): params rounded to 0.1M, FLOPs in M (fvcore; one multiply-add = one FLOP).
register_model_info('dmf_s', 'dmf', paper_params=25_100_000, paper_macs=499e6, paper_top1=79.4,
                    source='Table 1/2 (DMF-S; authors\' dmf_500)')
register_model_info('dmf_xs', 'dmf', paper_params=19_800_000, paper_macs=285e6, paper_top1=77.8,
                    source='Table 1/2 (DMF-XS; authors\' mmdet dmf_285)')
register_model_info('dmf_xxs', 'dmf', paper_params=15_100_000, paper_macs=198e6, paper_top1=76.0,
                    source='Table 1/2 (DMF-XXS; authors\' dmf_198)')


@register_model
def dmf_s(pretrained: bool = False, **kwargs) -> DynamicMobileFormer:
    """DMF-S: 25.1M params, 499M FLOPs, 79.4% top-1 (Table 2); G=4, R=2.7."""
    return _create_dmf('dmf_s', pretrained, **kwargs)


@register_model
def dmf_xs(pretrained: bool = False, **kwargs) -> DynamicMobileFormer:
    """DMF-XS: 19.8M params, 285M FLOPs, 77.8% top-1 (Table 2); G=3, R=2."""
    return _create_dmf('dmf_xs', pretrained, **kwargs)


@register_model
def dmf_xxs(pretrained: bool = False, **kwargs) -> DynamicMobileFormer:
    """DMF-XXS: 15.1M params, 198M FLOPs, 76.0% top-1 (Table 2); G=2, R=3."""
    return _create_dmf('dmf_xxs', pretrained, **kwargs)
