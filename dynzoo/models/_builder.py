"""What every dynzoo model builder shares: pretrained cfgs, the strict checkpoint path, family metadata.

``build_dynzoo_model`` wraps timm's ``build_model_with_cfg``: it resolves the pretrained config (refusing unknown
tags instead of falling back), fetches the checkpoint through :mod:`dynzoo.models._hub` (sha256-checked hub download,
local ``.safetensors``/``.pth`` with ``weights_only=True``) and hands it to timm as a state dict, behind the
family's ``checkpoint_filter_fn`` and a key/shape check that refuses to half-load anything.
"""
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, get_arch_pretrained_cfgs

from dynzoo.models import _hub as hub

__all__ = ['dynzoo_cfg', 'generate_dynzoo_cfgs', 'build_dynzoo_model', 'register_family', 'FAMILIES',
           'MODEL_INFO', 'register_model_info', 'HUB_ORG', 'known_tags']

HUB_ORG = 'dynzoo'

# family name -> {'paper': ..., 'paper_ids': ..., 'module': ...}
FAMILIES: Dict[str, Dict[str, Any]] = {}
# model name -> {'family': ..., 'paper_params': int | None, 'paper_macs': float | None, 'notes': str}
MODEL_INFO: Dict[str, Dict[str, Any]] = {}


def register_family(name: str, paper: str, paper_ids: str, **extra) -> None:
    FAMILIES[name] = dict(paper=paper, paper_ids=paper_ids, **extra)


def register_model_info(model: str, family: str, **info) -> None:
    """Record what the paper / authors' code say of a model (params, MACs) for ``dynzoo list`` and the tests."""
    MODEL_INFO[model] = dict(family=family, **info)


def dynzoo_cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    """A timm pretrained cfg with ImageNet defaults; ``hf_hub_id`` is filled by :func:`generate_dynzoo_cfgs`."""
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        **kwargs,
    }


def generate_dynzoo_cfgs(cfgs: Dict[str, Dict[str, Any]]):
    """timm's ``generate_default_cfgs``, with ``hf_hub_id = dynzoo/<model>.<tag>`` set where the weights index
    lists a published checkpoint -- and only there, so ``timm.list_models(pretrained=True)`` stays truthful."""
    out = {}
    for name_tag, cfg in cfgs.items():
        model, _, tag = name_tag.partition('.')
        cfg = dict(cfg)
        if hub.is_published(model, tag):
            cfg['hf_hub_id'] = f'{HUB_ORG}/{model}.{tag}' if tag else f'{HUB_ORG}/{model}'
        out[name_tag] = cfg
    return generate_default_cfgs(out)


def _classifier_names(cfg: Dict[str, Any]):
    c = cfg.get('classifier')
    return (c,) if isinstance(c, str) else tuple(c or ())


def _strict_filter(
        family_filter: Optional[Callable],
        pretrained_cfg: Dict[str, Any],
        variant: str,
) -> Callable:
    """Run the family filter, then refuse missing / unexpected keys and shape mismatches, naming them."""

    def _filter(state_dict, model: nn.Module):
        if family_filter is not None:
            state_dict = family_filter(state_dict, model)
        else:
            state_dict = hub.unwrap_checkpoint(state_dict)
        if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
            raise hub.CheckpointError(f'checkpoint for {variant} did not resolve to a dict of tensors')
        # the checkpoint's own class count decides whether timm keeps its classifier: a 10-class fine-tune
        # loaded with num_classes=10 keeps its head; loaded with another num_classes the head is re-initialised
        live_cfg = getattr(model, 'pretrained_cfg', None)
        for name in _classifier_names(pretrained_cfg):
            w = state_dict.get(name + '.weight')
            if isinstance(live_cfg, dict) and isinstance(w, torch.Tensor) and w.dim() >= 1:
                live_cfg['num_classes'] = int(w.shape[0])
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise hub.CheckpointError(
                f'checkpoint does not match {variant}: {len(missing)} missing key(s) {missing[:8]}, '
                f'{len(unexpected)} unexpected key(s) {unexpected[:8]}. Is it another architecture\'s checkpoint, '
                'or a reparameterized one (load those into a model after dynzoo.reparameterize)?')
        # classifier / stem shapes may legitimately differ (num_classes, in_chans): timm adapts those
        adaptable = {n + s for n in _classifier_names(pretrained_cfg) for s in ('.weight', '.bias')}
        first = pretrained_cfg.get('first_conv')
        for n in ((first,) if isinstance(first, str) else tuple(first or ())):
            adaptable.add(n + '.weight')
        mismatched = [
            f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}'
            for k, v in state_dict.items() if k not in adaptable and v.shape != expected[k].shape
        ]
        if mismatched:
            raise hub.CheckpointError(
                f'checkpoint shapes do not match {variant} ({len(mismatched)} tensors): {mismatched[:5]}. '
                'It was made for another architecture or configuration.')
        return state_dict

    return _filter


def known_tags(variant: str):
    """The pretrained tags registered for ``variant`` (``'in1k'`` for ``variant.in1k``)."""
    return [name.partition('.')[2] for name in get_arch_pretrained_cfgs(variant)]


def build_dynzoo_model(
        model_cls: Callable[..., nn.Module],
        variant: str,
        pretrained: bool = False,
        *,
        pretrained_filter_fn: Optional[Callable] = None,
        feature_cfg: Optional[Dict[str, Any]] = None,
        **kwargs,
) -> nn.Module:
    """Build ``variant`` with timm's builder; with ``pretrained=True`` load its checkpoint strictly.

    Accepts timm's ``pretrained_cfg`` (a tag string, dict or PretrainedCfg) and ``pretrained_cfg_overlay``
    (e.g. ``dict(file='weights.safetensors')``) like any timm model.
    """
    pretrained_cfg = kwargs.pop('pretrained_cfg', None)
    overlay = kwargs.pop('pretrained_cfg_overlay', None)
    known = known_tags(variant)
    if isinstance(pretrained_cfg, str) and pretrained_cfg and pretrained_cfg not in known:
        raise ValueError(
            f'Unknown pretrained tag {variant}.{pretrained_cfg}; known tags: '
            f'{", ".join(f"{variant}.{t}" for t in known) or "none"}')
    filter_fn = pretrained_filter_fn
    if pretrained:
        from timm.models import resolve_pretrained_cfg
        resolved = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay)
        resolved = resolved.to_dict()
        resolved['state_dict'] = hub.load_checkpoint(resolved)
        # timm must load exactly the checkpoint verified above, not fetch its own copy ('hf-hub' source)
        resolved['file'] = None
        resolved['source'] = None
        pretrained_cfg, overlay = resolved, None
        filter_fn = _strict_filter(pretrained_filter_fn, resolved, variant)
    model = build_model_with_cfg(
        model_cls, variant, pretrained,
        pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay,
        pretrained_filter_fn=filter_fn,
        pretrained_strict=True,
        feature_cfg=feature_cfg,
        **kwargs,
    )
    # the checkpoint was passed to timm inside the cfg; do not keep it alive on the model
    for m in model.modules():
        cfg = getattr(m, 'pretrained_cfg', None)
        if isinstance(cfg, dict) and cfg.get('state_dict') is not None:
            cfg['state_dict'] = None
    return model
