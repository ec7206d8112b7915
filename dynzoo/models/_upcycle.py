"""Function-preserving upcycling: a dynamic network that starts as an exact copy of a static timm checkpoint.

Every host-based model (:mod:`dynzoo.models._hosts`: FMDConv, ODConv, DynamicConv, CondConv, A2D2C, A2D2C+, and
``sgdm_resnet18``) is timm's ResNet / MobileNetV2 with some convs swapped for dynamic ones of identical geometry, so
a static checkpoint of the host (timm's key names, ``timm.create_model('resnet50').state_dict()`` or timm's hub
``model.safetensors``) holds every tensor of the dynamic network except the dynamic layers' own. Upcycling copies
the static tensors as they are (stem, BatchNorms, downsamples, classifier) and starts each dynamic conv as the static
conv it replaces (:meth:`~dynzoo.layers.dynamic.DynamicConv2dBase.upcycled_state`): the last layer of every
attention head is zero, so softmax mixing weights are uniform and sigmoid gates 1/2 at any temperature, and each
expert is the static kernel divided by those constants plus a seeded perturbation that the mixture cancels
(``sum_k alpha_k P_k = 0``). At step 0 the network computes the static network's function in eval mode (exactly,
up to float rounding; ``docs/upcycling.md`` gives the measured errors), while the experts differ and every head gets
gradients. An inserted module with no static counterpart (SGDM) starts as the identity
(:meth:`~dynzoo.layers.sgdm.SGDM.identity_state`).

The heads' hidden layers keep the model's own initialisation, as a fresh timm head does; the perturbation is drawn
from ``seed`` alone, layer after layer in module order.
"""
import re
from typing import Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from dynzoo.layers.dynamic import DynamicConv2dBase
from dynzoo.layers.sgdm import SGDM
from dynzoo.layers.temperature import TemperatureAnnealing
from ._hosts import HOSTS

__all__ = ['static_source', 'upcycle_state_dict', 'upcycle_model', 'DEFAULT_PERTURBATION']

# RMS of each expert's perturbation relative to the RMS of its share of the static kernel
DEFAULT_PERTURBATION = 0.1

_HOST_IN_NAME = re.compile(r'_(' + '|'.join(sorted(HOSTS, key=len, reverse=True)) + r')(?:_|$)')


def static_source(variant: str) -> Optional[str]:
    """timm architecture name of the static host ``variant`` upcycles from (``'fmdconv_resnet50'`` ->
    ``'resnet50'``, ``'odconv_mobilenetv2_050_1x'`` -> ``'mobilenetv2_050'``); ``None`` where the family cannot
    upcycle (a network that is not one of :data:`dynzoo.models._hosts.HOSTS`: AttNet, ATConv transformers, DMF,
    SGDM's CSPDarknets). The name of a variant is its family, its host and its options, in that order."""
    match = _HOST_IN_NAME.search(variant.partition('.')[0])
    return match.group(1) if match else None


def _upcycled_modules(model: nn.Module):
    """``(name, module)`` of every module upcycling replaces as a whole, parents before (and instead of) their
    children: dynamic convs and inserted SGDMs."""
    taken = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + '.') for prefix in taken):
            continue
        if isinstance(module, (DynamicConv2dBase, SGDM)):
            taken.append(name)
            yield name, module


@torch.no_grad()
def upcycle_state_dict(
        model: nn.Module,
        static_state_dict: Mapping[str, torch.Tensor],
        *,
        seed: int = 0,
        perturbation: float = DEFAULT_PERTURBATION,
        keep: Sequence[str] = (),
) -> Dict[str, torch.Tensor]:
    """A complete state dict for ``model`` (it loads with ``strict=True``) whose eval outputs equal those of the
    static network ``static_state_dict`` holds (timm's keys of the host, see :func:`static_source`); ``model`` is
    left unchanged.

    Each dynamic conv at ``name`` starts as the static conv ``name.weight`` (and ``name.bias``) it replaces, with
    seeded experts (``perturbation``: their RMS spread relative to the static share, ``seed``); an inserted SGDM
    starts as the identity; the model's temperature-schedule state and the keys named in ``keep`` (e.g. a fresh
    classifier of another class count: ``keep=('fc.weight', 'fc.bias')``; the checkpoint's entries there are
    ignored) are the model's own; every other tensor is copied from the static state dict (converted to the model's
    dtype and device). Raises ``ValueError`` naming the keys where
    the checkpoint does not fit the model (missing, unused or of another shape) -- it was made for another host.
    """
    if not perturbation >= 0.0:
        raise ValueError(f'perturbation must be >= 0, got {perturbation}')
    static = {k: v for k, v in static_state_dict.items() if k not in set(keep)}
    generator = torch.Generator().manual_seed(int(seed))
    out: Dict[str, torch.Tensor] = {}
    used = set()
    for name, module in _upcycled_modules(model):
        if isinstance(module, SGDM):
            state = module.identity_state(generator, perturbation)
        else:
            weight_key, bias_key = f'{name}.weight', f'{name}.bias'
            if weight_key not in static:
                raise ValueError(f'{type(model).__name__}: the static checkpoint has no kernel {weight_key!r} for '
                                 f'the dynamic conv {name!r}: it was made for another architecture')
            try:
                state = module.upcycled_state(static[weight_key], static.get(bias_key), generator=generator,
                                              perturbation=perturbation)
            except ValueError as e:
                raise ValueError(f'{name}: {e}') from e
            used.update(k for k in (weight_key, bias_key) if k in static)
        out.update({f'{name}.{k}': v for k, v in state.items()})
    own_state = {f'{name}.{k}': v for name, m in model.named_modules() if isinstance(m, TemperatureAnnealing)
                 for k, v in m.state_dict().items()}
    missing, mismatched = [], []
    for key, value in model.state_dict().items():
        if key in out:
            continue
        if key in own_state or key in keep:
            out[key] = value.clone()
        elif key not in static:
            missing.append(key)
        elif tuple(static[key].shape) != tuple(value.shape):
            mismatched.append(f'{key}: expected {tuple(value.shape)}, found {tuple(static[key].shape)}')
        else:
            out[key] = static[key].to(dtype=value.dtype, device=value.device)
            used.add(key)
    unused = sorted(set(static) - used)
    if missing or mismatched or unused:
        problems = [f'{len(keys)} {what} ({", ".join(keys[:5])}{", ..." if len(keys) > 5 else ""})'
                    for what, keys in (('missing', missing), ('unused', unused), ('of another shape', mismatched))
                    if keys]
        raise ValueError(f'the static checkpoint does not fit {type(model).__name__}: ' + '; '.join(problems) +
                         '. It was made for another host (see dynzoo.models._upcycle.static_source).')
    return out


def upcycle_model(
        model: nn.Module,
        static_state_dict: Mapping[str, torch.Tensor],
        *,
        seed: int = 0,
        perturbation: float = DEFAULT_PERTURBATION,
        keep: Sequence[str] = (),
) -> nn.Module:
    """Load :func:`upcycle_state_dict` into ``model`` (in place, ``strict=True``); returns ``model``."""
    model.load_state_dict(
        upcycle_state_dict(model, static_state_dict, seed=seed, perturbation=perturbation, keep=keep))
    return model
