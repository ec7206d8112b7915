"""Dynamic Mobile-Former: the dynamic residual conv, the three models, checkpoints, fusion, detection use."""
import copy
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
import timm
from torch.utils._python_dispatch import TorchDispatchMode

from timm.layers.grn import GlobalResponseNorm

import dynzoo
from dynzoo.layers.drconv import DynamicResidualConv2d, PooledBatchNorm2d
from dynzoo.models.dmf import CompatGlobalResponseNorm, checkpoint_filter_fn

from conftest import official_fixture

# exact parameter counts (1000 classes) and fvcore FLOPs at 224 of the authors' code (one multiply-add = one FLOP)
EXACT_PARAMS = {'dmf_xxs': 15_075_208, 'dmf_xs': 19_805_516, 'dmf_s': 25_145_252}
FVCORE_FLOPS = {'dmf_xxs': 198_559_176, 'dmf_xs': 284_793_912, 'dmf_s': 499_878_216}
PAPER_FLOPS = {'dmf_xxs': 198e6, 'dmf_xs': 285e6, 'dmf_s': 499e6}
FEATURE_CHANNELS = {'dmf_xxs': [12, 20, 36, 88, 120], 'dmf_xs': [18, 30, 54, 132, 180], 'dmf_s': [24, 40, 72, 176, 240]}


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every tensor off its init (zero experts, GRN, BN statistics) so that every branch matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
        for n, b in model.named_buffers():
            if n.endswith('running_var'):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif n.endswith('running_mean'):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


# ------------------------------------------------------------------------------------------ dynamic residual conv

def _reference_drconv(layer: DynamicResidualConv2d, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Eq. 2 / Fig. 3 written out per sample, independent of the core."""
    att = layer.kernel_attention
    outs = []
    for n in range(x.shape[0]):
        a = torch.cat([z[n], x[n].mean((1, 2))])
        h = F.conv2d(a.reshape(1, -1, 1, 1), att.net1.weight)
        h = F.batch_norm(h, att.bn.running_mean, att.bn.running_var, att.bn.weight, att.bn.bias, False, 0., att.bn.eps)
        pi = torch.sigmoid(F.conv2d(F.relu(h), att.net2.weight).flatten() / att.temperature)
        w = layer.static_weight + 0.1 * (pi.reshape(-1, 1, 1, 1, 1) * layer.weight).sum(0)
        outs.append(F.conv2d(x[n:n + 1], w, None, layer.stride, layer.padding, layer.dilation, layer.groups))
    return torch.cat(outs)


FORMS = {
    'pointwise_grouped': dict(in_channels=24, out_channels=144, kernel_size=1, groups=4),
    'depthwise': dict(in_channels=36, out_channels=36, kernel_size=3, groups=36),
    'dense3x3': dict(in_channels=8, out_channels=12, kernel_size=3, groups=1),
}


@pytest.mark.parametrize('form', sorted(FORMS))
def test_drconv_zero_experts_is_the_agnostic_conv(form):
    torch.manual_seed(0)
    layer = DynamicResidualConv2d(**FORMS[form], token_dim=16).eval()
    assert torch.count_nonzero(layer.weight) == 0 and torch.count_nonzero(layer.static_weight) > 0
    x, z = torch.randn(3, layer.in_channels, 9, 9), torch.randn(3, 16)
    expected = F.conv2d(x, layer.static_weight, None, 1, layer.padding, 1, layer.groups)
    torch.testing.assert_close(layer(x, z), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('form', sorted(FORMS))
@pytest.mark.parametrize('strategy', ['grouped', 'dense', 'loop'])
def test_drconv_matches_equation(form, strategy):
    torch.manual_seed(1)
    layer = DynamicResidualConv2d(**FORMS[form], token_dim=16, strategy=strategy).eval()
    _perturb(layer)
    with torch.no_grad():
        layer.weight.normal_()  # large experts so the mixture dominates
        layer.set_temperature(3.0)
    x, z = torch.randn(3, layer.in_channels, 7, 7), torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, z), _reference_drconv(layer, x, z), rtol=1e-4, atol=1e-4)


def test_drconv_shapes_and_parameter_count():
    # DMF-S block 0 pw_conv1 (Eq. 2, Fig. 3): P = (C_in + d) d + 2d + dK + (K + 1) C_out (C_in / g) k^2
    layer = DynamicResidualConv2d.pointwise(24, 144, groups=4)
    assert tuple(layer.static_weight.shape) == (144, 6, 1, 1)
    assert tuple(layer.weight.shape) == (8, 144, 6, 1, 1)
    assert tuple(layer.kernel_attention.net1.weight.shape) == (192, 216, 1, 1)
    d, k = 192, 8
    assert sum(p.numel() for p in layer.parameters()) == (24 + d) * d + 2 * d + d * k + (k + 1) * 144 * 6
    dw = DynamicResidualConv2d.depthwise(72)
    assert dw.is_depthwise and dw.padding == (1, 1)


def test_drconv_bad_inputs():
    layer = DynamicResidualConv2d(8, 8, 1, token_dim=16).eval()
    with pytest.raises(ValueError, match='token must have shape'):
        layer(torch.randn(2, 8, 5, 5), torch.randn(2, 15))
    with pytest.raises(ValueError, match='token'):
        layer(torch.randn(2, 8, 5, 5))
    with pytest.raises(ValueError, match='input channels'):
        layer(torch.randn(2, 7, 5, 5), torch.randn(2, 16))
    with pytest.raises(ValueError, match='gate'):
        DynamicResidualConv2d(8, 8, 1, gate='relu')
    with pytest.raises(ValueError, match='hidden_channels'):
        DynamicResidualConv2d(8, 8, 1, token_dim=0)


def test_drconv_reparameterize_with_bn_is_exact():
    torch.manual_seed(2)
    layer = DynamicResidualConv2d(12, 24, 1, groups=2, token_dim=16).double().eval()
    bn = torch.nn.BatchNorm2d(24).double().eval()
    _perturb(layer)
    _perturb(bn, seed=1)
    x, z = torch.randn(2, 12, 6, 6, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = bn(layer(x, z))
        layer.kernel_attention.reparameterize()
        layer.fuse_bn(bn)
        assert isinstance(layer.kernel_attention.bn, torch.nn.Identity)
        torch.testing.assert_close(layer(x, z), expected, rtol=1e-10, atol=1e-10)


def test_pooled_bn_single_sample_modes():
    bn = PooledBatchNorm2d(4).train()
    before = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
    out = bn(torch.ones(1, 4, 1, 1))
    torch.testing.assert_close(out, torch.full((1, 4, 1, 1), 0.5 / math.sqrt(1 + bn.eps)))
    assert int(bn.num_batches_tracked) == before[2] and torch.equal(bn.running_var, before[1])
    bn(torch.randn(3, 4, 1, 1))  # a real batch still uses and updates batch statistics
    assert int(bn.num_batches_tracked) == before[2] + 1
    strict = PooledBatchNorm2d(4, single_sample='error').train()
    with pytest.raises(ValueError, match='batch >= 2'):
        strict(torch.ones(1, 4, 1, 1))


def test_grn_compat_is_affine():
    """The authors' GRN averages the (H, W) norm over a size-1 dim: a per-channel affine map up to |gamma| * eps;
    ConvNeXt-V2's (timm's) averages over channels and differs."""
    grn = CompatGlobalResponseNorm(6)
    with torch.no_grad():
        grn.weight.normal_()
        grn.bias.normal_()
    x = torch.randn(2, 6, 5, 5)
    affine = x * (1 + grn.weight.view(1, -1, 1, 1)) + grn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(grn(x), affine, rtol=1e-5, atol=1e-5)
    grn_v2 = GlobalResponseNorm(6, channels_last=False)
    grn_v2.load_state_dict(grn.state_dict())
    assert not torch.allclose(grn_v2(x), grn(x), atol=1e-3)


# ------------------------------------------------------------------------------------------------------- models

@pytest.mark.parametrize('name', sorted(EXACT_PARAMS))
def test_param_counts_exact(name):
    model = timm.create_model(name, device='meta')
    assert sum(p.numel() for p in model.parameters()) == EXACT_PARAMS[name]
    num_dyr = sum(isinstance(m, DynamicResidualConv2d) for m in model.modules())
    assert num_dyr == 34  # 33 in the blocks + the final DYR-1x1 (Table 1)
    info = dynzoo.models.MODEL_INFO[name]
    assert round(EXACT_PARAMS[name] / 1e5) * 1e5 == info['paper_params']  # the paper's 0.1M rounding


def test_no_dmf_t():
    assert 'dmf_t' not in timm.list_models('dmf*')
    assert timm.list_models('dmf*') == ['dmf_s', 'dmf_xs', 'dmf_xxs']


class _FvcoreFlops(TorchDispatchMode):
    """fvcore's convention (the paper's FLOPs, Table 2): conv / linear / (b)mm / attention matmuls count
    multiply-adds, BN 2x numel, GroupNorm / LayerNorm 5x numel, average pooling 1x numel; activations, softmax,
    adds are free. A mean that reduces nothing (the authors' GRN averages a size-1 dim) is no pooling: free."""

    def __init__(self):
        super().__init__()
        self.by_op = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aten, op = torch.ops.aten, func.overloadpacket
        n = 0
        if op is aten.convolution:
            w = args[1]
            n = out.numel() * w.shape[1] * math.prod(w.shape[2:])
        elif op in (aten.mm, aten.addmm):
            a, b = (args[0], args[1]) if op is aten.mm else (args[1], args[2])
            n = a.shape[0] * a.shape[1] * b.shape[1]
        elif op in (aten.bmm, aten.baddbmm):
            a, b = (args[0], args[1]) if op is aten.bmm else (args[1], args[2])
            n = a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        elif 'scaled_dot_product' in str(op):
            q, k, v = args[:3]
            n = math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        elif 'batch_norm' in str(op):
            n = 2 * args[0].numel()
        elif op in (aten.native_group_norm, aten.native_layer_norm):
            n = 5 * args[0].numel()
        elif op in (aten.mean, aten._adaptive_avg_pool2d) and out.numel() < args[0].numel():
            n = args[0].numel()
        self.by_op[str(op)] += n
        return out


@pytest.mark.parametrize('name', sorted(EXACT_PARAMS))
def test_flops_at_224(name):
    model = timm.create_model(name).eval()
    with torch.no_grad(), _FvcoreFlops() as counter:
        model(torch.randn(1, 3, 224, 224))
    total = sum(counter.by_op.values())
    assert total == FVCORE_FLOPS[name]
    assert abs(total - PAPER_FLOPS[name]) / PAPER_FLOPS[name] < 0.005  # the paper truncates: 198 / 285 / 499 M


def test_parity_with_authors_checkpoint(tmp_path):
    sd, x, ref, _ = official_fixture('dmf_xxs')
    assert len(sd) == 877 and 'blocks.0.dynamic_mobile.pw_conv1.Kernel_Attention.net1.weight' in sd
    path = tmp_path / 'dmf_198_official.pth'
    torch.save({'model': sd, 'epoch': 466}, path)
    model = timm.create_model('dmf_xxs', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        out = model(x)
    max_diff = (out - ref).abs().max().item()
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    print(f'dmf_xxs parity: max|diff| = {max_diff:.3e} (tolerance {tol:.3e}, max|logits| {ref.abs().max():.2f})')
    assert max_diff <= tol
    assert (out.argmax(1) == ref.argmax(1)).all()
    # the same file makes a detection backbone (the authors' RetinaNet / Mask R-CNN levels)
    backbone = timm.create_model('dmf_xxs', pretrained=True, features_only=True, out_indices=(1, 2, 3, 4),
                                 pretrained_cfg_overlay=dict(file=str(path))).eval()
    small = x[:, :, :64, :64]
    with torch.no_grad():
        expected = model.forward_intermediates(small, indices=[1, 2, 3, 4], intermediates_only=True)
        for f, e in zip(backbone(small), expected):
            torch.testing.assert_close(f, e, rtol=0, atol=0)


def test_checkpoint_filter_variants():
    model = timm.create_model('dmf_xxs', device='meta')
    own = {k: v for k, v in model.state_dict().items()}
    assert set(checkpoint_filter_fn(own, model)) == set(own)  # dynzoo checkpoints pass through
    authors = {
        'blocks.0.dynamic_mobile.pw_conv1.Kernel_Attention.net1.weight': torch.zeros(1),
        'blocks.0.dynamic_mobile.downsample.0.weight': torch.zeros(1),
        'blocks.0.dynamic_mobile.downsample.1.running_var': torch.zeros(1),
        'end_mobile2former.q.weight': torch.zeros(1), 'end_former.norm1.bias': torch.zeros(1),
        'channel_conv.static_weight': torch.zeros(1), 'bn.weight': torch.zeros(1),
        'blocks.0.ffn.grn.gamma': torch.zeros(1, 60, 1, 1), 'blocks.0.ffn.grn.beta': torch.zeros(1, 60, 1, 1),
    }
    out = checkpoint_filter_fn({'model': {'module.' + k: v for k, v in authors.items()},
                                'model_ema': authors, 'optimizer': {}}, model)
    for key in ('blocks.0.dynamic_mobile.pw_conv1.kernel_attention.net1.weight',
                'blocks.0.dynamic_mobile.downsample.conv.weight', 'blocks.0.dynamic_mobile.downsample.bn.running_var',
                'final_block.mobile2former.q.weight', 'final_block.former.norm1.bias',
                'final_block.conv.static_weight', 'final_block.bn.weight',
                'final_block.conv.kernel_attention.temperature'):
        assert key in out, key
    assert out['blocks.0.ffn.grn.weight'].shape == out['blocks.0.ffn.grn.bias'].shape == (60,)
    assert float(out['final_block.conv.kernel_attention.temperature']) == 1.0


def test_pretrained_without_weights_fails_clearly():
    with pytest.raises(dynzoo.PretrainedUnavailableError, match='dmf_xxs'):
        timm.create_model('dmf_xxs', pretrained=True)


def test_reparameterize_eval_equal():
    """timm's walker, from training or eval mode: every BN (attention ones included), every authors' GRN and the
    IRFFN shortcut folded, exact but for the GRN (|gamma| * 1e-6); idempotent; ``inference_mode=True`` builds the
    same structure (strict load, same outputs)."""
    torch.manual_seed(3)
    model = timm.create_model('dmf_xxs').double()
    _perturb(model)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = model.eval()(x)
        for mode in (True, False):
            fused = dynzoo.reparameterize(model.train(mode))
            assert not [n for n, m in fused.named_modules()
                        if isinstance(m, (torch.nn.BatchNorm2d, CompatGlobalResponseNorm))]
            assert all(m.post_bias is not None for m in fused.modules() if isinstance(m, DynamicResidualConv2d))
            out = fused.eval()(x)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        torch.testing.assert_close(dynzoo.reparameterize(fused)(x), out, rtol=0, atol=0)  # idempotent
        direct = timm.create_model('dmf_xxs', inference_mode=True).double().eval()
        direct.load_state_dict(fused.state_dict(), strict=True)
        torch.testing.assert_close(direct(x), out, rtol=0, atol=0)


def test_train_at_batch_size_one():
    model = timm.create_model('dmf_xxs', num_classes=10).train()
    attn_bn = model.blocks[0].dynamic_mobile.pw_conv1.kernel_attention.bn
    spatial_bn = model.blocks[0].dynamic_mobile.bn1
    before = attn_bn.running_mean.clone(), int(spatial_bn.num_batches_tracked)
    model(torch.randn(1, 3, 64, 64)).logsumexp(1).sum().backward()
    assert torch.equal(attn_bn.running_mean, before[0])  # single sample: running statistics used, not updated
    assert int(spatial_bn.num_batches_tracked) == before[1] + 1  # spatial BNs still train on H x W
    assert all(p.grad is not None for p in model.parameters())
    strict = timm.create_model('dmf_xxs', num_classes=10, single_sample_bn='error').train()
    with pytest.raises(ValueError, match='SyncBatchNorm'):
        strict(torch.randn(1, 3, 64, 64))


def test_temperature_schedule_and_helpers():
    """The authors' anneal 30 -> 1 over 10 epochs counts iterations from 1: ``linear_temperature(step + 1, ...)``."""
    n = 1000
    assert dynzoo.linear_temperature(0 + 1, n // 10) == pytest.approx(30 * (1 - 1 / n) + 1 / n)
    assert dynzoo.linear_temperature(n - 1 + 1, n // 10) == 1.0 and dynzoo.linear_temperature(5 * n, n // 10) == 1.0
    model = timm.create_model('dmf_xxs').eval()
    x = torch.randn(1, 3, 64, 64)
    _perturb(model)
    with torch.no_grad():
        y1 = model(x)
        assert model.net_update_temperature(30.0) == 34
        assert {t for _, t in dynzoo.get_temperatures(model).values()} == {30.0}
        y30 = model(x)
        dynzoo.set_temperature(model, 1.0)
        torch.testing.assert_close(model(x), y1)
    assert not torch.allclose(y1, y30)


def test_batch_consistency_eval():
    model = timm.create_model('dmf_xxs').eval()
    _perturb(model)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)


def test_forward_features_carries_first_token():
    model = timm.create_model('dmf_xxs').eval()
    x = torch.randn(2, 3, 100, 72)  # not multiples of 32: ceil(H / 2) per downsampling
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 960 + 192, 4, 3) and model.num_features == 1152
        z = feats[:, 960:]
        assert torch.equal(z, z[:, :, :1, :1].expand_as(z))
        pre = model.forward_head(feats, pre_logits=True)
        pooled = torch.cat([feats[:, :960].mean((2, 3)), z[:, :, 0, 0]], 1)
        torch.testing.assert_close(pre, model.head.drop(model.head.act(model.head.fc1(pooled))))
        assert pre.shape == (2, model.head_hidden_size) == (2, 1600)


@pytest.mark.parametrize('name', sorted(FEATURE_CHANNELS))
def test_features_only_levels(name):
    model = timm.create_model(name, features_only=True, device='meta')
    assert model.feature_info.channels() == FEATURE_CHANNELS[name]
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]
    inner = model.model
    assert inner.final_block is None and inner.head.fc2.__class__ is torch.nn.Identity
    assert not [n for n, _ in inner.named_parameters() if n.startswith('head.')]


def test_detection_backbone_and_frozen_blocks():
    model = timm.create_model('dmf_xxs', features_only=True, out_indices=(1, 2, 3, 4), frozen_blocks=4)
    # full detection backbone 10,186,528 params, blocks 0-3 1,982,136 (frozen by the authors' mmdet setup)
    assert sum(p.numel() for p in model.parameters()) == 10_186_528
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 10_186_528 - 1_982_136
    model.train()
    blocks = model.model.blocks
    assert not any(m.training for b in blocks[:4] for m in b.modules())
    assert all(m.training for b in blocks[4:] for m in b.modules())
    feats = model(torch.randn(2, 3, 96, 128))
    assert [tuple(f.shape[1:]) for f in feats] == [(20, 24, 32), (36, 12, 16), (88, 6, 8), (120, 3, 4)]
    with pytest.raises(ValueError, match='frozen_blocks'):
        timm.create_model('dmf_xxs', frozen_blocks=12)


def test_intermediates_match_features_and_prune():
    model = timm.create_model('dmf_xxs').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        early, inter2 = model.forward_intermediates(x, indices=[2], stop_early=True)
        torch.testing.assert_close(early, inter[2], rtol=0, atol=0)
        torch.testing.assert_close(inter2[0], inter[2], rtol=0, atol=0)
        pruned = copy.deepcopy(model)
        pruned.prune_intermediate_layers([2])
        assert len(pruned.blocks) == 4 and pruned.num_features == 36
        torch.testing.assert_close(pruned.forward_features(x), inter[2], rtol=0, atol=0)
        pruned.reset_classifier(0, 'avg')
        torch.testing.assert_close(pruned(x), inter[2].mean((2, 3)))


def test_grad_checkpointing_same_gradients():
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        model = timm.create_model('dmf_xxs', num_classes=4, drop_rate=0., drop_path_rate=0.).train()
        model.set_grad_checkpointing(enable)
        model(x).sum().backward()
        grads.append(model.stem.conv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize('kwargs,expected,paper', [
    (dict(num_kernels=4, dyr_kwargs=dict(agnostic_kernel=False)), 12_605_336, 12.6e6),  # AFKA on, RCKS off
    (dict(dyr_kwargs=dict(token_dim=0, attn_hidden=30)), 12_436_408, 12.4e6),  # AFKA off (hidden 30 fits Table 3)
    (dict(num_kernels=4, dyr_kwargs=dict(token_dim=0, attn_hidden=30, agnostic_kernel=False)), 9_988_568, 10.0e6),
])
def test_table3_ablation_configs(kwargs, expected, paper):
    """The layer's ablation switches rebuild the paper's Table 3 models (counts computed here)."""
    model = timm.create_model('dmf_xxs', device='meta', **kwargs)
    n = sum(p.numel() for p in model.parameters())
    assert n == expected and round(n / 1e5) * 1e5 == paper
    layer = model.blocks[0].dynamic_mobile.pw_conv1
    assert (layer.static_weight is None) == (not kwargs['dyr_kwargs'].get('agnostic_kernel', True))


def test_model_bad_input():
    model = timm.create_model('dmf_xxs').eval()
    with pytest.raises(ValueError, match=r'4-D input .* got shape \(3, 32, 32\)'):
        model(torch.randn(3, 32, 32))
    with pytest.raises(RuntimeError, match='to have 3 channels, but got 4 channels'):
        model(torch.randn(1, 4, 32, 32))
