"""The timm-citizen contract, checked on every registered dynzoo model.

timm's own ``tests/test_models.py`` runs against dynzoo's names separately (``scripts/run_timm_model_tests.py``);
its ``forward_intermediates`` tests only select timm's own modules, so those checks (and the rest of the model
API a timm user relies on) are repeated here for every dynzoo model.
"""
import copy
import math

import pytest
import torch

import timm
from timm.models import FeatureInfo
from timm.models._manipulate import group_parameters

import dynzoo
from dynzoo.models._builder import upcycled_source
from dynzoo.models._hub import CheckpointError, PretrainedUnavailableError, is_published
from dynzoo.models import FAMILIES, MODEL_INFO
from conftest import zoo_params

MODELS = dynzoo.list_dynzoo_models()
# every model (the larger siblings of one structure are `slow`: conftest.zoo_params), built at small inputs
FEATURE_SIZE = 96


@pytest.fixture(scope='module', params=zoo_params(MODELS))
def built(request):
    """``(name, model)``, built once per model: pytest groups every test of a model around one build."""
    torch.manual_seed(0)
    return request.param, timm.create_model(request.param).eval()


def _input_size(model, target=FEATURE_SIZE):
    cfg = model.pretrained_cfg
    size = cfg.get('min_input_size') or cfg['input_size']
    if cfg.get('fixed_input_size'):
        return tuple(cfg['input_size'])
    return (size[0],) + tuple(max(s, target) if cfg.get('min_input_size') else min(s, target) for s in size[1:])


def test_registry_is_populated_and_described():
    assert len(MODELS) >= 7
    for name in MODELS:
        assert name in timm.list_models(), name
        info = MODEL_INFO[name]
        assert info['family'] in FAMILIES, (name, info)


def test_pretrained_cfg_is_complete(built):
    name, model = built
    cfg = model.pretrained_cfg
    for key in ('architecture', 'tag', 'input_size', 'mean', 'std', 'crop_pct', 'interpolation', 'num_classes',
                'first_conv', 'classifier', 'license', 'paper_ids', 'pool_size'):
        assert cfg.get(key) not in (None, ''), f'{name}: pretrained_cfg[{key!r}] missing'
    assert cfg['architecture'] == name
    modules = dict(model.named_modules())
    first = cfg['first_conv'] if isinstance(cfg['first_conv'], (list, tuple)) else [cfg['first_conv']]
    for n in first:
        assert n in modules, f'{name}: first_conv {n} is not a module'
    assert cfg['classifier'] in modules, f'{name}: classifier {cfg["classifier"]} is not a module'
    # hf_hub_id is set exactly where the index says a checkpoint is published, or where the tag is upcycled from
    # a static timm checkpoint (then it is the source's)
    source = upcycled_source(name, cfg['tag'])
    if source is not None:
        assert cfg['hf_hub_id'] == timm.models.get_pretrained_cfg(source).hf_hub_id
    else:
        assert bool(cfg.get('hf_hub_id')) == is_published(name, cfg['tag'])


def test_pretrained_without_checkpoint_fails_clearly(built):
    name, model = built
    tag = model.pretrained_cfg['tag']
    if is_published(name, tag):
        pytest.fail(f'{name}.{tag} is published: this suite has no network access to check it')
    if upcycled_source(name, tag) is not None:  # offline, with an empty hub cache: the source's file is named
        with pytest.raises(CheckpointError, match=f'could not fetch {model.pretrained_cfg["hf_hub_id"]}'):
            timm.create_model(name, pretrained=True)
    else:
        with pytest.raises(PretrainedUnavailableError, match='pretrained_cfg_overlay'):
            timm.create_model(name, pretrained=True)


def test_forward_intermediates_and_features(built):
    name, model = built
    feature_info = FeatureInfo(model.feature_info, len(model.feature_info))
    channels, reductions = feature_info.channels(), feature_info.reduction()
    assert len(channels) >= 3
    input_size = _input_size(model)
    x = torch.randn((1,) + input_size)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert len(inter) == len(channels)
        for c, r, o in zip(channels, reductions, inter):
            assert o.shape[1] == c
            assert o.shape[2] <= math.ceil(input_size[1] / r) + 1 and o.shape[3] <= math.ceil(input_size[2] / r) + 1
            assert torch.isfinite(o).all()
        torch.testing.assert_close(final, model.forward_features(x), rtol=1e-5, atol=1e-6)
        only = model.forward_intermediates(x, indices=[len(channels) - 1], intermediates_only=True)
        assert len(only) == 1 and only[0].shape == inter[-1].shape
        logits = model.forward_head(final)
        torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-5)
    feats = timm.create_model(name, features_only=True, out_indices=(1, 2, 3)[:len(channels) - 1]).eval()
    feats.load_state_dict({k: v for k, v in model.state_dict().items() if k in feats.state_dict()}, strict=False)
    with torch.no_grad():
        outs = feats(x)
    assert [o.shape[1] for o in outs] == feats.feature_info.channels()


def test_classifier_reset_and_pre_logits(built):
    name, model = built[0], copy.deepcopy(built[1])
    x = torch.randn((2,) + _input_size(model, 64))
    assert model.num_classes == 1000
    model.reset_classifier(7)
    assert model.num_classes == 7
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pre.shape == (2, model.head_hidden_size if getattr(model, 'head_hidden_size', None) else model.num_features)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape[-1] == pre.shape[-1]
    assert model.get_classifier() is not None


def test_grad_checkpointing_gives_same_grads(built):
    torch.manual_seed(0)
    name, model = built[0], copy.deepcopy(built[1]).train()
    for m in model.modules():  # keep BN statistics out of the comparison
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    x = torch.randn((2,) + _input_size(model, 64))
    out = model(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    out2 = model(x)
    out2.square().mean().backward()
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-5)
    assert len(grads) > 0.9 * sum(1 for _ in model.parameters())
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5, msg=f'{name}: grad of {n}')


def test_optimizer_groups_cover_every_parameter(built):
    name, model = built
    names = {n for n, _ in model.named_parameters()}
    nwd = model.no_weight_decay()
    assert isinstance(nwd, (set, list, tuple))
    groups = group_parameters(model, model.group_matcher(coarse=False))
    grouped = {n for g in groups.values() for n in g}
    assert grouped == names
    coarse = group_parameters(model, model.group_matcher(coarse=True))
    assert {n for g in coarse.values() for n in g} == names


def test_meta_device_and_kwargs(built):
    name, built_model = built
    with torch.device('meta'):
        model = timm.create_model(name)
    assert all(p.device.type == 'meta' for p in model.parameters())
    n_meta = sum(p.numel() for p in model.parameters())
    assert n_meta == sum(p.numel() for p in built_model.parameters())
    with pytest.raises(TypeError):
        timm.create_model(name, not_an_argument_of_any_model=1)


def test_eval_is_batch_independent(built):
    """A sample's eval output does not depend on the other samples of its batch."""
    name, model = built
    torch.manual_seed(1)
    x = torch.randn((3,) + _input_size(model, 64))
    with torch.no_grad():
        full = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(3)])
    scale = max(1.0, full.abs().max().item())
    assert (full - single).abs().max().item() <= 1e-4 * scale
