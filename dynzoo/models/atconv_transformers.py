"""ATConv-Swin and ATConv-PVT: ATConv in place of the self-attention of Swin and PVT (Yu et al., "Attentive
Convolution", arXiv:2510.20092, §IV-A, Tab. II and Fig. 4(a); PVT as a detection / segmentation backbone in
Tabs. IV and VI). The paper gives no code for these models; what it leaves open is dynzoo's reading, chosen so the
parameter counts of Tab. II come out at their printed precision (see ``tests/test_atconv_transformers.py``).

ATConv-Swin (``atconv_swin_*``, on timm's ``SwinTransformer``): every (shifted) window attention is ATConv over
the whole stage map (:class:`~dynzoo.layers.atconv_tokens.ATConvSwinBlock`) and every patch merging (LayerNorm +
``Linear(4C -> 2C)``) is AttNet's downsampling unit, a 3x3 stride-2 conv (no bias) + BatchNorm
(:class:`ConvPatchMerging`). A pure attention swap cannot give Tab. II's counts (Swin-T 28.3 M -> 26.1 M, not
28.0 M); with the conv merging it gives 28.04 / 47.56 / 84.16 M. Tab. II's ATConv-Swin rows are then reproduced,
truncated to 0.1 M as the paper prints its figures, once Swin's relative-position-bias tables
(``(2w - 1)^2 * heads`` per block) are counted too: 28.0 / 47.6 / 84.2 / 84.3 M. The B-384 row can only come
from them (it exceeds B-224 by 0.1 M, exactly as Swin-B-384 exceeds Swin-B through its 12x12 windows), so the
paper's counts include tables that ATConv does not use; dynzoo does not carry unused parameters and counts them
beside the model (``swin_relative_position_params``).

ATConv-PVT (``atconv_pvt_*``, on :class:`PyramidVisionTransformerV1`, a PVT v1 host in timm's style -- timm has only
PVT v2, whose overlapping patch embedding, convolutional FFN and linear SRA are not the PVT of Tab. II): every
spatial-reduction attention is token-form ATConv, and, as Tab. II's parameter deltas require (PVT-T 13.2 M ->
10.2 M), the spatial-reduction convs go with the attention, the position embeddings are removed and the class
token is replaced by global average pooling (§IV-A). The host also builds the source PVT v1 (Wang et al., ICCV
2021; code: github.com/whai362/PVT, ``classification/pvt.py``) with ``token_mixer='attention'`` for side-by-side
comparisons (13.2 / 24.5 / 44.2 / 61.4 M parameters, as PVT's paper and code give; Tab. II prints 61.8 M for
PVT-L).

FLOPs (``dynzoo.utils.flops``, ``convention='fvcore'``, eval mode, one 224 / 384 image): conv, linear and matrix
products as MACs, LayerNorm / BatchNorm per element, ATConv's pooling, GELU and DKM free -- the convention of the
AttNet paper's own counts. Tab. II's FLOPs sit next to the computed ones in ``docs/atconv_transformers.md``.

Inference form (``inference_mode=True`` or timm's ``reparameterize_model``): every ATConv switches to its
pool-first context, every conv patch merging folds its BatchNorm (exact).
"""
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import DropPath, Mlp, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.swin_transformer import SwinTransformer

from dynzoo.layers.atconv_tokens import ATConvTokens, swap_attention_for_atconv
from ._builder import build_dynzoo_model, dynzoo_cfg, generate_dynzoo_cfgs, register_model_info
from dynzoo.layers.conv_norm import ConvNormSequential

__all__ = [
    'ConvPatchMerging', 'ATConvSwinTransformer', 'SpatialReductionAttention', 'PvtV1Block', 'PvtV1Stage',
    'PyramidVisionTransformerV1', 'ATCONV_SWIN_CONFIGS', 'ATCONV_PVT_CONFIGS', 'PVT_V1_CONFIGS',
    'swin_relative_position_params',
]


class ConvPatchMerging(nn.Module):
    """Swin's patch merging as AttNet's downsampling unit: ``(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C_out)``
    through a 3x3 stride-2 conv (no bias) + BatchNorm (``reduction.0`` / ``reduction.1``), folded into one biased
    conv in the inference form."""

    def __init__(self, dim: int, out_dim: int, inference_mode: bool = False, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        conv = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1, bias=False, **dd)
        trunc_normal_(conv.weight, std=.02)  # AttNet's init (authors' models/AttNet.py)
        self.reduction = ConvNormSequential(conv, nn.BatchNorm2d(out_dim, **dd), inference_mode=inference_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ATConvSwinTransformer(SwinTransformer):
    """timm's ``SwinTransformer`` with ATConv blocks and conv patch merging (the module docstring's reading).

    Args:
        kernel_size / pool_mode / strategy: of every ATConv (:class:`~dynzoo.layers.ATConv2d`).
        inference_mode: build the inference form (pool-first ATConv, folded patch merging).
        **kwargs: ``SwinTransformer``'s. The window size and heads shape nothing (no attention is left); any input
            size is accepted (``strict_img_size=False``); stochastic depth defaults to 0 as in dynzoo's other models.
    """

    def __init__(
            self,
            kernel_size: int = 3,
            pool_mode: str = '1d',
            strategy: str = 'auto',
            inference_mode: bool = False,
            drop_path_rate: float = 0.,
            strict_img_size: bool = False,
            **kwargs,
    ):
        super().__init__(drop_path_rate=drop_path_rate, strict_img_size=strict_img_size, **kwargs)
        swap_attention_for_atconv(
            self, drop_pos_embed=False, class_token_to_avg_pool=False, kernel_size=kernel_size, pool_mode=pool_mode,
            strategy=strategy, inference_mode=inference_mode)
        for stage in self.layers:
            merge = stage.downsample
            if not isinstance(merge, nn.Identity):
                weight = merge.reduction.weight
                stage.downsample = ConvPatchMerging(
                    merge.dim, merge.out_dim, inference_mode=inference_mode, device=weight.device, dtype=weight.dtype)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """ATConv's ``difference_control`` (the authors' ``no_weight_decay``); norms and biases as timm's optimizer
        factory leaves them."""
        return {n for n, _ in self.named_parameters() if n.endswith('difference_control')}


def swin_relative_position_params(depths: Sequence[int], num_heads: Sequence[int], window_size: int) -> int:
    """Parameters of Swin's relative-position-bias tables, ``(2w - 1)^2 * heads`` per block (Liu et al. 2021,
    §3.2, Eq. 4), which Tab. II's ATConv-Swin counts include (see the module docstring)."""
    return sum(d * (2 * window_size - 1) ** 2 * h for d, h in zip(depths, num_heads))


class SpatialReductionAttention(nn.Module):
    """PVT v1's spatial-reduction attention (Wang et al. 2021, Eq. 3-4; ``Attention`` in ``classification/pvt.py``):
    queries from every token, keys and values from the map reduced by a ``sr x sr`` stride-``sr`` conv + LayerNorm."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            sr_ratio: int = 1,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} must be divisible by num_heads {num_heads}')
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio, **dd) if sr_ratio > 1 else None
        self.norm = nn.LayerNorm(dim, **dd) if sr_ratio > 1 else None

    def forward(self, x: torch.Tensor, feat_size: List[int]) -> torch.Tensor:
        batch, num_tokens, dim = x.shape
        head_dim = dim // self.num_heads
        q = self.q(x).reshape(batch, num_tokens, self.num_heads, head_dim).transpose(1, 2)
        if self.sr is not None and self.norm is not None:
            x = x.transpose(1, 2).reshape(batch, dim, feat_size[0], feat_size[1])
            x = self.norm(self.sr(x).flatten(2).transpose(1, 2))
        k, v = self.kv(x).reshape(batch, -1, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(batch, num_tokens, dim)))


class PvtV1Block(nn.Module):
    """Pre-norm block ``x += DropPath(mixer(LN(x)))``, ``x += DropPath(MLP(LN(x)))``; the mixer is the
    spatial-reduction attention (``'attention'``) or token-form ATConv (``'atconv'``)."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float,
            sr_ratio: int,
            token_mixer: str = 'attention',
            kernel_size: int = 3,
            pool_mode: str = '1d',
            strategy: str = 'auto',
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, **dd)
        if token_mixer == 'attention':
            self.attn = SpatialReductionAttention(
                dim, num_heads, sr_ratio, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        else:
            self.attn = ATConvTokens(
                dim, kernel_size, pool_mode=pool_mode, strategy=strategy, inference_mode=inference_mode, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, feat_size: List[int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), feat_size))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class PvtV1Stage(nn.Module):
    """One PVT v1 stage: non-overlapping patch embedding (``patch x patch`` stride-``patch`` conv + LayerNorm),
    optional class token and position embedding (resampled to other input sizes), blocks.

    ``forward`` takes a ``(B, C_in, H, W)`` map and returns the tokens ``(B, P + h * w, C)`` (``P`` = 1 with the
    class token, first) and the grid ``[h, w]``.
    """

    def __init__(
            self,
            dim_in: int,
            dim: int,
            depth: int,
            patch_size: int,
            grid_size: Tuple[int, int],
            pos_embed: bool = True,
            class_token: bool = False,
            drop_rate: float = 0.,
            drop_path: Sequence[float] = (),
            device=None,
            dtype=None,
            **block_kwargs,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.grid_size = list(grid_size)
        self.num_prefix_tokens = 1 if class_token else 0
        self.proj = nn.Conv2d(dim_in, dim, patch_size, stride=patch_size, **dd)
        self.proj_norm = nn.LayerNorm(dim, **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim, **dd)) if class_token else None
        num_pos = grid_size[0] * grid_size[1] + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, dim, **dd)) if pos_embed else None
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList([
            PvtV1Block(dim, drop_path=drop_path[i] if drop_path else 0., **block_kwargs, **dd) for i in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        x = self.proj(x)
        feat_size = [x.shape[2], x.shape[3]]
        x = self.proj_norm(x.flatten(2).transpose(1, 2))
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            pos_embed = self.pos_embed
            if feat_size != self.grid_size:
                pos_embed = resample_abs_pos_embed(
                    pos_embed, feat_size, self.grid_size, num_prefix_tokens=self.num_prefix_tokens,
                    interpolation='bilinear', antialias=False)
            x = x + pos_embed
        x = self.pos_drop(x)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, feat_size)
            else:
                x = block(x, feat_size)
        return x, feat_size


class PyramidVisionTransformerV1(nn.Module):
    """PVT v1 (Wang et al., "Pyramid Vision Transformer", ICCV 2021, Tab. 1) in timm's style, with the
    spatial-reduction attention or ATConv as token mixer.

    Args:
        img_size: input size the position embeddings are made for (other sizes resample them).
        in_chans / num_classes: input channels, classes (0: no classifier).
        global_pool: ``'token'`` (class token, PVT v1), ``'avg'`` (mean of the grid tokens) or ``''``.
        embed_dims / depths / num_heads / mlp_ratios / sr_ratios: per stage (PVT v1 Tab. 1).
        token_mixer: ``'attention'`` (PVT v1) or ``'atconv'`` (token-form ATConv).
        pos_embed / class_token: PVT v1's absolute position embeddings and class token (last stage).
        kernel_size / pool_mode / strategy: of every ATConv.
        drop_rate / proj_drop_rate / attn_drop_rate / drop_path_rate: dropout on embeddings and head, in the
            MLP and attention projection, in the attention, stochastic depth (linear over all blocks).
        inference_mode: build ATConv's pool-first inference form.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dims: Sequence[int] = (64, 128, 320, 512),
            depths: Sequence[int] = (2, 2, 2, 2),
            num_heads: Sequence[int] = (1, 2, 5, 8),
            mlp_ratios: Sequence[float] = (8, 8, 4, 4),
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
            token_mixer: str = 'attention',
            pos_embed: bool = True,
            class_token: bool = True,
            kernel_size: int = 3,
            pool_mode: str = '1d',
            strategy: str = 'auto',
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        num_stages = len(depths)
        if not num_stages or any(len(v) != num_stages for v in (embed_dims, num_heads, mlp_ratios, sr_ratios)):
            raise ValueError('embed_dims, depths, num_heads, mlp_ratios and sr_ratios need one entry per stage')
        if token_mixer not in ('attention', 'atconv'):
            raise ValueError(f"token_mixer must be 'attention' or 'atconv', got {token_mixer!r}")
        if class_token and token_mixer == 'atconv':
            raise ValueError('ATConv mixes a token grid: no class token (global_pool=\'avg\', as the paper does)')
        if global_pool not in ('token', 'avg', ''):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        if global_pool == 'token' and not class_token:
            raise ValueError("global_pool='token' needs the class token")
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_prefix_tokens = 1 if class_token else 0
        self.grad_checkpointing = False

        img_size = to_2tuple(img_size)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        stages = []
        self.feature_info = []
        dim_in, reduction, cur = in_chans, 1, 0
        for i in range(num_stages):
            patch_size = 4 if i == 0 else 2
            reduction *= patch_size
            stages.append(PvtV1Stage(
                dim_in, embed_dims[i], depths[i], patch_size,
                grid_size=(img_size[0] // reduction, img_size[1] // reduction),
                pos_embed=pos_embed, class_token=class_token and i == num_stages - 1, drop_rate=drop_rate,
                drop_path=dpr[cur:cur + depths[i]], num_heads=num_heads[i], mlp_ratio=mlp_ratios[i],
                sr_ratio=sr_ratios[i], token_mixer=token_mixer, kernel_size=kernel_size, pool_mode=pool_mode,
                strategy=strategy, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                inference_mode=inference_mode, **dd))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f'stages.{i}'))
            dim_in, cur = embed_dims[i], cur + depths[i]
        if class_token and sr_ratios[-1] != 1:
            raise ValueError('the class token needs sr_ratio 1 in the last stage (PVT v1)')
        self.stages = nn.ModuleList(stages)

        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.norm = nn.LayerNorm(self.num_features, eps=1e-6, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """PVT v1's init: trunc-normal(0.02) linears, position embeddings and class token, zero linear biases;
        ATConv its own (trunc-normal(0.02), gamma = 0); convs and norms PyTorch's defaults."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for stage in self.stages:
            for p in (stage.pos_embed, stage.cls_token):
                if p is not None:
                    trunc_normal_(p, std=.02)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stages\.0\.(?:proj|pos_embed)',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^stages\.(\d+)\.(?:proj|pos_embed|cls_token)', (0,)),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The class token (PVT v1's ``no_weight_decay``) and ATConv's ``difference_control``."""
        return {n for n, _ in self.named_parameters() if n.endswith(('cls_token', 'difference_control'))}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool == 'token' and not self.num_prefix_tokens:
                raise ValueError("global_pool='token' needs the class token")
            self.global_pool = global_pool
        p = next(self.parameters())
        self.head = (nn.Linear(self.num_features, num_classes, device=p.device, dtype=p.dtype)
                     if num_classes > 0 else nn.Identity()).train(self.training)

    def _to_map(self, x: torch.Tensor, feat_size: List[int]) -> torch.Tensor:
        """Grid tokens ``(B, [P +] h * w, C)`` -> ``(B, C, h, w)``."""
        x = x[:, x.shape[1] - feat_size[0] * feat_size[1]:]
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], feat_size[0], feat_size[1])

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs ``(B, C, H/4 ... H/32)`` (the maps PVT hands to FPN heads, before the final norm, which
        ``norm`` does not change: it belongs to the classifier's tokens)."""
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        num_run = len(self.stages) if torch.jit.is_scripting() or not stop_early else max_index + 1
        for i, stage in enumerate(self.stages):
            if i >= num_run:
                break
            if i > 0:
                x = self._to_map(x, feat_size)
            x, feat_size = stage(x)
            if i in take_indices:
                intermediates.append(self._to_map(x, feat_size))
        if intermediates_only:
            return intermediates
        if num_run == len(self.stages):
            x = self.norm(x)
        if self.num_prefix_tokens == 0:  # as forward_features: the (B, C, h, w) map
            x = self._to_map(x, feat_size)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm or max_index < len(self.feature_info) - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage after the final norm: the ``(B, C, h, w)`` map (timm's unpooled features), or with a class
        token the tokens ``(B, 1 + h * w, C)``."""
        feat_size: List[int] = []
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self._to_map(x, feat_size)
            x, feat_size = stage(x)
        x = self.norm(x)
        if self.num_prefix_tokens == 0:
            x = self._to_map(x, feat_size)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.num_prefix_tokens == 0:  # forward_features gave the (B, C, h, w) map
            if self.global_pool:
                x = x.mean(dim=(2, 3))
        elif self.global_pool == 'token':
            x = x[:, 0]
        elif self.global_pool == 'avg':
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# Swin (Liu et al. 2021, Tab. 1; timm's swin_*_patch4_window*): the hosts of Tab. II
ATCONV_SWIN_CONFIGS: Dict[str, Dict[str, Any]] = {
    'atconv_swin_tiny_224': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    'atconv_swin_small_224': dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    'atconv_swin_base_224': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7),
    'atconv_swin_base_384': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12,
                                 img_size=384),
}

# PVT v1 (Wang et al. 2021, Tab. 1; classification/pvt.py pvt_tiny ... pvt_large)
PVT_V1_CONFIGS: Dict[str, Dict[str, Any]] = {
    name: dict(embed_dims=(64, 128, 320, 512), depths=depths, num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
               sr_ratios=(8, 4, 2, 1))
    for name, depths in (('tiny', (2, 2, 2, 2)), ('small', (3, 4, 6, 3)), ('medium', (3, 4, 18, 3)),
                         ('large', (3, 8, 27, 3)))
}
ATCONV_PVT_CONFIGS: Dict[str, Dict[str, Any]] = {
    f'atconv_pvt_{size}': dict(cfg, token_mixer='atconv', pos_embed=False, class_token=False, global_pool='avg')
    for size, cfg in PVT_V1_CONFIGS.items()
}


def _create_atconv_swin(variant: str, pretrained: bool = False, **kwargs) -> ATConvSwinTransformer:
    return build_dynzoo_model(
        ATConvSwinTransformer, variant, pretrained,
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)),
        **dict(ATCONV_SWIN_CONFIGS[variant], **kwargs))


def _create_atconv_pvt(variant: str, pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV1:
    return build_dynzoo_model(
        PyramidVisionTransformerV1, variant, pretrained,
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)),
        **dict(ATCONV_PVT_CONFIGS[variant], **kwargs))


_PAPER = 'Attentive Convolution: Unifying the Expressivity of Self-Attention with Convolutional Efficiency'
_PAPER_IDS = 'arXiv:2510.20092'
_UNTRAINED = ('Tab. II model: no weights released; dynzoo\'s reading of the architecture (module docstring)',)


def _cfg(**kwargs) -> Dict[str, Any]:
    return dynzoo_cfg(**dict(
        dict(license='mit', paper_name=_PAPER, paper_ids=_PAPER_IDS, interpolation='bicubic', crop_pct=0.9,
             notes=_UNTRAINED), **kwargs))


_swin_cfg = partial(_cfg, first_conv='patch_embed.proj', classifier='head.fc')
_pvt_cfg = partial(_cfg, first_conv='stages.0.proj', classifier='head')

default_cfgs = generate_dynzoo_cfgs({
    'atconv_swin_tiny_224.untrained': _swin_cfg(),
    'atconv_swin_small_224.untrained': _swin_cfg(),
    'atconv_swin_base_224.untrained': _swin_cfg(),
    'atconv_swin_base_384.untrained': _swin_cfg(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
    'atconv_pvt_tiny.untrained': _pvt_cfg(),
    'atconv_pvt_small.untrained': _pvt_cfg(),
    'atconv_pvt_medium.untrained': _pvt_cfg(),
    'atconv_pvt_large.untrained': _pvt_cfg(),
})

# Tab. II as printed (params in M and GFLOPs, one decimal); the tests compute ours and compare
_SRC = 'paper Tab. II (one decimal; no code released)'
for _name, _params, _flops, _top1 in (
        ('atconv_pvt_tiny', 10.2e6, 1.8e9, 77.5), ('atconv_pvt_small', 18.3e6, 3.5e9, 81.7),
        ('atconv_pvt_medium', 31.9e6, 6.1e9, 82.4), ('atconv_pvt_large', 43.3e6, 9.2e9, 83.0),
        ('atconv_swin_tiny_224', 28.0e6, 4.2e9, 82.2), ('atconv_swin_small_224', 47.6e6, 8.1e9, 83.6),
        ('atconv_swin_base_224', 84.2e6, 14.3e9, 84.3), ('atconv_swin_base_384', 84.3e6, 42.1e9, 85.0)):
    register_model_info(_name, 'attnet', paper_params=_params, paper_macs=_flops, paper_top1=_top1, source=_SRC)


@register_model
def atconv_swin_tiny_224(pretrained: bool = False, **kwargs) -> ATConvSwinTransformer:
    """ATConv-Swin-T (Tab. II): Swin-T with ATConv blocks and conv patch merging."""
    return _create_atconv_swin('atconv_swin_tiny_224', pretrained, **kwargs)


@register_model
def atconv_swin_small_224(pretrained: bool = False, **kwargs) -> ATConvSwinTransformer:
    """ATConv-Swin-S (Tab. II): Swin-S with ATConv blocks and conv patch merging."""
    return _create_atconv_swin('atconv_swin_small_224', pretrained, **kwargs)


@register_model
def atconv_swin_base_224(pretrained: bool = False, **kwargs) -> ATConvSwinTransformer:
    """ATConv-Swin-B (Tab. II): Swin-B with ATConv blocks and conv patch merging."""
    return _create_atconv_swin('atconv_swin_base_224', pretrained, **kwargs)


@register_model
def atconv_swin_base_384(pretrained: bool = False, **kwargs) -> ATConvSwinTransformer:
    """ATConv-Swin-B-384 (Tab. II): ATConv-Swin-B at 384 px."""
    return _create_atconv_swin('atconv_swin_base_384', pretrained, **kwargs)


@register_model
def atconv_pvt_tiny(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV1:
    """ATConv-PVT-T (Tab. II): PVT-Tiny, depths (2, 2, 2, 2), with ATConv, no position embedding, GAP."""
    return _create_atconv_pvt('atconv_pvt_tiny', pretrained, **kwargs)


@register_model
def atconv_pvt_small(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV1:
    """ATConv-PVT-S (Tab. II): PVT-Small, depths (3, 4, 6, 3), with ATConv, no position embedding, GAP."""
    return _create_atconv_pvt('atconv_pvt_small', pretrained, **kwargs)


@register_model
def atconv_pvt_medium(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV1:
    """ATConv-PVT-M (Tab. II): PVT-Medium, depths (3, 4, 18, 3), with ATConv, no position embedding, GAP."""
    return _create_atconv_pvt('atconv_pvt_medium', pretrained, **kwargs)


@register_model
def atconv_pvt_large(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV1:
    """ATConv-PVT-L (Tab. II): PVT-Large, depths (3, 8, 27, 3), with ATConv, no position embedding, GAP."""
    return _create_atconv_pvt('atconv_pvt_large', pretrained, **kwargs)
