"""The dynamic-convolution baselines as networks: ODConv, DynamicConv and CondConv ResNets / MobileNetV2s.

ODConv (Li, Zhou, Yao, "Omni-Dimensional Dynamic Convolution", ICLR 2022; code and checkpoints: OSVAI/ODConv, MIT):
placement as in the authors' ``od_resnet`` / ``od_mobilenetv2``: every conv inside the ResNet blocks (``'blocks'``:
stem, downsample and FC static) and every MobileNetV2 conv after the stem, final 1x1 included (``'all_but_stem'``).
Tags: ``in1k`` where the authors released ImageNet weights (``ODCONV_RELEASES``), else ``untrained``. Names: the
authors' ``kernel_num`` is the "(Nx)" of their tables; ``odconv_<net>`` is the 4x network (the variant the A2D2C/FMDConv
tables compare against), ``odconv_<net>_1x`` / ``_2x`` the 1x / 2x ones, and ``num_kernels=`` builds any other.
Parameter counts equal the authors' code (tests compute them): ResNet-18 4x 44,901,640 (README 44.90 M) / 1x
11,943,944 (11.94 M), ResNet-50 4x 90,670,888 (90.67 M) / 1x 28,635,112 (28.64 M), ResNet-101 2x 90,441,623
(90.44 M) / 1x 50,818,769 (50.82 M), MobileNetV2 x1.0 / x0.75 / x0.5 4x 11,512,149 / 7,496,013 / 4,435,501
(11.51 / 7.50 / 4.44 M) and 1x 4,940,185 / 3,507,113 / 2,425,537 (4.94 / 3.51 / 2.43 M).

DynamicConv (Chen et al., CVPR 2020; no official code) and CondConv (Yang et al., NeurIPS 2019): placement
``'all_but_stem'`` (block convs and the downsample 1x1s), ``K = 4`` softmax kernels for DynamicConv and ``K = 8``
sigmoid-routed experts for CondConv, no kernel bias (BN follows). That is the configuration whose parameter counts
match the A2D2C paper's baseline rows: DynamicConv R18 45,475,008 (paper 45.47 M / 45.5 M), R50 100,895,176
(100.9 M); CondConv R50 189,856,200 (189.9 M), R18 89,822,912 (89.9 M in Table 4; Table 1's 81.35 M fits no
placement). ``placement='blocks'`` gives the block-convs-only variant.

``checkpoint_filter_fn`` converts the ODConv authors' training container (``{'state_dict': {'module.' + key}}``,
keys ``...attention.{fc,bn,channel_fc,filter_fc,spatial_fc,kernel_fc}``): ResNet keys are timm's already;
MobileNetV2 ``features.*`` keys are renamed to timm's (``conv_stem``, ``blocks.s.i.conv_pw``, ...). Their
checkpoints carry no temperature: the authors' evaluation runs at T = 1, which is written into the buffers.

Training at batch size 1 (a YOLO-style warm-up, OSVAI/ODConv issue #27, where the authors' code fails): the attention
trunk's BatchNorm normalises a single pooled sample with its running statistics (``single_sample_bn='running'``,
default, for ODConv and FMDConv alike); ``single_sample_bn='error'`` raises instead
(:class:`~dynzoo.layers.heads.PooledBatchNorm2d`).
"""
import re
from functools import partial
from typing import Any, Callable, Dict

import torch
import torch.nn as nn

from timm.models import register_model

from . import _hub as hub
from dynzoo.layers.odconv import DynamicConv2d, ODConv2d, RoutedCondConv2d
from ._builder import dynzoo_cfg, generate_dynzoo_cfgs, register_family, register_model_info
from ._hosts import HOST_CFGS, DynamicMobileNetV2, DynamicResNet, create_host, mobilenetv2_block_names

__all__ = ['checkpoint_filter_fn', 'convert_odconv_mobilenetv2_keys', 'ODCONV_RELEASES']

ODCONV_REPO = 'https://github.com/OSVAI/ODConv'
AUTHORS_TEMPERATURE = 1.0

_ODCONV_ARGS = ('num_kernels', 'reduction', 'min_channels', 'temperature', 'single_sample_bn', 'strategy')
_DYCONV_ARGS = ('num_kernels', 'ratio', 'temperature', 'bias', 'strategy')
_CONDCONV_ARGS = ('num_kernels', 'bias', 'strategy')

register_family('odconv', paper='Omni-Dimensional Dynamic Convolution (ICLR 2022)',
                paper_ids='openreview:DmpCfq6Mg39', code=ODCONV_REPO, temperature_schedule='linear')
register_family('dyconv', paper='Dynamic Convolution: Attention over Convolution Kernels (CVPR 2020)',
                paper_ids='arXiv:1912.03458', temperature_schedule='linear')
register_family('condconv', paper='CondConv: Conditionally Parameterized Convolutions for Efficient Inference '
                '(NeurIPS 2019)', paper_ids='arXiv:1904.04971')


def _drive(file_id: str) -> str:
    return f'https://drive.google.com/file/d/{file_id}/view?usp=sharing'


# The authors' released ImageNet checkpoints, as their README lists them: model -> (kernel_num, top-1, top-5, url)
ODCONV_RELEASES = {
    'odconv_resnet18_1x': (1, 73.05, 91.05, _drive('1AxCKAHJve3fbe2SnvoHsSucNvjv5Dxow')),
    'odconv_resnet18': (4, 74.19, 91.47, _drive('1Krsaa0fBKluFCyO7nmg-R9LlsoSUjJj2')),
    'odconv_resnet50_1x': (1, 77.87, 93.77, _drive('1Aqwv6uQ9iI8a8Z5vjqmKuSTar0U8gfVJ')),
    'odconv_resnet50': (4, 78.50, 93.99, _drive('1uO774twnIYLiDV2BAsVM136k4EAhs6oh')),
    'odconv_resnet101_1x': (1, 78.84, 94.27, _drive('1PJNcrw2RP9xG-18gw2NE93mwVmQBIbeM')),
    'odconv_resnet101_2x': (2, 79.15, 94.34, _drive('1ph0woQfR2Ut2JfV4RKQPB6tAXf9pZmTo')),
    'odconv_mobilenetv2_100_1x': (1, 74.74, 91.95, _drive('1Du_AH_pvtFE8ABg_FLjtPccVypw5AajU')),
    'odconv_mobilenetv2_100': (4, 75.29, 92.18, _drive('1HfwoBWOGsiiuhoOyetoQeJ8iXrCi5lJv')),
    'odconv_mobilenetv2_075_1x': (1, 72.71, 90.85, _drive('1g3_OppE5jXW5eO7jy2vbw9mfVqNz-_Tk')),
    'odconv_mobilenetv2_075': (4, 74.01, 91.37, _drive('1bGloR4WUAsGEQpbmqLO-hShIcoV0ut42')),
    'odconv_mobilenetv2_050_1x': (1, 68.06, 87.67, _drive('137qpjBdLjQ6MNNQ-YbqgWZeTEAq7AM_2')),
    'odconv_mobilenetv2_050': (4, 70.23, 88.86, _drive('1x2bB8GxNAKfvO-_MX-9Z9mqABBfHkYed')),
}

def convert_odconv_mobilenetv2_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The authors' torchvision-layout MobileNetV2 keys -> timm's.

    ``features.0.{0,1}`` -> ``conv_stem``/``bn1``; ``features.j.conv.*`` (inverted residual j) -> ``blocks.s.i``
    (first block, expansion 1: dw, bn, pw-linear, bn -> ``conv_dw, bn1, conv_pw, bn2``; the others: pw, bn, dw, bn,
    pw-linear, bn -> ``conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3``); ``features.18.{0,1}`` -> ``conv_head``/``bn2``;
    ``classifier.1`` -> ``classifier``.
    """
    blocks = mobilenetv2_block_names()
    first = {'conv.0.0': 'conv_dw', 'conv.0.1': 'bn1', 'conv.1': 'conv_pw', 'conv.2': 'bn2'}
    other = {'conv.0.0': 'conv_pw', 'conv.0.1': 'bn1', 'conv.1.0': 'conv_dw', 'conv.1.1': 'bn2',
             'conv.2': 'conv_pwl', 'conv.3': 'bn3'}
    head_idx = len(blocks) + 1
    out = {}
    for key, value in state_dict.items():
        new = key
        m = re.match(r'features\.(\d+)\.(.*)$', key)
        if m:
            idx, rest = int(m.group(1)), m.group(2)
            if idx == 0 or idx == head_idx:
                conv_name, bn_name = ('conv_stem', 'bn1') if idx == 0 else ('conv_head', 'bn2')
                rest = re.sub(r'^0\.', conv_name + '.', rest)
                new = re.sub(r'^1\.', bn_name + '.', rest)
            elif 1 <= idx <= len(blocks):
                table = first if idx == 1 else other
                for src in sorted(table, key=len, reverse=True):
                    if rest.startswith(src + '.'):
                        new = f'{blocks[idx - 1]}.{table[src]}.{rest[len(src) + 1:]}'
                        break
                else:
                    raise hub.CheckpointError(f'unexpected key {key!r} in an ODConv MobileNetV2 checkpoint')
            else:
                raise hub.CheckpointError(f'unexpected key {key!r} in an ODConv MobileNetV2 checkpoint')
        elif key.startswith('classifier.1.'):
            new = 'classifier.' + key[len('classifier.1.'):]
        out[new] = value
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """dynzoo or ODConv-authors' checkpoint -> dynzoo state dict (DDP prefix stripped, MobileNetV2 keys renamed,
    missing temperature buffers set to the authors' inference temperature 1). Also used for DynamicConv/CondConv
    checkpoints in dynzoo layout."""
    sd = hub.strip_prefix(hub.unwrap_checkpoint(state_dict), 'module.')
    if isinstance(model, DynamicMobileNetV2) and any(k.startswith('features.') for k in sd):
        sd = convert_odconv_mobilenetv2_keys(sd)
    for key in model.state_dict():
        if key.endswith('.temperature') and key not in sd:
            sd[key] = torch.tensor(AUTHORS_TEMPERATURE)
    return sd


def _create_od(variant: str, host: str, num_kernels: int, pretrained: bool = False, **kwargs):
    return create_host(variant, host, partial(ODConv2d, num_kernels=num_kernels), pretrained, checkpoint_filter_fn,
                       conv_args=_ODCONV_ARGS, **kwargs)


def _create_baseline(variant: str, host: str, conv_layer: Callable, conv_args, pretrained: bool = False, **kwargs):
    return create_host(variant, host, partial(conv_layer, bias=False), pretrained, checkpoint_filter_fn,
                       conv_args=conv_args, default_placement='all_but_stem', **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return dynzoo_cfg(**kwargs)


def _od_cfg(model: str, **kwargs) -> Dict[str, Any]:
    notes = ['ODConv: Li, Zhou, Yao, ICLR 2022']
    if model in ODCONV_RELEASES:
        k, top1, _, url = ODCONV_RELEASES[model]
        notes.append(f'authors\' checkpoint ({k}x, README top-1 {top1}): {url}; not mirrored on the hub -- load the '
                     'downloaded .pth with pretrained_cfg_overlay=dict(file=...)')
    return _cfg(license='mit', origin_url=ODCONV_REPO, paper_ids='openreview:DmpCfq6Mg39',
                paper_name='Omni-Dimensional Dynamic Convolution', notes=tuple(notes), **kwargs)


def _od_tag(model: str) -> str:
    """``model.in1k`` where the authors released ImageNet weights, else timm's ``model.untrained``."""
    return f'{model}.in1k' if model in ODCONV_RELEASES else f'{model}.untrained'


_dy_cfg = partial(_cfg, license='apache-2.0', paper_ids='arXiv:1912.03458', paper_name='Dynamic Convolution',
                  notes=('no official code or weights',), **HOST_CFGS['resnet'])
_cc_cfg = partial(_cfg, license='apache-2.0', paper_ids='arXiv:1904.04971', paper_name='CondConv',
                  notes=('no PyTorch weights',), **HOST_CFGS['resnet'])

_OD_RESNETS = ('odconv_resnet18', 'odconv_resnet18_1x', 'odconv_resnet34', 'odconv_resnet50', 'odconv_resnet50_1x',
               'odconv_resnet101', 'odconv_resnet101_1x', 'odconv_resnet101_2x')
_OD_MBV2 = ('odconv_mobilenetv2_050', 'odconv_mobilenetv2_050_1x', 'odconv_mobilenetv2_075',
            'odconv_mobilenetv2_075_1x', 'odconv_mobilenetv2_100', 'odconv_mobilenetv2_100_1x')

default_cfgs = generate_dynzoo_cfgs({
    **{_od_tag(m): _od_cfg(m, **HOST_CFGS['resnet']) for m in _OD_RESNETS},
    **{_od_tag(m): _od_cfg(m, **HOST_CFGS['mobilenetv2']) for m in _OD_MBV2},
    'dyconv_resnet18.untrained': _dy_cfg(),
    'dyconv_resnet50.untrained': _dy_cfg(),
    'condconv_resnet18.untrained': _cc_cfg(),
    'condconv_resnet50.untrained': _cc_cfg(),
})

# What the authors' README (ODConv) and the A2D2C paper's tables print. Tests compare computed counts with these.
_OD_PRINTED = {
    'odconv_resnet18': (44_900_000, 1.916e9), 'odconv_resnet18_1x': (11_940_000, 1.838e9),
    'odconv_resnet34': (None, None),
    'odconv_resnet50': (90_670_000, 4.080e9), 'odconv_resnet50_1x': (28_640_000, 3.916e9),
    'odconv_resnet101': (None, None),
    'odconv_resnet101_1x': (50_820_000, 7.675e9), 'odconv_resnet101_2x': (90_440_000, 7.802e9),
    'odconv_mobilenetv2_050': (4_440_000, 106.4e6), 'odconv_mobilenetv2_050_1x': (2_430_000, 101.8e6),
    'odconv_mobilenetv2_075': (7_500_000, 226.3e6), 'odconv_mobilenetv2_075_1x': (3_510_000, 217.1e6),
    'odconv_mobilenetv2_100': (11_510_000, 327.1e6), 'odconv_mobilenetv2_100_1x': (4_940_000, 311.8e6),
}
for _m, (_p, _macs) in _OD_PRINTED.items():
    register_model_info(_m, 'odconv', paper_params=_p, paper_macs=_macs,
                        source='OSVAI/ODConv README' if _p else 'not reported by the authors')
register_model_info('dyconv_resnet18', 'dyconv', paper_params=45_470_000, paper_macs=1.86e9,
                    source='A2D2C paper Table 1 (45.5 M in Table 4)')
register_model_info('dyconv_resnet50', 'dyconv', paper_params=100_900_000, paper_macs=3.97e9,
                    source='A2D2C paper Table 5')
register_model_info('condconv_resnet18', 'condconv', paper_params=89_900_000, paper_macs=1.89e9,
                    source='A2D2C paper Table 4 (81.35 M in Table 1)')
register_model_info('condconv_resnet50', 'condconv', paper_params=189_900_000, paper_macs=3.98e9,
                    source='A2D2C paper Table 5')


@register_model
def odconv_resnet18(pretrained: bool = False, **kwargs) -> DynamicResNet:
    """ODConv (4x) ResNet-18: the 16 BasicBlock 3x3 convs are ODConv, K=4, r=1/16 (authors' ``od_resnet18``)."""
    return _create_od('odconv_resnet18', 'resnet18', 4, pretrained, **kwargs)


@register_model
def odconv_resnet18_1x(pretrained: bool = False, **kwargs) -> DynamicResNet:
    """ODConv (1x) ResNet-18: as ``odconv_resnet18`` with one kernel (no kernel attention)."""
    return _create_od('odconv_resnet18_1x', 'resnet18', 1, pretrained, **kwargs)


@register_model
def odconv_resnet34(pretrained: bool = False, **kwargs) -> DynamicResNet:
    """ODConv (4x) ResNet-34 (built by the authors' code, no checkpoint released)."""
    return _create_od('odconv_resnet34', 'resnet34', 4, pretrained, **kwargs)


@register_model
def odconv_resnet50(pretrained: bool = False, **kwargs) -> DynamicResNet:
    """ODConv (4x) ResNet-50 v1.5: all 48 bottleneck convs are ODConv, K=4."""
    return _create_od('odconv_resnet50', 'resnet50', 4, pretrained, **kwargs)


@register_model
def odconv_resnet50_1x(pretrained: bool = False, **kwargs) -> DynamicResNet:
    """ODConv (1x) ResNet-50 v1.5."""
    return _create_od('odconv_resnet50_1x', 'resnet50', 1, pretrained, **kwargs)


@register_model
def odconv_resnet101(pretrained: bool = False, **kwargs) -> DynamicResNet:
    """ODConv (4x) ResNet-101 (the authors released 1x and 2x only: ``odconv_resnet101_1x`` / ``_2x``)."""
    return _create_od('odconv_resnet101', 'resnet101', 4, pretrained, **kwargs)


@register_model
def odconv_resnet101_1x(pretrained: bool = False, **kwargs) -> DynamicResNet:
    """ODConv (1x) ResNet-101."""
    return _create_od('odconv_resnet101_1x', 'resnet101', 1, pretrained, **kwargs)


@register_model
def odconv_resnet101_2x(pretrained: bool = False, **kwargs) -> DynamicResNet:
    """ODConv (2x) ResNet-101."""
    return _create_od('odconv_resnet101_2x', 'resnet101', 2, pretrained, **kwargs)


@register_model
def odconv_mobilenetv2_050(pretrained: bool = False, **kwargs) -> DynamicMobileNetV2:
    """ODConv (4x) MobileNetV2 x0.5: every conv after the stem (pw, dw, pw-linear, final 1x1) is ODConv."""
    return _create_od('odconv_mobilenetv2_050', 'mobilenetv2_050', 4, pretrained, **kwargs)


@register_model
def odconv_mobilenetv2_050_1x(pretrained: bool = False, **kwargs) -> DynamicMobileNetV2:
    """ODConv (1x) MobileNetV2 x0.5."""
    return _create_od('odconv_mobilenetv2_050_1x', 'mobilenetv2_050', 1, pretrained, **kwargs)


@register_model
def odconv_mobilenetv2_075(pretrained: bool = False, **kwargs) -> DynamicMobileNetV2:
    """ODConv (4x) MobileNetV2 x0.75."""
    return _create_od('odconv_mobilenetv2_075', 'mobilenetv2_075', 4, pretrained, **kwargs)


@register_model
def odconv_mobilenetv2_075_1x(pretrained: bool = False, **kwargs) -> DynamicMobileNetV2:
    """ODConv (1x) MobileNetV2 x0.75."""
    return _create_od('odconv_mobilenetv2_075_1x', 'mobilenetv2_075', 1, pretrained, **kwargs)


@register_model
def odconv_mobilenetv2_100(pretrained: bool = False, **kwargs) -> DynamicMobileNetV2:
    """ODConv (4x) MobileNetV2 x1.0."""
    return _create_od('odconv_mobilenetv2_100', 'mobilenetv2_100', 4, pretrained, **kwargs)


@register_model
def odconv_mobilenetv2_100_1x(pretrained: bool = False, **kwargs) -> DynamicMobileNetV2:
    """ODConv (1x) MobileNetV2 x1.0."""
    return _create_od('odconv_mobilenetv2_100_1x', 'mobilenetv2_100', 1, pretrained, **kwargs)


@register_model
def dyconv_resnet18(pretrained: bool = False, **kwargs) -> DynamicResNet:
    """DynamicConv ResNet-18: every conv but the stem is a DynamicConv (K=4, softmax attention, temperature)."""
    return _create_baseline('dyconv_resnet18', 'resnet18', DynamicConv2d, _DYCONV_ARGS, pretrained, **kwargs)


@register_model
def dyconv_resnet50(pretrained: bool = False, **kwargs) -> DynamicResNet:
    """DynamicConv ResNet-50 v1.5: every conv but the stem is a DynamicConv (K=4)."""
    return _create_baseline('dyconv_resnet50', 'resnet50', DynamicConv2d, _DYCONV_ARGS, pretrained, **kwargs)


@register_model
def condconv_resnet18(pretrained: bool = False, **kwargs) -> DynamicResNet:
    """CondConv ResNet-18: every conv but the stem is a CondConv (K=8 experts, sigmoid routing)."""
    return _create_baseline('condconv_resnet18', 'resnet18', RoutedCondConv2d, _CONDCONV_ARGS, pretrained, **kwargs)


@register_model
def condconv_resnet50(pretrained: bool = False, **kwargs) -> DynamicResNet:
    """CondConv ResNet-50 v1.5: every conv but the stem is a CondConv (K=8 experts)."""
    return _create_baseline('condconv_resnet50', 'resnet50', RoutedCondConv2d, _CONDCONV_ARGS, pretrained, **kwargs)
