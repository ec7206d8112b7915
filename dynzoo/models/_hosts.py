"""ResNet and MobileNetV2 hosts for the drop-in dynamic convolutions (FMDConv, A2D2C, ODConv, DynamicConv, CondConv).

Both are timm's own networks -- ``timm.models.ResNet`` and timm's MobileNetV2 (``EfficientNet`` built from the
MobileNetV2 arch def) -- built from the block subclasses below, which add the inference form, and with the convs a
placement selects swapped for a dynamic conv of identical geometry. Everything else (stem, downsample, head,
``features_only``, ``forward_intermediates``, grad checkpointing, ``group_matcher``) is timm's, and so are the
state-dict keys, which for ResNet are also torchvision's and the authors' (``layerX.Y.convZ``).

Placements (``placement=``, one vocabulary for both hosts; a predicate ``(name, conv) -> bool`` also works):

* ``'blocks'``: every conv inside the residual blocks -- ResNet ``layerX.Y.conv{1,2,3}``, MobileNetV2
  ``blocks.S.I.conv_{pw,dw,pwl}``; stem, ResNet downsample 1x1s, MobileNetV2 ``conv_head`` and classifier stay
  static (ODConv's ResNet placement, the authors' ``od_resnet``).
* ``'all_but_stem'``: every conv but the stem -- the blocks, ResNet's downsample 1x1s and MobileNetV2's final 1x1
  ``conv_head`` (ODConv's MobileNetV2 placement, the authors' ``od_mobilenetv2``; DynamicConv / CondConv).
* ``'first_conv'``: the first conv of every block (A2D2C Table 10, "initial").
* ``'first3x3_s234'`` (ResNet only): the first 3x3 conv of every block in stages 2-4 (A2D2C Sec. 3.3, text).
* ``'depthwise'`` (MobileNetV2 only): the depthwise 3x3 convs (A2D2C Sec. 3.3, text).

Inference form (timm's MobileOne / FastViT contract): every block folds its own conv -> BatchNorm pairs in
``reparameterize()`` (a dynamic conv through its ``fuse_bn``, a static one through
:func:`dynzoo.layers.fusion.fuse_conv_bn`; a ``BatchNormAct2d`` leaves its activation), and ``inference_mode=True``
builds that form directly. The stem and head pairs (ResNet ``conv1``/``bn1``, MobileNetV2 ``conv_stem``/``bn1``,
``conv_head``/``bn2``) belong to the root, which timm's ``reparameterize_model`` does not visit: they stay as they
are (an eval BatchNorm is exact).
"""
from functools import partial
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.nn as nn

from timm.layers import get_act_layer
from timm.models import ResNet
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models._efficientnet_builder import (
    EfficientNetBuilder, decode_arch_def, efficientnet_init_weights, round_channels)
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import BasicBlock, Bottleneck

from dynzoo.layers.conv_norm import ConvNormSequential, fold_conv_norm
from dynzoo.layers.dynamic import DynamicConv2dBase
from ._builder import build_dynzoo_model

__all__ = [
    'DynamicResNet', 'DynamicMobileNetV2', 'create_host', 'HOSTS', 'HOST_CFGS', 'PLACEMENTS', 'MOBILENETV2_ARCH',
    'mobilenetv2_block_names', 'ReparamBasicBlock', 'ReparamBottleneck',
    'ReparamDepthwiseSeparableConv', 'ReparamInvertedResidual', 'replace_convs', 'select_convs',
    'dynamic_bias_names',
]

ConvFactory = Callable[..., nn.Module]
Predicate = Callable[[str, nn.Conv2d], bool]


# ---- the inference form of the blocks ------------------------------------------------------------------------------

class _ReparamBlock:
    """Adds ``inference_mode`` and :meth:`reparameterize` to a timm block: ``conv_norm_pairs`` name the block's own
    conv -> norm pairs; a downsample becomes a :class:`ConvNormSequential`, which folds its own pair."""
    conv_norm_pairs: Tuple[Tuple[str, str], ...] = ()

    def __init__(self, *args, inference_mode: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        downsample = getattr(self, 'downsample', None)
        if isinstance(downsample, nn.Sequential):
            self.downsample = ConvNormSequential(*downsample, inference_mode=inference_mode)
        if inference_mode:
            self.reparameterize()

    def reparameterize(self) -> None:
        """Fold each BatchNorm of the block into the conv before it (see :func:`fold_conv_norm`)."""
        for conv_name, norm_name in self.conv_norm_pairs:
            if getattr(self, conv_name, None) is not None:
                fold_conv_norm(self, conv_name, norm_name)


class ReparamBasicBlock(_ReparamBlock, BasicBlock):
    """timm's ``BasicBlock`` with an inference form (``conv1``/``bn1``, ``conv2``/``bn2`` folded)."""
    conv_norm_pairs = (('conv1', 'bn1'), ('conv2', 'bn2'))


class ReparamBottleneck(_ReparamBlock, Bottleneck):
    """timm's ``Bottleneck`` with an inference form (``conv{1,2,3}``/``bn{1,2,3}`` folded)."""
    conv_norm_pairs = (('conv1', 'bn1'), ('conv2', 'bn2'), ('conv3', 'bn3'))


class ReparamDepthwiseSeparableConv(_ReparamBlock, DepthwiseSeparableConv):
    """timm's ``DepthwiseSeparableConv`` with an inference form (each ``BatchNormAct2d`` folded, its act kept)."""
    conv_norm_pairs = (('conv_s2d', 'bn_s2d'), ('conv_dw', 'bn1'), ('conv_pw', 'bn2'))


class ReparamInvertedResidual(_ReparamBlock, InvertedResidual):
    """timm's ``InvertedResidual`` with an inference form (pw-expand, depthwise, pw-linear folded, acts kept)."""
    conv_norm_pairs = (('conv_s2d', 'bn_s2d'), ('conv_pw', 'bn1'), ('conv_dw', 'bn2'), ('conv_pwl', 'bn3'))


# ---- placement ---------------------------------------------------------------------------------------------------

class ConvSite(NamedTuple):
    """A static conv of a host: module path, role (``'stem'``, ``'block'``, ``'shortcut'``, ``'head'``), 1-based
    stage, and whether it is its block's first conv / first 3x3 conv."""
    name: str
    conv: nn.Conv2d
    role: str
    stage: int
    first: bool
    first3x3: bool


def _block_sites(prefix: str, block: nn.Module, stage: int) -> List[ConvSite]:
    convs = [(n, m) for n, m in block.named_children() if type(m) is nn.Conv2d]
    first3x3 = next((n for n, m in convs if m.kernel_size == (3, 3)), None)
    sites = [ConvSite(f'{prefix}.{n}', m, 'block', stage, i == 0, n == first3x3) for i, (n, m) in enumerate(convs)]
    downsample = getattr(block, 'downsample', None)
    if isinstance(downsample, nn.Sequential):
        sites += [ConvSite(f'{prefix}.downsample.{n}', m, 'shortcut', stage, False, False)
                  for n, m in downsample.named_children() if type(m) is nn.Conv2d]
    return sites


# name -> (hosts it applies to, selection over ConvSite); described in the module docstring
PLACEMENTS: Dict[str, Tuple[Tuple[str, ...], Callable[[ConvSite], bool]]] = {
    'blocks': (('resnet', 'mobilenetv2'), lambda s: s.role == 'block'),
    'all_but_stem': (('resnet', 'mobilenetv2'), lambda s: s.role != 'stem'),
    'first_conv': (('resnet', 'mobilenetv2'), lambda s: s.role == 'block' and s.first),
    'first3x3_s234': (('resnet',), lambda s: s.role == 'block' and s.first3x3 and s.stage in (2, 3, 4)),
    'depthwise': (('mobilenetv2',), lambda s: s.role == 'block' and s.conv.groups == s.conv.in_channels > 1),
}


def select_convs(sites: Sequence[ConvSite], host: str, placement: Union[str, Predicate]) -> List[str]:
    """The module paths of the convs ``placement`` (a :data:`PLACEMENTS` name or a predicate) selects."""
    if callable(placement):
        return [s.name for s in sites if placement(s.name, s.conv)]
    names = [name for name, (hosts, _) in PLACEMENTS.items() if host in hosts]
    if placement not in names:
        raise ValueError(f'unknown placement {placement!r} for a {host} host; expected one of {names} or a '
                         'predicate (name, conv) -> bool')
    selected = PLACEMENTS[placement][1]
    return [s.name for s in sites if selected(s)]


def replace_convs(model: nn.Module, conv_layer: ConvFactory, names: Sequence[str], inference_mode: bool = False) -> int:
    """Swap the static convs ``names`` of ``model`` for ``conv_layer`` of the same geometry; returns the count.

    ``conv_layer(in, out, kernel_size, stride=, padding=, dilation=, groups=, post_bias=, inference_mode=, device=,
    dtype=)`` makes the dynamic conv (each method decides its own kernel bias). A static conv with a bias -- the
    fused conv of an inference-form block -- becomes a dynamic conv with a ``post_bias``, where its BatchNorm's
    shift goes.
    """
    for name in names:
        conv = model.get_submodule(name)
        if not isinstance(conv.padding, tuple):
            raise ValueError(f'{name}: string padding {conv.padding!r} is not supported by dynamic convs')
        new = conv_layer(
            conv.in_channels, conv.out_channels, conv.kernel_size,
            stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            post_bias=conv.bias is not None, inference_mode=inference_mode,
            device=conv.weight.device, dtype=conv.weight.dtype)  # keep the host's device/dtype (meta builds)
        parent_name, _, child = name.rpartition('.')
        setattr(model.get_submodule(parent_name), child, new)
    return len(names)


def dynamic_bias_names(model: nn.Module) -> Set[str]:
    """Names of the dynamic convs' per-kernel biases ``(K, C_out)``: biases, exempt from weight decay although
    2-D (timm's optimizer factory already exempts every 1-D parameter)."""
    return {f'{n}.bias' for n, m in model.named_modules()
            if isinstance(m, DynamicConv2dBase) and m.bias is not None}


# ---- the hosts -----------------------------------------------------------------------------------------------------

class DynamicResNet(ResNet):
    """timm ``ResNet`` with :class:`ReparamBasicBlock` / :class:`ReparamBottleneck` blocks whose selected convs are
    dynamic.

    Args:
        conv_layer: factory of the dynamic conv (see :func:`replace_convs`).
        placement: a :data:`PLACEMENTS` name or a predicate ``(name, conv) -> bool``.
        inference_mode: build the inference form (the blocks' BatchNorms folded) directly.
        **kwargs: timm ``ResNet`` arguments (``block``, ``layers``, ``num_classes``, ``drop_rate``, ...).
    """

    def __init__(
            self,
            conv_layer: ConvFactory,
            placement: Union[str, Predicate] = 'blocks',
            inference_mode: bool = False,
            block_args: Optional[Dict[str, Any]] = None,
            **kwargs,
    ):
        super().__init__(block_args=dict(block_args or {}, inference_mode=inference_mode), **kwargs)
        sites = [ConvSite('conv1', self.conv1, 'stem', 0, False, False)] if type(self.conv1) is nn.Conv2d else []
        for stage in range(1, 5):
            for i, block in enumerate(getattr(self, f'layer{stage}')):
                sites += _block_sites(f'layer{stage}.{i}', block, stage)
        self.num_dynamic = replace_convs(self, conv_layer, select_convs(sites, 'resnet', placement), inference_mode)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return dynamic_bias_names(self)


# MobileNetV2's stage table (Sandler et al., CVPR 2018, Table 2: t, c, n, s), as timm's / torchvision's arch def
MOBILENETV2_ARCH = [
    ['ds_r1_k3_s1_c16'],
    ['ir_r2_k3_s2_e6_c24'],
    ['ir_r3_k3_s2_e6_c32'],
    ['ir_r4_k3_s2_e6_c64'],
    ['ir_r3_k3_s1_e6_c96'],
    ['ir_r3_k3_s2_e6_c160'],
    ['ir_r1_k3_s1_e6_c320'],
]


def _mobilenetv2_blocks():
    return decode_arch_def(MOBILENETV2_ARCH, depth_multiplier=1.0, fix_first_last=False)


def mobilenetv2_block_names() -> List[str]:
    """timm's names of the 17 MobileNetV2 blocks in execution order (``blocks.S.I``)."""
    return [f'blocks.{s}.{i}' for s, stage in enumerate(_mobilenetv2_blocks()) for i in range(len(stage))]


class _ReparamBlockBuilder(EfficientNetBuilder):
    """timm's ``EfficientNetBuilder`` making :class:`ReparamInvertedResidual` / :class:`ReparamDepthwiseSeparableConv`
    (timm's ``_make_block`` has no block-class hook); only what MobileNetV2 uses (no squeeze-excite)."""
    block_classes = {'ir': ReparamInvertedResidual, 'ds': ReparamDepthwiseSeparableConv}

    def __init__(self, inference_mode: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.inference_mode = inference_mode

    def _make_block(self, ba: Dict[str, Any], block_idx: int, block_count: int) -> nn.Module:
        block_cls = self.block_classes[ba.pop('block_type')]
        if ba.pop('se_ratio', None):
            raise ValueError('the MobileNetV2 host has no squeeze-excite')
        out_chs = self.round_chs_fn(ba.pop('out_chs'))
        block = block_cls(
            in_chs=self.in_chs, out_chs=out_chs, pad_type=self.pad_type,
            act_layer=ba.pop('act_layer') or self.act_layer, norm_layer=self.norm_layer, aa_layer=self.aa_layer,
            drop_path_rate=self.drop_path_rate * block_idx / block_count, inference_mode=self.inference_mode,
            **ba, **self.dd)
        self.in_chs = out_chs
        return block


class DynamicMobileNetV2(EfficientNet):
    """timm's MobileNetV2 (an ``EfficientNet`` from the MobileNetV2 arch def: widths ``make_div(c * m, 8)``, head
    ``max(1280, make_div(1280 m))``) with :class:`ReparamInvertedResidual` blocks whose selected convs are dynamic.

    Args:
        conv_layer: factory of the dynamic conv (see :func:`replace_convs`).
        channel_multiplier: width multiplier (0.5, 0.75, 1.0).
        placement: a :data:`PLACEMENTS` name or a predicate.
        inference_mode: build the inference form (the blocks' BatchNorms folded) directly.
        **kwargs: timm ``EfficientNet`` arguments (``num_classes``, ``drop_rate``, ...).
    """

    def __init__(
            self,
            conv_layer: ConvFactory,
            channel_multiplier: float = 1.0,
            placement: Union[str, Predicate] = 'all_but_stem',
            inference_mode: bool = False,
            output_stride: int = 32,
            norm_layer: Optional[Type[nn.Module]] = None,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
            **kwargs,
    ):
        dd = {'device': device, 'dtype': dtype}
        round_chs_fn = partial(round_channels, multiplier=channel_multiplier)
        act_layer = get_act_layer('relu6')
        super().__init__(
            block_args=_mobilenetv2_blocks(), num_features=max(1280, round_chs_fn(1280)), stem_size=32,
            fix_stem=False, round_chs_fn=round_chs_fn, act_layer=act_layer, output_stride=output_stride,
            norm_layer=norm_layer, drop_path_rate=drop_path_rate, **dd, **kwargs)
        # the same blocks again, as dynzoo's subclasses (timm's EfficientNet has no block-class argument)
        builder = _ReparamBlockBuilder(
            inference_mode, output_stride=output_stride, round_chs_fn=round_chs_fn, act_layer=act_layer,
            norm_layer=norm_layer or nn.BatchNorm2d, drop_path_rate=drop_path_rate, **dd)
        self.blocks = nn.Sequential(*builder(self.conv_stem.out_channels, _mobilenetv2_blocks()))
        efficientnet_init_weights(self.blocks)
        sites = [ConvSite('conv_stem', self.conv_stem, 'stem', 0, False, False)]
        for s, stage in enumerate(self.blocks):
            for i, block in enumerate(stage):
                sites += _block_sites(f'blocks.{s}.{i}', block, s + 1)
        if type(self.conv_head) is nn.Conv2d:
            sites.append(ConvSite('conv_head', self.conv_head, 'head', len(self.blocks), False, False))
        names = select_convs(sites, 'mobilenetv2', placement)
        self.num_dynamic = replace_convs(self, conv_layer, names, inference_mode)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return dynamic_bias_names(self)


# host kind -> the pretrained-cfg entries it fixes (timm's module names)
HOST_CFGS: Dict[str, Dict[str, str]] = {
    'resnet': dict(first_conv='conv1', classifier='fc'),
    'mobilenetv2': dict(first_conv='conv_stem', classifier='classifier'),
}

# host name -> (model class, its arguments, feature_cfg)
HOSTS: Dict[str, Tuple[Type[nn.Module], Dict[str, Any], Optional[Dict[str, Any]]]] = {
    'resnet18': (DynamicResNet, dict(block=ReparamBasicBlock, layers=(2, 2, 2, 2)), None),
    'resnet34': (DynamicResNet, dict(block=ReparamBasicBlock, layers=(3, 4, 6, 3)), None),
    'resnet50': (DynamicResNet, dict(block=ReparamBottleneck, layers=(3, 4, 6, 3)), None),
    'resnet101': (DynamicResNet, dict(block=ReparamBottleneck, layers=(3, 4, 23, 3)), None),
    **{f'mobilenetv2_{round(m * 100):03d}': (
        DynamicMobileNetV2, dict(channel_multiplier=m), dict(flatten_sequential=True)) for m in (0.5, 0.75, 1.0)},
}


def create_host(
        variant: str,
        host: str,
        conv_layer: ConvFactory,
        pretrained: bool = False,
        pretrained_filter_fn: Optional[Callable] = None,
        conv_args: Sequence[str] = (),
        default_placement: Optional[Union[str, Predicate]] = None,
        **kwargs,
) -> nn.Module:
    """Build ``variant``: the :data:`HOSTS` network ``host`` with ``conv_layer`` placed in it.

    The keyword arguments named in ``conv_args`` configure ``conv_layer`` (e.g. ``num_kernels``); ``placement=``
    overrides ``default_placement`` (``None``: the host's, ODConv's placement: ``'blocks'`` on ResNet,
    ``'all_but_stem'`` on MobileNetV2); the rest go to the host (``num_classes``, ``inference_mode``, ...) and
    timm's builder.
    """
    model_cls, host_args, feature_cfg = HOSTS[host]
    conv_kwargs = {k: kwargs.pop(k) for k in conv_args if k in kwargs}
    if default_placement is not None:
        kwargs.setdefault('placement', default_placement)
    return build_dynzoo_model(
        model_cls, variant, pretrained, pretrained_filter_fn=pretrained_filter_fn, feature_cfg=feature_cfg,
        conv_layer=partial(conv_layer, **conv_kwargs), **host_args, **kwargs)
