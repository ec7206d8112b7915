"""What every dynzoo model builder shares: pretrained cfgs, the strict checkpoint path, family metadata.

``build_dynzoo_model`` wraps timm's ``build_model_with_cfg``: it resolves the pretrained config (refusing unknown
tags instead of falling back), fetches the checkpoint through :mod:`dynzoo.models._hub` (sha256-checked hub download,
local ``.safetensors``/``.pth`` with ``weights_only=True``) and hands it to timm as a state dict, behind the
family's ``checkpoint_filter_fn`` and :func:`dynzoo.models._hub.check_state_dict`, which refuses to half-load
anything. A checkpoint that carries its own pretrained cfg (:func:`dynzoo.models._hub.checkpoint_cfg`: the
``config.json`` of a published folder, the ``args`` of a training run) brings its class count and preprocessing
with it. timm's two adaptations stay, explicit and logged: a classifier of another class count is dropped when
``num_classes=`` asks for another count (else refused, naming the ``num_classes`` that fits), and a first conv is
converted to another ``in_chans``. ``use_ema=True`` loads the EMA weights of a training container. A model
hosted on a static timm network has upcycled tags (:func:`upcycled_cfg`): its static source's hub file,
sha256-pinned (:func:`dynzoo.models._hub.download_pinned`), upcycled on load
(:func:`dynzoo.models._upcycle.upcycle_state_dict`). Models without any weights carry timm's ``.untrained`` tag
only: ``pretrained=True`` there raises :class:`~dynzoo.models._hub.PretrainedUnavailableError` naming what
exists.
"""
import logging
from functools import lru_cache
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import (
    adapt_input_conv, build_model_with_cfg, generate_default_cfgs, get_arch_pretrained_cfgs, get_pretrained_cfg,
    is_model,
    list_pretrained,
)

from dynzoo.layers.temperature import TemperatureMixin, attach_temperature_schedule
from . import _hub as hub

__all__ = ['dynzoo_cfg', 'generate_dynzoo_cfgs', 'build_dynzoo_model', 'register_family', 'FAMILIES',
           'MODEL_INFO', 'register_model_info', 'known_tags', 'upcycled_cfg', 'upcycle_sources',
           'upcycled_source']

_logger = logging.getLogger(__name__)

# the step count of a model's own temperature schedule (dynzoo.layers.temperature.TemperatureAnnealing)
ANNEALING_STEPS_KEY = 'temperature_annealing.num_steps'

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


# the fields of a static timm cfg an upcycled tag takes: the preprocessing, classes and labels, licence and file
_SOURCE_FIELDS = hub.CARRIED_FIELDS + ('license', 'origin_url', 'hf_hub_id', 'hf_hub_filename')


def upcycled_cfg(model: str, cfg: Dict[str, Any], source_tag: str) -> Dict[str, Any]:
    """The pretrained cfg of ``model`` upcycled from timm's static ``source_tag`` (``'resnet50.a1_in1k'``): the
    source's preprocessing, class count, licence and ``hf_hub_id`` (whose ``model.safetensors`` is downloaded and
    upcycled on load, :func:`dynzoo.models._upcycle.upcycle_state_dict`), over ``model``'s own cfg."""
    source = get_pretrained_cfg(source_tag).to_dict()
    out = dict(cfg, **{k: source[k] for k in _SOURCE_FIELDS if source.get(k) is not None})
    out['license'] = source.get('license') or 'unknown'
    out['description'] = f'upcycled on load from the static timm checkpoint {source_tag} ({source["hf_hub_id"]})'
    out['notes'] = (f'start: {source_tag}, whose outputs the upcycled model reproduces at step 0; the source\'s '
                    'top-1 is not available offline (the timm package ships no results tables)',)
    return out


@lru_cache(maxsize=None)
def upcycle_sources(model: str) -> Tuple[str, ...]:
    """timm's pretrained tags of the static host ``model`` is upcycled from (its default tag first), those with a
    classifier; none where the model has no static source."""
    from ._upcycle import static_source
    source = static_source(model)
    if source is None or not is_model(source):
        return ()
    default = get_pretrained_cfg(source).tag
    tags = [t for t in list_pretrained(f'{source}.*') if get_pretrained_cfg(t).num_classes]
    return tuple(sorted(tags, key=lambda t: t.partition('.')[2] != default))


def upcycled_source(model: str, tag: Optional[str]) -> Optional[str]:
    """The static timm tag that ``model.tag`` is upcycled from, or ``None`` where the tag is not an upcycled one
    (an index entry of the same name wins over upcycling)."""
    if not tag or hub.is_published(model, tag):
        return None
    return next((t for t in upcycle_sources(model) if t.partition('.')[2] == tag), None)


def _indexed_cfg(cfg: Dict[str, Any], entry: Dict[str, Any]) -> Dict[str, Any]:
    """``cfg`` pointing to a published index entry: its hub repository or (user's index) local file, its
    licence and the cfg fields it records."""
    carried = {k: tuple(v) if isinstance(v, list) else v for k, v in (entry.get('pretrained_cfg') or {}).items()
               if k in hub.CARRIED_FIELDS}
    where = entry.get('file') or entry.get('hf_hub_id')
    return dict(cfg, **carried, hf_hub_id=entry.get('hf_hub_id'), file=entry.get('file'),
                license=entry.get('license'), description=f'{(entry.get("source") or {}).get("type")} weights '
                f'of the weights index ({where}, sha256 {entry.get("sha256")})')


def generate_dynzoo_cfgs(cfgs: Dict[str, Dict[str, Any]]):
    """timm's ``generate_default_cfgs`` over the family's declared tags, with weights exactly where they exist.

    A tag the weights index publishes (the packaged one, or the user's) gets its ``hf_hub_id`` or local ``file``
    and becomes the default; a model hosted on a static timm network gets one upcycled tag per timm pretrained tag
    of its source (:func:`upcycled_cfg`; the source's default tag is the model's default where no index entry
    is). The declared tags stay, without weights where none exist (timm's ``.untrained``: the architecture's own
    preprocessing), so ``timm.list_models(pretrained=True)`` stays truthful.
    """
    declared: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for name_tag, cfg in cfgs.items():
        model, _, tag = name_tag.partition('.')
        declared.setdefault(model, {})[tag] = dict(cfg)
    out = {}
    for model, tags in declared.items():
        base = next(iter(tags.values()))
        for e in hub.entries_for(model):
            if hub.is_published(model, e.get('tag')):
                out[hub.entry_name(e)] = _indexed_cfg(tags.get(e['tag'], base), e)
        for tag, cfg in tags.items():
            out.setdefault(f'{model}.{tag}' if tag else model, cfg)
        for source_tag in upcycle_sources(model):
            out.setdefault(f'{model}.{source_tag.partition(".")[2]}', upcycled_cfg(model, base, source_tag))
    return generate_default_cfgs(out)


def _names(cfg: Dict[str, Any], field: str) -> Tuple[str, ...]:
    value = cfg.get(field)
    return (value,) if isinstance(value, str) else tuple(value or ())


def _drop_classifier(state_dict: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor],
                     pretrained_cfg: Dict[str, Any], model: nn.Module, variant: str,
                     head_asked: Optional[str]) -> List[str]:
    """timm's ``num_classes`` adaptation, made explicit: a checkpoint classifier with another class count than the
    model's is dropped on purpose (the head keeps its fresh init, said in the log) where ``head_asked`` (the
    caller's ``num_classes=N`` / ``features_only=True``) asked for another head, and refused otherwise, naming the
    ``num_classes`` that loads it; a classifier of another width is refused.

    The checkpoint's own class count is written into the model's pretrained cfg, which is what timm's
    ``load_pretrained`` compares ``num_classes`` with: a 10-class fine-tune loaded with ``num_classes=10`` keeps its
    head. Returns the dropped keys the model has.
    """
    dropped = []
    for name in _names(pretrained_cfg, 'classifier'):
        weight_key = name + '.weight'
        weight = state_dict.get(weight_key)
        if weight is None or weight.dim() < 1:
            continue  # absent: the key check names it
        found = int(weight.shape[0])
        if isinstance(getattr(model, 'pretrained_cfg', None), dict):
            model.pretrained_cfg['num_classes'] = found
        own = expected.get(weight_key)
        if own is not None and int(own.shape[0]) == found:
            continue  # kept: checked like every other tensor
        if own is not None and weight.shape[1:] != own.shape[1:]:
            raise hub.CheckpointError(
                f'checkpoint classifier does not fit {variant}: {weight_key}: expected (num_classes, '
                f'{", ".join(map(str, own.shape[1:]))}), found {tuple(weight.shape)}. It was made for another '
                'architecture or configuration.')
        own_classes = f'{int(own.shape[0])}' if own is not None else 'none (num_classes=0)'
        if head_asked is None:
            raise hub.CheckpointError(
                f'{variant}: the checkpoint\'s classifier {name!r} has {found} classes, the model {own_classes}: '
                f'pass num_classes={found} to load the checkpoint as trained, or ask for another num_classes '
                'explicitly to fine-tune a fresh head')
        _logger.info(
            '%s: the checkpoint\'s classifier %s has %d classes, the model %s: dropped on purpose (%s was asked), '
            'the head keeps its fresh init', variant, name, found, own_classes, head_asked)
        for key in (weight_key, name + '.bias'):
            state_dict.pop(key, None)
            if key in expected:
                dropped.append(key)
    return dropped


def _adapted_stem(state_dict: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor],
                  pretrained_cfg: Dict[str, Any], in_chans: int, variant: str) -> List[str]:
    """The first-conv weights that timm's ``adapt_input_conv`` converts to ``in_chans`` (said in the log).

    Only a 4-D kernel that differs from the model's in its input channels alone, in the ratio of ``in_chans`` to
    the channels the checkpoint was trained on (``input_size[0]``), is adapted; any other stem shape is refused
    by the shape check.
    """
    trained_chans = (pretrained_cfg.get('input_size') or (3,))[0]
    adapted = []
    for name in _names(pretrained_cfg, 'first_conv'):
        key = name + '.weight'
        weight, own = state_dict.get(key), expected.get(key)
        if weight is None or own is None or weight.shape == own.shape or in_chans == trained_chans:
            continue
        if weight.dim() == 4 and own.dim() == 4 and weight.shape[0] == own.shape[0] and \
                weight.shape[2:] == own.shape[2:] and weight.shape[1] * in_chans == own.shape[1] * trained_chans:
            _logger.info('%s: adapting the checkpoint\'s first conv %s from %d to %d input channels (timm\'s '
                         'adapt_input_conv)', variant, key, trained_chans, in_chans)
            adapted.append(key)
    return adapted


def _strict_filter(
        family_filter: Optional[Callable],
        pretrained_cfg: Dict[str, Any],
        variant: str,
        in_chans: int,
        head_asked: Optional[str],
        upcycle: bool = False,
) -> Callable:
    """Run the family filter, make timm's two adaptations explicit, then refuse anything that does not fit the
    model (:func:`dynzoo.models._hub.check_state_dict`), before ``load_state_dict`` runs. ``upcycle``: the
    checkpoint is the static timm network's, upcycled into the model (a classifier of another class count
    dropped first, so the fresh head stays)."""

    def _filter(state_dict, model: nn.Module):
        if family_filter is not None and not upcycle:
            state_dict = family_filter(state_dict, model)
        else:
            state_dict = hub.strip_prefix(hub.unwrap_checkpoint(state_dict), 'module.')
        if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
            raise hub.CheckpointError(f'checkpoint for {variant} did not resolve to a dict of tensors')
        state_dict = dict(state_dict)
        # the step count of a model's own temperature schedule: a pretrained start anneals from step 0
        state_dict.pop(ANNEALING_STEPS_KEY, None)
        expected = model.state_dict()
        dropped = _drop_classifier(state_dict, expected, pretrained_cfg, model, variant, head_asked)
        adapted = _adapted_stem(state_dict, expected, pretrained_cfg, in_chans, variant)
        if upcycle:  # a dropped classifier keeps the model's fresh init
            from ._upcycle import upcycle_state_dict
            # the static stem is copied as is: upcycle with it at the model's in_chans, then hand timm the
            # checkpoint's own stem back, which timm's load_pretrained adapts (adapt_input_conv) after this filter
            stems = {k: state_dict[k] for k in adapted}
            trained_chans = (pretrained_cfg.get('input_size') or (3,))[0]
            source = dict(state_dict, **{k: expected[k] for k in dropped})
            source.update({k: adapt_input_conv(in_chans, w, trained_chans) for k, w in stems.items()})
            try:
                state_dict = upcycle_state_dict(model, source)
            except ValueError as e:
                raise hub.CheckpointError(f'{variant}: {e}') from e
            state_dict.update(stems)
        hub.check_state_dict(state_dict, expected, variant, may_be_missing=dropped, adapted=adapted)
        return state_dict

    return _filter


def known_tags(variant: str):
    """The pretrained tags registered for ``variant``: ``'in1k'`` for ``variant.in1k``, ``'untrained'`` (timm's
    convention) for an architecture released without weights."""
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
    (e.g. ``dict(file='weights.safetensors')``) like any timm model; the fields the checkpoint carries
    (:func:`dynzoo.models._hub.checkpoint_cfg`) come between the two, so the overlay's own keys win. ``use_ema``
    takes the EMA weights of a training container (``state_dict_ema`` / ``model_ema``).
    """
    schedule = _temperature_schedule(variant, kwargs.pop('temperature_schedule', None),
                                     kwargs.pop('temperature_steps_per_epoch', None))
    pretrained_cfg = kwargs.pop('pretrained_cfg', None)
    overlay = kwargs.pop('pretrained_cfg_overlay', None)
    use_ema = kwargs.pop('use_ema', False)
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
        # an upcycled tag (no file or state dict given in its place): the static source's hub file, pinned
        source_tag = None if resolved.get('file') or resolved.get('state_dict') is not None or \
            resolved.get('source') == 'hf-hub' else upcycled_source(variant, resolved.get('tag'))
        if source_tag is not None:
            repo, _, revision = resolved['hf_hub_id'].partition('@')
            checkpoint = hub.load_checkpoint_file(hub.download_pinned(
                repo, resolved.get('hf_hub_filename') or hub.WEIGHTS_NAME, revision or None,
                f'{variant}.{resolved["tag"]}'))
        else:
            checkpoint = hub.load_checkpoint(resolved)
        carried = {k: v for k, v in hub.checkpoint_cfg(
            checkpoint, resolved.get('file'), variant, resolved.get('input_size') or (3, 224, 224)).items()
            if k not in (overlay or {}) and v != resolved.get(k)}
        if carried:
            _logger.info('%s: the checkpoint brings its own pretrained cfg: %s', variant,
                         ', '.join(f'{k}={v!r}' for k, v in carried.items()))
            resolved.update(carried)
        # a bare (EMA) state dict passes through every family filter unchanged
        resolved['state_dict'] = hub.unwrap_checkpoint(checkpoint, use_ema=True) if use_ema else checkpoint
        # timm must load exactly the checkpoint verified above, not fetch its own copy ('hf-hub' source)
        resolved['file'] = None
        resolved['source'] = None
        pretrained_cfg, overlay = resolved, None
        in_chans = kwargs.get('in_chans', (resolved.get('input_size') or (3,))[0])  # as timm's builder resolves it
        # another head on purpose: the caller's own num_classes (timm passes only those given), or no head at all
        head_asked = (f'num_classes={kwargs["num_classes"]}' if kwargs.get('num_classes') is not None
                      else 'features_only=True' if kwargs.get('features_only') else None)
        filter_fn = _strict_filter(pretrained_filter_fn, resolved, variant, in_chans, head_asked,
                                   upcycle=source_tag is not None)
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
    if kwargs.get('features_only'):
        if schedule is not None:
            raise ValueError(f'{variant}: temperature_schedule= anneals a whole model, not a features_only backbone')
    elif schedule is not None or any(isinstance(m, TemperatureMixin) for m in model.modules()):
        # a fresh schedule (a pretrained start is fine-tuned from step 0; timm's --resume loads num_steps back), or
        # an idle one, so that a checkpoint saved with a schedule loads into a model built without
        attach_temperature_schedule(model, *(schedule or (None,)))
    return model


def _temperature_schedule(variant: str, schedule: Optional[str], steps_per_epoch: Optional[int]):
    """``(schedule name, steps per epoch)`` of ``temperature_schedule=`` (``'paper'``: the family's paper's)."""
    if schedule is None:
        if steps_per_epoch is not None:
            raise ValueError(f'{variant}: temperature_steps_per_epoch={steps_per_epoch} given without a '
                             'temperature_schedule')
        return None
    if schedule == 'paper':
        family = MODEL_INFO.get(variant, {}).get('family')
        schedule = FAMILIES.get(family, {}).get('temperature_schedule')
        if schedule is None:
            raise ValueError(f'{variant}: the {family} paper anneals no temperature, so temperature_schedule='
                             "'paper' does not apply")
    if steps_per_epoch is None:
        raise ValueError(f'{variant}: temperature_schedule={schedule!r} needs temperature_steps_per_epoch= (the '
                         'optimizer steps of one epoch), since the schedules are defined per epoch')
    return schedule, int(steps_per_epoch)
