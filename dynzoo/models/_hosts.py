"""ResNet and MobileNetV2 hosts for the drop-in dynamic convolutions (FMDConv, A2D2C, ODConv, DynamicConv, CondConv).

Both are timm's own networks -- ``timm.models.ResNet`` and timm's MobileNetV2 (``EfficientNet`` built from the
MobileNetV2 arch def) -- with the chosen static convs swapped for a dynamic conv of identical geometry after
construction. Everything else (stem, BN, downsample, head, ``features_only``, ``forward_intermediates``, grad
checkpointing, ``group_matcher``) is timm's, and the state-dict keys are timm's, which for ResNet are also
torchvision's and the authors' (``layerX.Y.convZ``).

Placement is a predicate ``(name, conv) -> bool`` over the host's static convs:

* ResNet ``'blocks'`` (ODConv/FMDConv): every conv inside BasicBlock/Bottleneck (``layerX.Y.conv{1,2,3}``);
  stem, downsample 1x1 and classifier stay static.
* ResNet ``'first3x3_s234'``: the first 3x3 of each block in stages 2-4 (A2D2C's narrower text reading).
* MobileNetV2 ``'all'``: every conv after the stem -- pw-expand, depthwise 3x3, pw-linear and the final 1x1
  ``conv_head`` (ODConv's MobileNetV2 placement).
* MobileNetV2 ``'depthwise'``: the depthwise 3x3 convs only.
"""
from functools import partial
from typing import Callable, Dict, Optional, Set, Union

import torch
import torch.nn as nn

from timm.layers import get_act_layer
from timm.models import ResNet
from timm.models._efficientnet_builder import decode_arch_def, round_channels
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import BasicBlock, Bottleneck

from dynzoo.layers.dynamic import DynamicConv2dBase

from dynzoo.models._reparam import fold_batchnorm, fold_sequential_batchnorms

__all__ = [
    'DynamicResNet', 'DynamicMobileNetV2', 'replace_convs', 'RESNET_PLACEMENT_NAMES', 'MOBILENETV2_PLACEMENTS',
    'resnet_layout', 'mobilenetv2_kwargs', 'dynamic_bias_names',
]

ConvFactory = Callable[..., nn.Module]
Placement = Callable[[str, nn.Conv2d], bool]


def _in_block(name: str) -> bool:
    parts = name.split('.')
    return len(parts) == 3 and parts[0].startswith('layer') and parts[2] in ('conv1', 'conv2', 'conv3')


RESNET_PLACEMENTS: Dict[str, Placement] = {
    'blocks': lambda name, conv: _in_block(name),
}
RESNET_PLACEMENT_NAMES = ('blocks', 'first3x3_s234')



MOBILENETV2_PLACEMENTS: Dict[str, Placement] = {
    'all': lambda name, conv: name.startswith('blocks.') or name == 'conv_head',
    'depthwise': lambda name, conv: name.startswith('blocks.') and conv.groups == conv.in_channels > 1,
}


def replace_convs(model: nn.Module, conv_layer: ConvFactory, placement: Placement) -> int:
    """Swap every ``nn.Conv2d`` of ``model`` that ``placement`` selects for ``conv_layer`` of the same geometry.

    ``conv_layer(in, out, kernel_size, stride=, padding=, dilation=, groups=, device=, dtype=)`` must return the module; the
    static conv's bias flag is not forwarded (each method decides its own bias). Returns the number replaced.
    """
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d and placement(n, m)]
    for name, conv in targets:
        if not isinstance(conv.padding, tuple):
            raise ValueError(f'{name}: string padding {conv.padding!r} is not supported by dynamic convs')
        new = conv_layer(
            conv.in_channels, conv.out_channels, conv.kernel_size,
            stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            device=conv.weight.device, dtype=conv.weight.dtype)  # keep the host's device/dtype (meta builds)
        parent_name, _, child = name.rpartition('.')
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return len(targets)


def dynamic_bias_names(model: nn.Module) -> Set[str]:
    """Names of the dynamic convs' per-kernel biases ``(K, C_out)``: biases, exempt from weight decay although
    2-D (timm's optimizer factory already exempts every 1-D parameter)."""
    return {f'{n}.bias' for n, m in model.named_modules()
            if isinstance(m, DynamicConv2dBase) and m.bias is not None}


def resnet_layout(depth: int):
    """``(block, layers)`` of the standard ResNets."""
    return {
        18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]),
        50: (Bottleneck, [3, 4, 6, 3]), 101: (Bottleneck, [3, 4, 23, 3]),
    }[depth]


class ReparamBasicBlock(BasicBlock):
    """timm's ``BasicBlock`` plus :meth:`reparameterize` (the hosts give their blocks this class after building)."""

    def reparameterize(self) -> None:
        """Fold ``bn1``/``bn2`` into ``conv1``/``conv2`` (dynamic: ``fuse_bn``) and the downsample's conv+BN."""
        fold_batchnorm(self, 'conv1', 'bn1')
        fold_batchnorm(self, 'conv2', 'bn2')
        fold_sequential_batchnorms(self.downsample)


class ReparamBottleneck(Bottleneck):
    """timm's ``Bottleneck`` plus :meth:`reparameterize`."""

    def reparameterize(self) -> None:
        """Fold ``bn1..3`` into ``conv1..3`` (dynamic: ``fuse_bn``) and the downsample's conv+BN."""
        for i in (1, 2, 3):
            fold_batchnorm(self, f'conv{i}', f'bn{i}')
        fold_sequential_batchnorms(self.downsample)


class ReparamDepthwiseSeparableConv(DepthwiseSeparableConv):
    """timm's ``DepthwiseSeparableConv`` plus :meth:`reparameterize`."""

    def reparameterize(self) -> None:
        """Fold each ``BatchNormAct2d`` into its conv; its activation stays."""
        fold_batchnorm(self, 'conv_s2d', 'bn_s2d')
        fold_batchnorm(self, 'conv_dw', 'bn1')
        fold_batchnorm(self, 'conv_pw', 'bn2')


class ReparamInvertedResidual(InvertedResidual):
    """timm's ``InvertedResidual`` plus :meth:`reparameterize`."""

    def reparameterize(self) -> None:
        """Fold each ``BatchNormAct2d`` into its conv (pw-expand, depthwise, pw-linear); activations stay."""
        fold_batchnorm(self, 'conv_s2d', 'bn_s2d')
        fold_batchnorm(self, 'conv_pw', 'bn1')
        fold_batchnorm(self, 'conv_dw', 'bn2')
        fold_batchnorm(self, 'conv_pwl', 'bn3')


_REPARAM_BLOCKS = {
    BasicBlock: ReparamBasicBlock, Bottleneck: ReparamBottleneck,
    DepthwiseSeparableConv: ReparamDepthwiseSeparableConv, InvertedResidual: ReparamInvertedResidual,
}


def _make_blocks_reparameterizable(model: nn.Module) -> None:
    """Give timm's blocks their ``Reparam*`` subclass (same state, same forward; adds ``reparameterize()``), so
    ``timm.utils.reparameterize_model`` -- which visits modules, not the model -- reaches the BatchNorm folds."""
    for m in model.modules():
        cls = _REPARAM_BLOCKS.get(type(m))
        if cls is not None:
            m.__class__ = cls


class DynamicResNet(ResNet):
    """timm ``ResNet`` whose selected block convs are dynamic.

    Args:
        conv_layer: factory of the dynamic conv (see :func:`replace_convs`).
        placement: a key of ``RESNET_PLACEMENTS`` or a predicate ``(name, conv) -> bool``.
        **kwargs: timm ``ResNet`` arguments (``block``, ``layers``, ``num_classes``, ``drop_rate``, ...).
    """

    def __init__(self, conv_layer: ConvFactory, placement: Union[str, Placement] = 'blocks', **kwargs):
        super().__init__(**kwargs)
        if isinstance(placement, str):
            if placement not in RESNET_PLACEMENT_NAMES:
                raise ValueError(f'unknown placement {placement!r}; expected one of {RESNET_PLACEMENT_NAMES}')
            if placement == 'first3x3_s234':
                placement = _first_3x3_placement(self)
            else:
                placement = RESNET_PLACEMENTS[placement]
        self.num_dynamic = replace_convs(self, conv_layer, placement)
        _make_blocks_reparameterizable(self)

    def reparameterize(self) -> None:
        """Fold the stem BatchNorm into the stem conv; the blocks fold their own (``dynzoo.reparameterize`` walks
        the whole model, root included: use it, not this method alone)."""
        if isinstance(self.conv1, nn.Sequential):  # deep stem: its inner pairs fold, the final bn1 stays
            fold_sequential_batchnorms(self.conv1)
        else:
            fold_batchnorm(self, 'conv1', 'bn1')

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return dynamic_bias_names(self)


def _first_3x3_placement(model: nn.Module) -> Placement:
    """The first 3x3 conv of every block in stages 2-4."""
    chosen = set()
    for stage in ('layer2', 'layer3', 'layer4'):
        for bname, block in getattr(model, stage).named_children():
            for cname in ('conv1', 'conv2', 'conv3'):
                conv = getattr(block, cname, None)
                if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                    chosen.add(f'{stage}.{bname}.{cname}')
                    break
    return lambda name, conv: name in chosen


_MBV2_ARCH = [
    ['ds_r1_k3_s1_c16'],
    ['ir_r2_k3_s2_e6_c24'],
    ['ir_r3_k3_s2_e6_c32'],
    ['ir_r4_k3_s2_e6_c64'],
    ['ir_r3_k3_s1_e6_c96'],
    ['ir_r3_k3_s2_e6_c160'],
    ['ir_r1_k3_s1_e6_c320'],
]


def mobilenetv2_kwargs(channel_multiplier: float) -> dict:
    """timm's MobileNetV2 arch (= torchvision's): widths ``make_div(c * m, 8)``, head ``max(1280, make_div(1280 m))``."""
    round_chs_fn = partial(round_channels, multiplier=channel_multiplier)
    return dict(
        block_args=decode_arch_def(_MBV2_ARCH, depth_multiplier=1.0, fix_first_last=False),
        num_features=max(1280, round_chs_fn(1280)),
        stem_size=32,
        fix_stem=False,
        round_chs_fn=round_chs_fn,
        act_layer=get_act_layer('relu6'),
    )


class DynamicMobileNetV2(EfficientNet):
    """timm's MobileNetV2 (an ``EfficientNet`` from the MobileNetV2 arch def) whose selected convs are dynamic.

    Args:
        conv_layer: factory of the dynamic conv (see :func:`replace_convs`).
        channel_multiplier: width multiplier (0.5, 0.75, 1.0).
        placement: a key of ``MOBILENETV2_PLACEMENTS`` or a predicate.
    """

    def __init__(
            self,
            conv_layer: ConvFactory,
            channel_multiplier: float = 1.0,
            placement: Union[str, Placement] = 'all',
            **kwargs,
    ):
        super().__init__(**mobilenetv2_kwargs(channel_multiplier), **kwargs)
        if isinstance(placement, str):
            if placement not in MOBILENETV2_PLACEMENTS:
                raise ValueError(f'unknown placement {placement!r}; expected one of {sorted(MOBILENETV2_PLACEMENTS)}')
            placement = MOBILENETV2_PLACEMENTS[placement]
        self.num_dynamic = replace_convs(self, conv_layer, placement)
        _make_blocks_reparameterizable(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return dynamic_bias_names(self)

    def reparameterize(self) -> None:
        """Fold the stem and head ``BatchNormAct2d`` into ``conv_stem`` / ``conv_head`` (dynamic: ``fuse_bn``); the
        blocks fold their own (``dynzoo.reparameterize`` walks the whole model: use it, not this method alone)."""
        fold_batchnorm(self, 'conv_stem', 'bn1')
        fold_batchnorm(self, 'conv_head', 'bn2')
