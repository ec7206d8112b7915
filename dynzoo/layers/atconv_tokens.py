"""ATConv as a drop-in token mixer: the token-sequence form ``(B, N, C)`` and the swap of a timm transformer's
attention (Yu et al., "Attentive Convolution", arXiv:2510.20092, §IV-A and Tab. II; Tab. VIII's SiT-ATConv).

The token form is the authors' ``generation/SiT/models.py`` ``ATConv``: ``x_proj`` and ``proj`` are linears on the
tokens, the tokens are read as a ``(B, C, H, W)`` map of a known size for the context and the dynamic depthwise
conv, and the result is flattened back to tokens. :class:`ATConvTokens` is an :class:`~dynzoo.layers.ATConv2d`:
the same parameters, state-dict keys and shapes (a 1x1 conv weight ``(C, C, 1, 1)`` is applied to tokens as the
linear ``(C, C)`` it is), the same kernel generation (Eqs. 7-8) and the same inference form, so a conv-form state
dict loads into it with ``strict=True`` and gives the same output. Differences from the SiT code (dynzoo's
choices, those of the classification code ``models/AttNet.py``): exact (erf) GELU where SiT uses the tanh
approximation, and the grid size given per call (or fixed at build for timm's ViT) instead of a square
``input_size``.

:func:`swap_attention_for_atconv` replaces the self-attention of timm's ``VisionTransformer`` and
``SwinTransformer`` by ATConv, in place. What ATConv makes unnecessary is removed only when asked, explicitly:
``drop_pos_embed`` (a ViT's absolute position embedding; SiT-ATConv drops its sin-cos one, Tab. VIII) and
``class_token_to_avg_pool`` (the class token, replaced by global average pooling as §IV-A says: ATConv needs a
token grid). Swin's window partition, shift and relative position bias belong to its window attention and go with
it; a Swin block becomes :class:`ATConvSwinBlock` (the same norms, MLP and drop paths, ATConv over the whole map).
"""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import DropPath, Mlp, register_notrace_module, to_2tuple
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from timm.models.vision_transformer import Block, VisionTransformer

from .atconv import ATConv2d
from .per_sample import per_sample_depthwise_conv2d

__all__ = ['ATConvTokens', 'ATConvAttention', 'ATConvSwinBlock', 'swap_attention_for_atconv']


@register_notrace_module
class ATConvTokens(ATConv2d):
    """ATConv over a token sequence ``(B, N, C)`` laid out row-major on an ``(H, W)`` grid (``N = H * W``).

    Constructor arguments are :class:`~dynzoo.layers.ATConv2d`'s; ``forward(x, feat_size)`` takes the grid size
    ``[H, W]``.
    """

    def forward_tokens(self, x: torch.Tensor, feat_size: List[int]) -> torch.Tensor:
        """``(B, N, C) -> (B, N, C)``: Eqs. (7)-(11) with the token-wise projections of the authors' SiT code."""
        if x.dim() != 3:
            raise ValueError(f'ATConvTokens expects tokens (B, N, C), got {x.dim()} dims')
        batch, num_tokens, dim = x.shape
        height, width = feat_size[0], feat_size[1]
        if dim != self.dim or num_tokens != height * width:
            raise ValueError(f'ATConvTokens({self.dim}) got {num_tokens} tokens of {dim} channels for a '
                             f'{height}x{width} grid: a token grid of N = H * W tokens is needed (no prefix tokens)')
        # (B, N, C) read as (B, C, H, W): a channels-last view of the same memory
        alpha = self.forward_kernel(x.transpose(1, 2).reshape(batch, dim, height, width))
        value = F.linear(x, self.x_proj.weight.flatten(1), self.x_proj.bias)  # W_value, Eq. (10)
        pad = self.kernel_size // 2
        y = per_sample_depthwise_conv2d(
            value.transpose(1, 2).reshape(batch, dim, height, width), alpha, (pad, pad), self.strategy)  # Eq. (11)
        return F.linear(y.flatten(2).transpose(1, 2), self.proj.weight.flatten(1), self.proj.bias)  # W_out

    def forward(self, x: torch.Tensor, feat_size: List[int]) -> torch.Tensor:
        return self.forward_tokens(x, feat_size)


@register_notrace_module
class ATConvAttention(ATConvTokens):
    """:class:`ATConvTokens` with the call signature of timm's ``Attention`` (``x, attn_mask, is_causal``), on the
    fixed patch grid ``grid_size`` of a ViT (masks have no meaning for a convolution and are refused)."""

    def __init__(self, dim: int, grid_size: Tuple[int, int], **kwargs):
        super().__init__(dim, **kwargs)
        self.grid_size = list(to_2tuple(grid_size))

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError('ATConvAttention has no attention mask: it mixes a full token grid')
        return self.forward_tokens(x, self.grid_size)

    def extra_repr(self) -> str:
        return super().extra_repr() + f', grid_size={tuple(self.grid_size)}'


class ATConvSwinBlock(nn.Module):
    """A Swin block whose (shifted) window attention is ATConv over the whole ``(B, H, W, C)`` map:
    ``x += DropPath(ATConv(LN(x)))``, ``x += DropPath(MLP(LN(x)))``, the other modules and their keys those of
    timm's ``SwinTransformerBlock``.

    Args:
        dim: channels.
        mlp_ratio: MLP hidden width over ``dim`` (Swin: 4).
        drop_path: stochastic depth rate.
        proj_drop: dropout of the MLP.
        act_layer / norm_layer: Swin's (GELU, LayerNorm).
        kernel_size / pool_mode / strategy / inference_mode: :class:`~dynzoo.layers.ATConv2d`'s.
    """

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 4.,
            drop_path: float = 0.,
            proj_drop: float = 0.,
            act_layer=nn.GELU,
            norm_layer=nn.LayerNorm,
            kernel_size: int = 3,
            pool_mode: str = '1d',
            strategy: str = 'auto',
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.dim = dim
        self.norm1 = norm_layer(dim, **dd)
        self.attn = ATConvTokens(
            dim, kernel_size, pool_mode=pool_mode, strategy=strategy, inference_mode=inference_mode, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    @classmethod
    def from_swin_block(cls, block: SwinTransformerBlock, **atconv_kwargs) -> 'ATConvSwinBlock':
        """The ATConv block that takes ``block``'s place: its norms, MLP and drop paths (the modules themselves,
        with their weights) and a new ATConv on the same device and dtype."""
        weight = block.norm1.weight
        new = cls(block.dim, block.mlp_ratio, device='meta', **atconv_kwargs)  # a shell: every module replaced
        new.norm1, new.norm2, new.mlp = block.norm1, block.norm2, block.mlp
        new.drop_path1, new.drop_path2 = block.drop_path1, block.drop_path2
        new.attn = ATConvTokens(block.dim, device=weight.device, dtype=weight.dtype, **atconv_kwargs)
        return new

    def set_input_size(self, feat_size: Tuple[int, int], window_size: Tuple[int, int],
                       always_partition: Optional[bool] = None) -> None:
        """timm's ``SwinTransformer.set_input_size`` hook: ATConv has no window and no size-dependent state."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        x = x.reshape(batch, height * width, dim)
        x = x + self.drop_path1(self.attn(self.norm1(x), [height, width]))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(batch, height, width, dim)


def _swap_vit(model: VisionTransformer, drop_pos_embed: bool, class_token_to_avg_pool: bool, atconv_kwargs) -> None:
    if model.dynamic_img_size:
        raise ValueError('swap_attention_for_atconv needs a fixed patch grid (dynamic_img_size=False)')
    if model.has_class_token:
        if not class_token_to_avg_pool:
            raise ValueError('ATConv mixes a token grid: the class token must go (class_token_to_avg_pool=True, '
                             'global average pooling as the paper does, §IV-A)')
        if model.pos_embed is not None and not model.no_embed_class:  # its first entry is the class token's
            model.pos_embed = nn.Parameter(model.pos_embed.detach()[:, 1:].clone())
        model.cls_token = None
        model.has_class_token = False
        model.num_prefix_tokens -= 1
        if model.global_pool == 'token':
            model.global_pool = 'avg'
    elif class_token_to_avg_pool:
        raise ValueError('class_token_to_avg_pool=True, but this VisionTransformer has no class token')
    if model.num_prefix_tokens:
        raise ValueError(f'ATConv mixes a token grid: {model.num_prefix_tokens} register token(s) have no place')
    if drop_pos_embed:
        if model.pos_embed is None:
            raise ValueError('drop_pos_embed=True, but this VisionTransformer has no position embedding')
        model.pos_embed = None
    grid = model.patch_embed.grid_size
    for block in model.blocks:
        if not isinstance(block, Block):
            raise TypeError(f'unsupported ViT block {type(block).__name__} (timm Block only)')
        weight = block.norm1.weight
        block.attn = ATConvAttention(block.attn.qkv.in_features, grid, device=weight.device, dtype=weight.dtype,
                                     **atconv_kwargs)


def swap_attention_for_atconv(
        model: nn.Module,
        *,
        drop_pos_embed: bool,
        class_token_to_avg_pool: bool,
        kernel_size: int = 3,
        pool_mode: str = '1d',
        strategy: str = 'auto',
        inference_mode: bool = False,
) -> nn.Module:
    """Replace every self-attention of a timm ``VisionTransformer`` or ``SwinTransformer`` by ATConv, in place.

    Args:
        model: the transformer (fresh ATConvs, trunc-normal(0.02) as the authors initialise them; the rest keeps its
            weights).
        drop_pos_embed: ViT: remove the absolute position embedding (SiT-ATConv, Tab. VIII). Swin has none: False.
        class_token_to_avg_pool: ViT: remove the class token and pool by global average instead (§IV-A; required
            when the ViT has one, since ATConv mixes a token grid). Swin has none: False.
        kernel_size / pool_mode / strategy / inference_mode: of every new :class:`ATConvTokens`.

    Returns:
        ``model``.
    """
    atconv_kwargs = dict(kernel_size=kernel_size, pool_mode=pool_mode, strategy=strategy,
                         inference_mode=inference_mode)
    if isinstance(model, VisionTransformer):
        _swap_vit(model, drop_pos_embed, class_token_to_avg_pool, atconv_kwargs)
    elif isinstance(model, SwinTransformer):
        if drop_pos_embed or class_token_to_avg_pool:
            raise ValueError('SwinTransformer has no absolute position embedding and no class token: pass '
                             'drop_pos_embed=False, class_token_to_avg_pool=False')
        for stage in model.layers:
            stage.blocks = nn.Sequential(*[
                ATConvSwinBlock.from_swin_block(block, **atconv_kwargs) if isinstance(block, SwinTransformerBlock)
                else block for block in stage.blocks])
    else:
        raise TypeError(f'swap_attention_for_atconv supports timm VisionTransformer and SwinTransformer, '
                        f'got {type(model).__name__}')
    return model
