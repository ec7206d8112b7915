"""A2D2C and A2D2C+ networks: ResNet-18/50 and MobileNetV2 x0.5/0.75/1.0 with A2D2C layers.

Paper: T. Zhang, F. Wan, X. Miao, J. Deng, X. Xie, Y. Long, "A2D2C: Adaptive Attention-Driven Dynamic
Convolution for Local Feature Adaptation". No code and no weights are published. ``a2d2c_*`` run the fused mode
(routing from sampled responses, then one aggregated convolution), ``a2d2c_plus_*`` the sum mode (Eq. 8, the ``K``
responses mixed); both have the same parameters and state-dict keys, so weights move freely between them.

Placement (``placement=``, the hosts' vocabulary, :mod:`dynzoo.models._hosts`):

* ``'blocks'`` on ResNet (stem, downsample and FC static) and ``'all_but_stem'`` on MobileNetV2 (pw, dw, pw-linear,
  final 1x1): the defaults, ODConv's placement and the only reading consistent with the paper's parameter tables
  (Table 11's slope is exactly the ResNet-18 block 3x3 weights);
* ``'first3x3_s234'`` (ResNet) / ``'depthwise'`` (MobileNetV2): the narrower Sec. 3.3 text, the first 3x3 of each
  block in stages 2-4 / the depthwise 3x3 only;
* ``'first_conv'`` (Table 10's "initial" placement): the first conv of every block.

Parameter counts (K=4, 1000 classes; tests compute them) against the paper's printed ones:
R18 44,649,784 (paper 44.9 M Table 4, 44.93 M Tables 9/11/12, 43.93 M Table 1), R50 87,609,560 (89.70 M),
MBv2 x0.5 3,984,099 (4.05 M ImageNet Table 6, 3.32 M CIFAR Table 3), x0.75 6,634,179 (5.08 M), x1.0 10,088,635
(10.21 M). No single router design reproduces all printed counts: the paper's counts need ~0.29 M of
K-independent routing parameters for R18 but ~2.1 M for R50, and its MBv2 x0.75 count fits no placement. dynzoo
keeps the text's shared scalar router (``C_out + 1`` parameters per layer), which fits best overall.
"""
from functools import partial
from typing import Any, Dict

import torch.nn as nn

from timm.models import register_model

from . import _hub as hub
from dynzoo.layers.a2d2c import A2D2CConv2d
from ._builder import dynzoo_cfg, generate_dynzoo_cfgs, register_family, register_model_info
from ._hosts import HOST_CFGS, DynamicMobileNetV2, DynamicResNet, create_host

__all__ = ['checkpoint_filter_fn']

_A2D2C_ARGS = ('num_kernels', 'num_points', 'temperature', 'sample_per', 'eval_sampling', 'strategy')

register_family(
    'a2d2c', paper='A2D2C: Adaptive Attention-Driven Dynamic Convolution for Local Feature Adaptation',
    paper_ids='none given (no arXiv id or DOI in the paper; no code released)', temperature_schedule='linear')


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """dynzoo A2D2C checkpoint (also a DDP-wrapped one) -> state dict. No authors' checkpoint exists."""
    return hub.strip_prefix(hub.unwrap_checkpoint(state_dict), 'module.')


def _create(variant: str, host: str, mode: str, pretrained: bool = False, **kwargs):
    return create_host(variant, host, partial(A2D2CConv2d, mode=mode), pretrained, checkpoint_filter_fn,
                       conv_args=_A2D2C_ARGS, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return dynzoo_cfg(
        license='apache-2.0', paper_name='A2D2C: Adaptive Attention-Driven Dynamic Convolution (Zhang et al.)',
        paper_ids='A2D2C (Zhang, Wan, Miao, Deng, Xie, Long)',
        notes=('no published weights: the authors released neither code nor checkpoints',),
        **kwargs)


default_cfgs = generate_dynzoo_cfgs({
    **{f'a2d2c_{plus}{h}.untrained': _cfg(**HOST_CFGS['resnet'])
       for plus in ('', 'plus_') for h in ('resnet18', 'resnet50')},
    **{f'a2d2c_{plus}{h}.untrained': _cfg(**HOST_CFGS['mobilenetv2'])
       for plus in ('', 'plus_') for h in ('mobilenetv2_050', 'mobilenetv2_075', 'mobilenetv2_100')},
})

# The paper's printed numbers (ImageNet tables where they exist; MAdds at 224, A2D2C / A2D2C+ as printed).
for _plus, _tag in (('', 'A2D2C'), ('plus_', 'A2D2C+')):
    register_model_info(f'a2d2c_{_plus}resnet18', 'a2d2c', paper_params=44_900_000,
                        paper_macs=1.93e9, source=f'Table 4 ({_tag} 4x; 44.93 M in Tables 9/11/12)')
    register_model_info(f'a2d2c_{_plus}resnet50', 'a2d2c', paper_params=89_700_000,
                        paper_macs=4.08e9 if not _plus else 4.10e9, source=f'Table 5 ({_tag} 4x)')
    register_model_info(f'a2d2c_{_plus}mobilenetv2_050', 'a2d2c', paper_params=4_050_000,
                        paper_macs=105.2e6, source=f'Table 6 ({_tag} 4x, ImageNet; 3.32 M in CIFAR Table 3)')
    register_model_info(f'a2d2c_{_plus}mobilenetv2_075', 'a2d2c', paper_params=5_080_000,
                        paper_macs=0.224e9 if not _plus else 0.226e9,
                        source=f'Table 3 ({_tag} 4x, CIFAR-100; fits no placement)')
    register_model_info(f'a2d2c_{_plus}mobilenetv2_100', 'a2d2c', paper_params=10_210_000,
                        paper_macs=0.323e9 if not _plus else 0.325e9, source=f'Table 3 ({_tag} 4x, CIFAR-100)')


@register_model
def a2d2c_resnet18(pretrained: bool = False, **kwargs) -> DynamicResNet:
    """A2D2C ResNet-18 (Table 4): the 16 BasicBlock 3x3 convs are A2D2C (K=4, M=100), fused mode."""
    return _create('a2d2c_resnet18', 'resnet18', 'fused', pretrained, **kwargs)


@register_model
def a2d2c_resnet50(pretrained: bool = False, **kwargs) -> DynamicResNet:
    """A2D2C ResNet-50 v1.5 (Table 5): all 48 bottleneck convs are A2D2C (K=4, M=100), fused mode."""
    return _create('a2d2c_resnet50', 'resnet50', 'fused', pretrained, **kwargs)


@register_model
def a2d2c_plus_resnet18(pretrained: bool = False, **kwargs) -> DynamicResNet:
    """A2D2C+ ResNet-18 (Table 4): as ``a2d2c_resnet18``, sum mode (Eq. 8)."""
    return _create('a2d2c_plus_resnet18', 'resnet18', 'sum', pretrained, **kwargs)


@register_model
def a2d2c_plus_resnet50(pretrained: bool = False, **kwargs) -> DynamicResNet:
    """A2D2C+ ResNet-50 v1.5 (Table 5): as ``a2d2c_resnet50``, sum mode (Eq. 8)."""
    return _create('a2d2c_plus_resnet50', 'resnet50', 'sum', pretrained, **kwargs)


@register_model
def a2d2c_mobilenetv2_050(pretrained: bool = False, **kwargs) -> DynamicMobileNetV2:
    """A2D2C MobileNetV2 x0.5 (Table 6): 51 convs (pw, dw, pw-linear, final 1x1) are A2D2C, fused mode."""
    return _create('a2d2c_mobilenetv2_050', 'mobilenetv2_050', 'fused', pretrained, **kwargs)


@register_model
def a2d2c_mobilenetv2_075(pretrained: bool = False, **kwargs) -> DynamicMobileNetV2:
    """A2D2C MobileNetV2 x0.75 (Table 3), fused mode."""
    return _create('a2d2c_mobilenetv2_075', 'mobilenetv2_075', 'fused', pretrained, **kwargs)


@register_model
def a2d2c_mobilenetv2_100(pretrained: bool = False, **kwargs) -> DynamicMobileNetV2:
    """A2D2C MobileNetV2 x1.0 (Table 3), fused mode."""
    return _create('a2d2c_mobilenetv2_100', 'mobilenetv2_100', 'fused', pretrained, **kwargs)


@register_model
def a2d2c_plus_mobilenetv2_050(pretrained: bool = False, **kwargs) -> DynamicMobileNetV2:
    """A2D2C+ MobileNetV2 x0.5 (Table 6), sum mode."""
    return _create('a2d2c_plus_mobilenetv2_050', 'mobilenetv2_050', 'sum', pretrained, **kwargs)


@register_model
def a2d2c_plus_mobilenetv2_075(pretrained: bool = False, **kwargs) -> DynamicMobileNetV2:
    """A2D2C+ MobileNetV2 x0.75 (Table 3), sum mode."""
    return _create('a2d2c_plus_mobilenetv2_075', 'mobilenetv2_075', 'sum', pretrained, **kwargs)


@register_model
def a2d2c_plus_mobilenetv2_100(pretrained: bool = False, **kwargs) -> DynamicMobileNetV2:
    """A2D2C+ MobileNetV2 x1.0 (Table 3), sum mode."""
    return _create('a2d2c_plus_mobilenetv2_100', 'mobilenetv2_100', 'sum', pretrained, **kwargs)
