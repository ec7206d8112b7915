"""FMDConv networks: ResNet-18/34/50/101 and MobileNetV2 x0.5/0.75/1.0 with FMDConv layers.

Paper: T. Zhang et al., "FMDCConv: Fast multi-attention dynamic convolution via speed-accuracy trade-off",
Knowledge-Based Systems 317 (2025) 113393; code: tianyu00824/FMDConv. Placement: ResNet-18/34 -- every 3x3 in the
BasicBlocks (``'blocks'``; Table 9's parameter count confirms it); ResNet-50/101 -- every bottleneck conv
(``'blocks'``) and MobileNetV2 every conv but the stem (``'all_but_stem'``), ODConv's placement: dynzoo's choice,
the paper does not say. No checkpoint is published by the authors or by dynzoo (tag ``untrained``).

``checkpoint_filter_fn`` converts the authors' training container (``{'state_dict': {'module.' + key: ...}}``):
their keys equal dynzoo's once the DDP prefix is gone, and their effective inference temperatures (kernel
softmax 34, sigmoid gates 1: the authors' code anneals the gates' temperature to 1 and never updates the
softmax's, whose update method is misspelled) are written into the temperature buffers.

Training at batch size 1: the channel/filter trunk's BatchNorm normalises a single pooled sample with its running
statistics (``single_sample_bn='running'``, default; the authors' code fails there, as ODConv's does);
``single_sample_bn='error'`` raises instead (:class:`~dynzoo.layers.heads.PooledBatchNorm2d`).
"""
from typing import Any, Dict

import torch

from timm.models import register_model

from . import _hub as hub
from dynzoo.layers.fmdconv import FMDConv2d
from ._builder import dynzoo_cfg, generate_dynzoo_cfgs, register_family, register_model_info
from ._hosts import HOST_CFGS, DynamicMobileNetV2, DynamicResNet, create_host

__all__ = ['checkpoint_filter_fn', 'AUTHORS_KERNEL_TEMPERATURE']

# the authors' code never anneals the kernel softmax: it runs at its init value (34) for ever
AUTHORS_KERNEL_TEMPERATURE = 34.0
AUTHORS_GATE_TEMPERATURE = 1.0

_FMD_ARGS = ('num_kernels', 'reduction', 'kernel_ratio', 'kernel_temperature', 'gate_temperature',
             'use_input_attn', 'use_output_attn', 'use_kernel_attn', 'single_sample_bn', 'strategy')

register_family(
    'fmdconv', paper='FMDCConv: Fast multi-attention dynamic convolution via speed-accuracy trade-off (KBS 2025)',
    paper_ids='doi:10.1016/j.knosys.2025.113393', temperature_schedule='fmdconv')


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


def _create(variant: str, host: str, pretrained: bool = False, **kwargs):
    return create_host(variant, host, FMDConv2d, pretrained, checkpoint_filter_fn, conv_args=_FMD_ARGS, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return dynzoo_cfg(
        license='apache-2.0', paper_name='FMDCConv (Zhang et al., KBS 2025)',
        paper_ids='doi:10.1016/j.knosys.2025.113393',
        notes=('no published weights: the authors released code only',),
        **kwargs)


default_cfgs = generate_dynzoo_cfgs({
    **{f'fmdconv_{h}.untrained': _cfg(**HOST_CFGS['resnet'])
       for h in ('resnet18', 'resnet34', 'resnet50', 'resnet101')},
    **{f'fmdconv_{h}.untrained': _cfg(**HOST_CFGS['mobilenetv2'])
       for h in ('mobilenetv2_050', 'mobilenetv2_075', 'mobilenetv2_100')},
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
    """FMDConv ResNet-18: the 16 BasicBlock 3x3 convs are FMDConv (K=4), Table 9's count."""
    return _create('fmdconv_resnet18', 'resnet18', pretrained, **kwargs)


@register_model
def fmdconv_resnet34(pretrained: bool = False, **kwargs) -> DynamicResNet:
    """FMDConv ResNet-34 (not in the paper): every BasicBlock 3x3 conv is FMDConv."""
    return _create('fmdconv_resnet34', 'resnet34', pretrained, **kwargs)


@register_model
def fmdconv_resnet50(pretrained: bool = False, **kwargs) -> DynamicResNet:
    """FMDConv ResNet-50 v1.5 (Table 6): all 48 bottleneck convs are FMDConv (ODConv-style placement)."""
    return _create('fmdconv_resnet50', 'resnet50', pretrained, **kwargs)


@register_model
def fmdconv_resnet101(pretrained: bool = False, **kwargs) -> DynamicResNet:
    """FMDConv ResNet-101 (not in the paper): all bottleneck convs are FMDConv."""
    return _create('fmdconv_resnet101', 'resnet101', pretrained, **kwargs)


@register_model
def fmdconv_mobilenetv2_050(pretrained: bool = False, **kwargs) -> DynamicMobileNetV2:
    """FMDConv MobileNetV2 x0.5 (Table 7): 51 convs (pw, dw, pw-linear, final 1x1) are FMDConv."""
    return _create('fmdconv_mobilenetv2_050', 'mobilenetv2_050', pretrained, **kwargs)


@register_model
def fmdconv_mobilenetv2_075(pretrained: bool = False, **kwargs) -> DynamicMobileNetV2:
    """FMDConv MobileNetV2 x0.75 (not in the paper)."""
    return _create('fmdconv_mobilenetv2_075', 'mobilenetv2_075', pretrained, **kwargs)


@register_model
def fmdconv_mobilenetv2_100(pretrained: bool = False, **kwargs) -> DynamicMobileNetV2:
    """FMDConv MobileNetV2 x1.0 (not in the paper)."""
    return _create('fmdconv_mobilenetv2_100', 'mobilenetv2_100', pretrained, **kwargs)
