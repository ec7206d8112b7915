"""FMDConv networks: ResNet-18/34/50/101 and MobileNetV2 x0.5/0.75/1.0 with FMDConv layers.

Paper: T. Zhang et al., "FMDCConv: Fast multi-attention dynamic convolution via speed-accuracy trade-off",
Knowledge-Based Systems 317 (2025) 113393. Placement (spec §2.1): ResNet-18/34 -- every 3x3 in the BasicBlocks
(VERIFIED against Table 9); ResNet-50/101 and MobileNetV2 -- ODConv-style, every block conv (+ MobileNetV2's final
1x1), an assumption since the paper does not say. No checkpoint is published by the authors or by dynzoo.

``checkpoint_filter_fn`` converts the authors' training container (``{'state_dict': {'module.' + key: ...}}``):
their keys equal dynzoo's once the DDP prefix is gone, and their effective inference temperatures (kernel
softmax 34, sigmoid gates 1; spec addendum) are written into the temperature buffers.
"""
from functools import partial
from typing import Any, Dict

import torch

from timm.models import register_model

from dynzoo.models import _hub as hub
from dynzoo.layers.fmdconv import FMDConv2d
from ._builder import build_dynzoo_model, dynzoo_cfg, generate_dynzoo_cfgs, register_family, register_model_info
from ._hosts import DynamicMobileNetV2, DynamicResNet, resnet_layout

__all__ = ['checkpoint_filter_fn', 'AUTHORS_KERNEL_TEMPERATURE']

# the authors' code never anneals the kernel softmax: it runs at its init value for ever (spec addendum)
AUTHORS_KERNEL_TEMPERATURE = 34.0
AUTHORS_GATE_TEMPERATURE = 1.0

_FMD_ARGS = ('num_kernels', 'reduction', 'kernel_ratio', 'kernel_temperature', 'gate_temperature',
             'use_input_attn', 'use_output_attn', 'use_kernel_attn', 'strategy')

register_family(
    'fmdconv', paper='FMDCConv: Fast multi-attention dynamic convolution via speed-accuracy trade-off (KBS 2025)',
    paper_ids='doi:10.1016/j.knosys.2025.113393')


def _pop_conv_args(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return {k: kwargs.pop(k) for k in _FMD_ARGS if k in kwargs}


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """dynzoo or authors' FMDConv checkpoint -> dynzoo state dict.

    An authors' checkpoint (DDP ``module.`` prefix, no temperature buffers) gets the temperatures their code runs
    inference at; a dynzoo checkpoint carries its own and passes through unchanged.
    """
    sd = hub.strip_prefix(hub.unwrap_checkpoint(state_dict), 'module.')
    expected = model.state_dict()
    for key in expected:
        if key.endswith('attention2.temperature') and key not in sd:
            sd[key] = torch.tensor(AUTHORS_KERNEL_TEMPERATURE)
        elif key.endswith('attention.temperature') and key not in sd:
            sd[key] = torch.tensor(AUTHORS_GATE_TEMPERATURE)
    return sd


def _create_resnet(variant: str, depth: int, pretrained: bool = False, **kwargs) -> DynamicResNet:
    block, layers = resnet_layout(depth)
    conv_layer = partial(FMDConv2d, **_pop_conv_args(kwargs))
    return build_dynzoo_model(
        DynamicResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        conv_layer=conv_layer, block=block, layers=layers, **kwargs)


def _create_mobilenetv2(variant: str, multiplier: float, pretrained: bool = False, **kwargs) -> DynamicMobileNetV2:
    conv_layer = partial(FMDConv2d, **_pop_conv_args(kwargs))
    return build_dynzoo_model(
        DynamicMobileNetV2, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True),
        conv_layer=conv_layer, channel_multiplier=multiplier, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return dynzoo_cfg(
        license='apache-2.0', paper_name='FMDCConv (Zhang et al., KBS 2025)',
        paper_ids='doi:10.1016/j.knosys.2025.113393',
        notes=('no published weights: the authors released code only',),
        **kwargs)


_resnet_cfg = partial(_cfg, first_conv='conv1', classifier='fc')
_mbv2_cfg = partial(_cfg, first_conv='conv_stem', classifier='classifier')

default_cfgs = generate_dynzoo_cfgs({
    'fmdconv_resnet18.in1k': _resnet_cfg(),
    'fmdconv_resnet34.in1k': _resnet_cfg(),
    'fmdconv_resnet50.in1k': _resnet_cfg(),
    'fmdconv_resnet101.in1k': _resnet_cfg(),
    'fmdconv_mobilenetv2_050.in1k': _mbv2_cfg(),
    'fmdconv_mobilenetv2_075.in1k': _mbv2_cfg(),
    'fmdconv_mobilenetv2_100.in1k': _mbv2_cfg(),
})

# What the paper / authors' code state (None: not reported). Tests compare computed counts with these.
register_model_info('fmdconv_resnet18', 'fmdconv', paper_params=45_203_400, source='Table 9 (K=4) and authors\' code')
register_model_info('fmdconv_resnet34', 'fmdconv', paper_params=None, source='not in paper')
register_model_info('fmdconv_resnet50', 'fmdconv', paper_params=None, source='Table 6 (params not reported)')
register_model_info('fmdconv_resnet101', 'fmdconv', paper_params=None, source='not in paper')
register_model_info('fmdconv_mobilenetv2_050', 'fmdconv', paper_params=None, source='Table 7 (params not reported)')
register_model_info('fmdconv_mobilenetv2_075', 'fmdconv', paper_params=None, source='not in paper')
register_model_info('fmdconv_mobilenetv2_100', 'fmdconv', paper_params=None, source='not in paper')


@register_model
def fmdconv_resnet18(pretrained: bool = False, **kwargs) -> DynamicResNet:
    """FMDConv ResNet-18: the 16 BasicBlock 3x3 convs are FMDConv (K=4), as VERIFIED by Table 9."""
    return _create_resnet('fmdconv_resnet18', 18, pretrained, **kwargs)


@register_model
def fmdconv_resnet34(pretrained: bool = False, **kwargs) -> DynamicResNet:
    """FMDConv ResNet-34 (not in the paper): every BasicBlock 3x3 conv is FMDConv."""
    return _create_resnet('fmdconv_resnet34', 34, pretrained, **kwargs)


@register_model
def fmdconv_resnet50(pretrained: bool = False, **kwargs) -> DynamicResNet:
    """FMDConv ResNet-50 v1.5 (Table 6): all 48 bottleneck convs are FMDConv (ODConv-style placement)."""
    return _create_resnet('fmdconv_resnet50', 50, pretrained, **kwargs)


@register_model
def fmdconv_resnet101(pretrained: bool = False, **kwargs) -> DynamicResNet:
    """FMDConv ResNet-101 (not in the paper): all bottleneck convs are FMDConv."""
    return _create_resnet('fmdconv_resnet101', 101, pretrained, **kwargs)


@register_model
def fmdconv_mobilenetv2_050(pretrained: bool = False, **kwargs) -> DynamicMobileNetV2:
    """FMDConv MobileNetV2 x0.5 (Table 7): 51 convs (pw, dw, pw-linear, final 1x1) are FMDConv."""
    return _create_mobilenetv2('fmdconv_mobilenetv2_050', 0.5, pretrained, **kwargs)


@register_model
def fmdconv_mobilenetv2_075(pretrained: bool = False, **kwargs) -> DynamicMobileNetV2:
    """FMDConv MobileNetV2 x0.75 (not in the paper)."""
    return _create_mobilenetv2('fmdconv_mobilenetv2_075', 0.75, pretrained, **kwargs)


@register_model
def fmdconv_mobilenetv2_100(pretrained: bool = False, **kwargs) -> DynamicMobileNetV2:
    """FMDConv MobileNetV2 x1.0 (not in the paper)."""
    return _create_mobilenetv2('fmdconv_mobilenetv2_100', 1.0, pretrained, **kwargs)
