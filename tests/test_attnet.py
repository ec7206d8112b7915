"""AttNet / ATConv (arXiv:2510.20092): operator math, execution strategies, the seven variants, the authors'
checkpoint parity fixture, FLOPs under the paper's counting convention, and reparameterization."""
import math
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch.utils.flop_counter import FlopCounterMode

import timm
import dynzoo
from dynzoo.models import _hub as hub
from dynzoo.layers.atconv import ATConv2d, atconv_num_params
from dynzoo.layers.per_sample import DEPTHWISE_STRATEGIES, per_sample_depthwise_conv2d
from dynzoo.models.attnet import ATTNET_CONFIGS, AUTHORS_DROP_PATH, AttNet, checkpoint_filter_fn
from conftest import official_fixture

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ('attnet_xxs', 'attnet_xs', 'attnet_s', 'attnet_t1', 'attnet_t2', 'attnet_t3', 'attnet_t4')

# exact parameter counts of the authors' models/AttNet.py (T1-T4: paper Tab. III to 0.1M)
EXPECTED_PARAMS = {
    'attnet_xxs': 2_853_556, 'attnet_xs': 5_554_902, 'attnet_s': 7_681_316,
    'attnet_t1': 13_714_900, 'attnet_t2': 27_010_782, 'attnet_t3': 49_175_682, 'attnet_t4': 87_320_214,
}
# fvcore FlopCountAnalysis of the authors' code at 224, model in train mode (the official script's call), in G
FVCORE_GFLOPS = {
    'attnet_xxs': 0.5369, 'attnet_xs': 1.0131, 'attnet_s': 1.3378,
    'attnet_t1': 2.4355, 'attnet_t2': 5.1122, 'attnet_t3': 9.4176, 'attnet_t4': 16.7768,
}
# paper Tab. III (one decimal, truncated)
PAPER_GFLOPS = {'attnet_t1': 2.4, 'attnet_t2': 5.1, 'attnet_t3': 9.4, 'attnet_t4': 16.7}
PAPER_MPARAMS = {'attnet_t1': 13.7, 'attnet_t2': 27.0, 'attnet_t3': 49.1, 'attnet_t4': 87.3}


def fvcore_style_gflops(model: nn.Module, size: int = 224) -> float:
    """Minimal FLOP counter with the paper's convention (fvcore ``FlopCountAnalysis(...).total()``): one per MAC of
    every conv / matmul (torch's ``FlopCounterMode`` counts 2 per MAC), plus fvcore's norm handles -- BatchNorm
    5 per element in train mode (2 in eval), LayerNorm 5 per element; GELU, adds, muls, pooling and the manual
    RmsNorm2d are free, as in fvcore. Kept minimal on purpose; the project-wide counter belongs in dynzoo.utils.flops."""
    norm_flops = []

    def hook(m, inputs, output):
        per_elem = 5 if isinstance(m, nn.LayerNorm) or m.training else 2
        norm_flops.append(per_elem * inputs[0].numel())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm))]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.randn(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    return (counter.get_total_flops() / 2 + sum(norm_flops)) / 1e9


def _randomize(module: nn.Module, seed: int = 0) -> None:
    """Move every float parameter / BN statistic off its init value so every branch matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith('running_var'):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.add_(0.2 * torch.randn(t.shape, generator=g))


# --------------------------------------------------------------------------------------------------------------
# ATConv operator
# --------------------------------------------------------------------------------------------------------------

def _reference_atconv(m: ATConv2d, x: torch.Tensor) -> torch.Tensor:
    """Alg. 1 written out step by step, with one conv2d per (sample, channel) for Eq. (11)."""
    b, c, h, w = x.shape
    k = m.kernel_size
    f = F.conv2d(x, m.kernel_proj.weight, m.kernel_proj.bias)
    if m.pool_mode == '1d':
        z = F.adaptive_avg_pool1d(f.reshape(b, c, h * w), k * k)
    else:
        z = F.adaptive_avg_pool2d(f, (k, k)).reshape(b, c, k * k)
    kk = (F.gelu(z) @ m.kernel_gen.weight.t() + m.kernel_gen.bias).reshape(b, c, k, k)
    lam = torch.sigmoid(m.difference_control).reshape(1, c, 1, 1)
    alpha = kk - lam * kk.mean(dim=(2, 3), keepdim=True)
    v = F.conv2d(x, m.x_proj.weight, m.x_proj.bias)
    y = torch.empty_like(v)
    for i in range(b):
        for j in range(c):
            y[i, j] = F.conv2d(v[i, j][None, None], alpha[i, j][None, None], padding=k // 2)[0, 0]
    return F.conv2d(y, m.proj.weight, m.proj.bias)


@pytest.mark.parametrize('kernel_size', [3, 5, 7])
def test_atconv_param_count(kernel_size):
    m = ATConv2d(24, kernel_size)
    assert sum(p.numel() for p in m.parameters()) == 3 * 24 ** 2 + 4 * 24 + kernel_size ** 4 + kernel_size ** 2
    assert atconv_num_params(24, kernel_size) == sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize('pool_mode', ['1d', '2d'])
@pytest.mark.parametrize('strategy', [s for s in DEPTHWISE_STRATEGIES])
def test_atconv_matches_reference(pool_mode, strategy):
    m = ATConv2d(6, 3, pool_mode=pool_mode, strategy=strategy).double()
    _randomize(m)
    x = torch.randn(3, 6, 9, 7, dtype=torch.float64)  # non-square
    torch.testing.assert_close(m(x), _reference_atconv(m, x), rtol=0, atol=1e-10)


def test_atconv_pool_modes_differ_and_count_the_same():
    a, b = ATConv2d(8, pool_mode='1d'), ATConv2d(8, pool_mode='2d')
    b.load_state_dict(a.state_dict())
    _randomize(a)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 8, 12, 12)
    assert (a(x) - b(x)).abs().max() > 1e-3  # bands vs grid: not the same context
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())


def test_atconv_1d_pool_bins_are_the_authors_bands():
    """The authors' adaptive 1-D pool: the 9 bins of the 1-D pool on a 56x56 map cover these (first row, last row) bands."""
    h = w = 56
    m = ATConv2d(h * w)
    onehot = torch.eye(h * w).reshape(1, h * w, h, w)  # channel i is the indicator of flat position i
    member = m._pool(onehot)[0] > 0  # (HW, 9): position i feeds bin j
    bands = []
    for j in range(9):
        rows = member[:, j].nonzero()[:, 0] // w
        bands.append((int(rows.min()), int(rows.max())))
    assert bands == [(0, 6), (6, 12), (12, 18), (18, 24), (24, 31), (31, 37), (37, 43), (43, 49), (49, 55)]


def test_atconv_dkm_lateral_inhibition():
    """Eq. (8): alpha's tap mean is (1 - lambda_c) K-bar; gamma = 0 at init, so lambda = 0.5."""
    m = ATConv2d(5).double()
    assert torch.count_nonzero(m.difference_control) == 0
    x = torch.randn(2, 5, 8, 8, dtype=torch.float64)
    raw = m.kernel_gen(F.gelu(m.forward_context(x)))  # K before modulation
    torch.testing.assert_close(m.forward_kernel(x).mean((2, 3)), 0.5 * raw.mean(2))
    with torch.no_grad():
        m.difference_control.normal_()
    lam = torch.sigmoid(m.difference_control)
    torch.testing.assert_close(m.forward_kernel(x).mean((2, 3)), (1 - lam) * raw.mean(2))


@pytest.mark.parametrize('strategy', ['grouped', 'shift', 'gemm', 'loop'])
def test_per_sample_depthwise_strategies_gradcheck(strategy):
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: per_sample_depthwise_conv2d(a, b, (1, 1), strategy), (x, w))
    ref = per_sample_depthwise_conv2d(x, w, (1, 1), 'loop')
    torch.testing.assert_close(per_sample_depthwise_conv2d(x, w, (1, 1), strategy), ref, rtol=0, atol=1e-12)


def test_atconv_pool_first_form_is_exact_and_scriptable():
    m = ATConv2d(8).double()
    _randomize(m)
    x = torch.randn(2, 8, 10, 13, dtype=torch.float64)
    ref = m(x)
    m.reparameterize()
    assert m.kernel_proj is None and isinstance(m.context_proj, torch.nn.Conv1d)
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.jit.script(m)(x), ref, rtol=0, atol=1e-10)


def test_atconv_bad_input():
    m = ATConv2d(8)
    with pytest.raises(ValueError, match='4-D'):
        m(torch.randn(8, 5, 5))
    with pytest.raises(ValueError, match='8 input channels'):
        m(torch.randn(1, 4, 5, 5))
    for bad in (dict(pool_mode='3d'), dict(kernel_size=4), dict(strategy='dense')):
        with pytest.raises(ValueError):
            ATConv2d(8, **bad)
    with pytest.raises(ValueError, match='weight'):
        per_sample_depthwise_conv2d(torch.randn(2, 3, 5, 5), torch.randn(2, 4, 3, 3), (1, 1))


# --------------------------------------------------------------------------------------------------------------
# AttNet variants
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', VARIANTS)
def test_params_and_flops(name):
    """Exact parameter counts (authors' code) and GFLOPs at 224 under fvcore's train-mode convention."""
    model = timm.create_model(name).train()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == EXPECTED_PARAMS[name]
    assert dynzoo.models.MODEL_INFO[name]['paper_params'] == EXPECTED_PARAMS[name]
    gflops = fvcore_style_gflops(model)
    assert abs(gflops - FVCORE_GFLOPS[name]) < 1e-4  # fvcore run of the authors' code
    if name in PAPER_GFLOPS:
        # the paper's one-decimal figures are truncations: 16.78 -> 16.7, 49.18 M -> 49.1 M
        assert math.floor(gflops * 10) / 10 == pytest.approx(PAPER_GFLOPS[name])
        assert math.floor(n_params / 1e5) / 10 == pytest.approx(PAPER_MPARAMS[name])
        assert abs(gflops - PAPER_GFLOPS[name]) <= 0.1 and abs(n_params / 1e6 - PAPER_MPARAMS[name]) <= 0.1


def test_official_fixture_parity(tmp_path):
    """The authors' AttNet_T1 checkpoint container loads through the user path and reproduces their logits."""
    sd, x, logits, _ = official_fixture('attnet_t1')
    path = tmp_path / 'attnet_t1_official.pth'
    torch.save({'model': sd}, path)
    model = timm.create_model('attnet_t1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        out = model(x)
    tol = 1e-4 * max(1.0, logits.abs().max().item())
    assert (out - logits).abs().max().item() <= tol


def test_official_keys_and_ema_choice(tmp_path):
    """Authors' keys map one-to-one; ``use_ema`` picks ``model_ema`` from their container."""
    model = timm.create_model('attnet_xxs').eval()
    ours = model.state_dict()
    official = {('norm.' + k[len('head.norm.'):] if k.startswith('head.norm.') else
                 'head.' + k[len('head.fc.'):] if k.startswith('head.fc.') else k): v for k, v in ours.items()}
    assert 'norm.weight' in official and 'head.weight' in official
    assert set(checkpoint_filter_fn({'model': official}, model)) == set(ours)
    ema = {k: (v + 0.1 if v.is_floating_point() else v) for k, v in official.items()}
    path = tmp_path / 'ckpt.pth'
    torch.save({'model': official, 'model_ema': ema, 'epoch': torch.tensor(3)}, path)
    raw_model = timm.create_model('attnet_xxs', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    ema_model = timm.create_model('attnet_xxs', pretrained=True, use_ema=True,
                                  pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(raw_model.head.fc.bias, official['head.bias'])
    torch.testing.assert_close(ema_model.head.fc.bias, ema['head.bias'])
    torch.save({'model': official}, path)
    with pytest.raises(hub.CheckpointError, match='EMA'):
        timm.create_model('attnet_xxs', pretrained=True, use_ema=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_features_only_and_intermediates():
    x = torch.randn(2, 3, 64, 96)  # non-square
    model = timm.create_model('attnet_t1').eval()
    dims = ATTNET_CONFIGS['attnet_t1']['dims']
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        feats = timm.create_model('attnet_t1', features_only=True).eval()
        missing, _ = feats.model.load_state_dict(model.state_dict(), strict=False)  # head is pruned in features_only
        assert not missing
        out = feats(x)
    assert [tuple(t.shape) for t in inter] == [(2, d, 64 // s, 96 // s) for d, s in zip(dims, (4, 8, 16, 32))]
    assert feats.feature_info.reduction() == [4, 8, 16, 32] and feats.feature_info.channels() == list(dims)
    for a, b in zip(out, inter):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(final, model.forward_features(x))
    assert model(x).shape == (2, 1000)


@pytest.mark.parametrize('name', ['attnet_xs', 'attnet_t1'])
def test_reparameterize_is_exact(name):
    """timm's walker, from training or eval mode alike: stem / downsampling BNs folded, ATConv pool-first, the
    LayerScales kept; idempotent; ``inference_mode=True`` builds the same structure (strict load, same outputs)."""
    model = timm.create_model(name)
    _randomize(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model.eval()(x)
        for mode in (True, False):
            fused = dynzoo.reparameterize(model.train(mode))
            assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
            assert all(m.kernel_proj is None for m in fused.modules() if isinstance(m, ATConv2d))
            num_ls = sum(isinstance(m, timm.layers.LayerScale2d) for m in fused.modules())
            assert num_ls == 2 * sum(ATTNET_CONFIGS[name]['depths'])
            out = fused.eval()(x)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        torch.testing.assert_close(dynzoo.reparameterize(fused)(x), out, rtol=0, atol=0)  # idempotent
        direct = timm.create_model(name, inference_mode=True).eval()
        direct.load_state_dict(fused.state_dict(), strict=True)
        torch.testing.assert_close(direct(x), out, rtol=0, atol=0)


def test_no_weight_decay_covers_authors_exclusions():
    """Authors: timm create_optimizer with filter_bias_and_bn -> every 1-D param (gamma, difference_control,
    norms, biases) is undecayed; no_weight_decay() names exactly those."""
    for name in ('attnet_xxs', 'attnet_xs'):
        model = timm.create_model(name)
        patterns = model.no_weight_decay()
        for n, p in model.named_parameters():
            assert any(fnmatch(n, pat) for pat in patterns) == (p.ndim <= 1), n


def test_drop_path_and_recipes():
    """Recipes carry the authors' per-variant drop-path (T1 0.1, T2 0.2, T3 0.4, T4 0.5) and their train.py recipe."""
    assert {k: AUTHORS_DROP_PATH[k] for k in ('attnet_t1', 'attnet_t2', 'attnet_t3', 'attnet_t4')} == \
        {'attnet_t1': 0.1, 'attnet_t2': 0.2, 'attnet_t3': 0.4, 'attnet_t4': 0.5}
    for name in VARIANTS:
        cfg = yaml.safe_load((ROOT / 'dynzoo' / 'tools' / 'recipes' / f'{name}.yaml').read_text())
        assert cfg['model'] == name and cfg['drop_path'] == AUTHORS_DROP_PATH[name]
        assert (cfg['epochs'], cfg['lr'], cfg['opt'], cfg['sched'], cfg['warmup_epochs']) == \
            (300, 4e-3, 'adamw', 'cosine', 5)
        assert cfg['smoothing'] == 0.1 and cfg['model_ema_decay'] == 0.99995
    model = timm.create_model('attnet_t1', drop_path_rate=0.1)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, timm.layers.DropPath)]
    assert len(rates) == 2 * (sum(ATTNET_CONFIGS['attnet_t1']['depths']) - 1)  # block 0 has rate 0: Identity
    assert rates[-1] == pytest.approx(0.1)


def test_grad_checkpointing_same_output_and_grads():
    model = timm.create_model('attnet_xxs').train()
    x = torch.randn(2, 3, 32, 32)
    ref = model.forward_features(x)
    ref.sum().backward()
    g_ref = model.stages[0][0].token_mixer.kernel_gen.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model.forward_features(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(model.stages[0][0].token_mixer.kernel_gen.weight.grad, g_ref)


def test_pool_mode_option_and_bad_config():
    a = timm.create_model('attnet_xxs', pool_mode='2d')
    assert all(m.pool_mode == '2d' for m in a.modules() if isinstance(m, ATConv2d))
    assert sum(p.numel() for p in a.parameters()) == EXPECTED_PARAMS['attnet_xxs']
    k = timm.create_model('attnet_xxs', kernel_size=(7, 5, 3, 3))
    assert [m.kernel_size for m in k.modules() if isinstance(m, ATConv2d)][0] == 7
    with pytest.raises(TypeError):
        timm.create_model('attnet_xxs', not_an_arg=1)
    with pytest.raises(ValueError, match='pool_mode'):
        timm.create_model('attnet_xxs', pool_mode='grid')
    with pytest.raises(ValueError, match='kernel_size'):
        AttNet(kernel_size=(3, 3))


def test_weights_index_lists_authors_release():
    """T1-T4 ImageNet-1K weights exist upstream (README folder link): listed, not mirrored, no invented hash."""
    for name, top1 in (('attnet_t1', 82.8), ('attnet_t2', 84.4), ('attnet_t3', 85.3), ('attnet_t4', 85.6)):
        e = hub.find_entry(name, 'in1k')
        assert e is not None and e['status'] == 'not_mirrored' and not e.get('sha256')
        top1_claimed = [m['value'] for m in e['metrics'] if m['name'] == 'top1']
        assert 'price112/Attentive-Convolution' in e['source']['url'] and top1_claimed == [top1]
        with pytest.raises(hub.PretrainedUnavailableError, match='Attentive-Convolution'):
            timm.create_model(name, pretrained=True)
    assert hub.find_entry('attnet_xxs', 'in1k') is None  # code-only: nothing released
    cfg = timm.models.get_pretrained_cfg('attnet_xs.untrained')
    assert 'code-only' in ' '.join(cfg.notes)


@pytest.mark.parametrize('length,bins', [(3136, 9), (784, 9), (49, 9), (5, 9), (14, 3), (7, 3), (2, 3)])
def test_onnx_pool_matrix_equals_adaptive_pooling(length, bins):
    from dynzoo.layers.atconv import adaptive_pool_matrix
    x = torch.randn(2, 3, length, dtype=torch.float64)
    torch.testing.assert_close(x @ adaptive_pool_matrix(length, bins, x), F.adaptive_avg_pool1d(x, bins))


@pytest.mark.parametrize('what', ['attnet_xxs', 'atconv_2d'])
def test_onnx_export_dynamic_batch(tmp_path, what):
    """ONNX lacks adaptive pooling with non-dividing sizes and static-group convs with a dynamic batch: the export
    path (pooling matrices, dynzoo.tools.export's GEMM per-sample conv) must match PyTorch at batch 1 and 3."""
    pytest.importorskip('onnxruntime')
    from dynzoo.tools.export import check_onnx, export_onnx
    if what == 'attnet_xxs':
        model, size = timm.create_model('attnet_xxs').eval(), (3, 64, 96)
    else:  # the paper's grid pooling, on one layer (the network path is the same as for '1d')
        model, size = ATConv2d(8, pool_mode='2d').eval(), (8, 10, 13)
        _randomize(model)
    path = export_onnx(model, str(tmp_path / 'model.onnx'), input_size=size, exporter='torchscript')
    assert check_onnx(model, path, input_size=size) < 1e-5
