"""ATConv as a drop-in token mixer: the token-sequence form, the swap of timm's ViT / Swin attention, and the
ATConv-Swin / ATConv-PVT models of the AttNet paper's Tab. II (counts on the meta device, behaviour on tiny builds)."""
import math

import pytest
import torch

import timm
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

import dynzoo
from dynzoo.layers import ATConv2d, ATConvAttention, ATConvTokens, ATConvSwinBlock, swap_attention_for_atconv
from dynzoo.layers.atconv import atconv_num_params
from dynzoo.models import MODEL_INFO
from dynzoo.models.atconv_transformers import (
    ATCONV_SWIN_CONFIGS, PVT_V1_CONFIGS, PyramidVisionTransformerV1,
    swin_relative_position_params,
)
from dynzoo.utils.flops import count_macs, count_params

# Tab. II as printed (M params / GFLOPs) and PVT v1's own Tab. 2 (its classification/pvt.py gives the same counts)
TABLE_II = {
    'atconv_pvt_tiny': (10.2, 1.8), 'atconv_pvt_small': (18.3, 3.5),
    'atconv_pvt_medium': (31.9, 6.1), 'atconv_pvt_large': (43.3, 9.2),
    'atconv_swin_tiny_224': (28.0, 4.2), 'atconv_swin_small_224': (47.6, 8.1),
    'atconv_swin_base_224': (84.2, 14.3), 'atconv_swin_base_384': (84.3, 42.1),
}
PVT_V1_PAPER_MPARAMS = {'tiny': 13.2, 'small': 24.5, 'medium': 44.2, 'large': 61.4}
SWIN_TABLE_II = {'atconv_swin_tiny_224': 28.3, 'atconv_swin_small_224': 49.6, 'atconv_swin_base_224': 87.8,
                 'atconv_swin_base_384': 87.9}

TINY_PVT = dict(embed_dims=(16, 24, 32, 40), depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), img_size=64)
TINY_SWIN = dict(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), window_size=2, img_size=64)


def printed(value: float, figure: float) -> bool:
    """``value`` as the paper prints it at one decimal: truncated (AttNet's Tab. III: 49.18 M as 49.1) or rounded
    (Tab. II: ATConv-PVT-T's 10.199 M as 10.2) -- the paper does both."""
    return figure in (math.floor(value * 10) / 10, round(value, 1))


def meta_params(model_fn, *args, **kwargs) -> int:
    with torch.device('meta'):
        return count_params(model_fn(*args, **kwargs))


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


# --- the token-sequence form --------------------------------------------------------------------------------------

@pytest.mark.parametrize('pool_mode', ['1d', '2d'])
@pytest.mark.parametrize('inference_mode', [False, True])
def test_token_form_equals_conv_form(pool_mode, inference_mode):
    torch.manual_seed(0)
    conv = ATConv2d(12, pool_mode=pool_mode, inference_mode=inference_mode)
    torch.nn.init.normal_(conv.difference_control)
    tokens = ATConvTokens(12, pool_mode=pool_mode, inference_mode=inference_mode)
    tokens.load_state_dict(conv.state_dict(), strict=True)  # same keys and shapes
    assert count_params(tokens) == count_params(conv) == atconv_num_params(12)
    x = torch.randn(3, 12, 5, 7)
    with torch.no_grad():
        ref = conv(x).flatten(2).transpose(1, 2)
        out = tokens(x.flatten(2).transpose(1, 2), [5, 7])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_token_form_reparameterizes_and_scripts():
    torch.manual_seed(0)
    model = ATConvTokens(8)
    x = torch.randn(2, 6 * 4, 8)
    with torch.no_grad():
        ref = model(x, [6, 4])
        deploy = ATConvTokens(8, inference_mode=True)
        deploy.load_state_dict(dynzoo.reparameterize(torch.nn.Sequential(model))[0].state_dict(), strict=True)
        torch.testing.assert_close(deploy(x, [6, 4]), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.jit.script(model)(x, [6, 4]), ref)
    with pytest.raises(ValueError, match='H \\* W'):
        model(x, [5, 4])


# --- the swap utility ---------------------------------------------------------------------------------------------

def _vit(**kwargs):
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, **kwargs).eval()


def test_swap_vit_removes_what_it_is_told():
    torch.manual_seed(0)
    model = _vit()
    before = count_params(model)
    attention = sum(count_params(b.attn) for b in model.blocks)
    pos, cls = model.pos_embed.numel(), model.cls_token.numel()
    with pytest.raises(ValueError, match='class token'):
        swap_attention_for_atconv(_vit(), drop_pos_embed=False, class_token_to_avg_pool=False)
    swap_attention_for_atconv(model, drop_pos_embed=True, class_token_to_avg_pool=True)
    assert all(isinstance(b.attn, ATConvAttention) for b in model.blocks)
    assert model.pos_embed is None and model.cls_token is None and model.global_pool == 'avg'
    assert count_params(model) == before - attention + 2 * atconv_num_params(16) - pos - cls
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), out)
    assert out.shape == (2, 1000)


def test_swap_vit_keeps_position_embedding_without_the_class_slot():
    model = _vit()
    grid = model.patch_embed.num_patches
    swap_attention_for_atconv(model, drop_pos_embed=False, class_token_to_avg_pool=True)
    assert model.pos_embed.shape == (1, grid, 16)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_swap_swin_blocks_keep_their_modules():
    torch.manual_seed(0)
    model = SwinTransformer(**TINY_SWIN).eval()
    mlp = model.layers[1].blocks[1].mlp
    with pytest.raises(ValueError, match='no absolute position embedding'):
        swap_attention_for_atconv(model, drop_pos_embed=True, class_token_to_avg_pool=False)
    swap_attention_for_atconv(model, drop_pos_embed=False, class_token_to_avg_pool=False)
    block = model.layers[1].blocks[1]
    assert isinstance(block, ATConvSwinBlock) and block.mlp is mlp
    assert not any('relative_position' in n for n, _ in model.named_parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x))


# --- Tab. II: parameters and FLOPs --------------------------------------------------------------------------------

@pytest.mark.parametrize('name', sorted(TABLE_II))
def test_registered_figures_are_table_ii(name):
    params, flops = TABLE_II[name]
    info = MODEL_INFO[name]
    assert (info['paper_params'], info['paper_macs']) == (params * 1e6, flops * 1e9)


@pytest.mark.parametrize('size', sorted(PVT_V1_CONFIGS))
def test_pvt_params_match_table_ii(size):
    name = f'atconv_pvt_{size}'
    assert printed(meta_params(timm.create_model, name) / 1e6, TABLE_II[name][0])
    # the host itself: PVT v1 as published (Tab. II prints 61.8 M for PVT-L, where PVT's paper and code give 61.4 M)
    source = meta_params(PyramidVisionTransformerV1, **PVT_V1_CONFIGS[size])
    assert printed(source / 1e6, PVT_V1_PAPER_MPARAMS[size])


@pytest.mark.parametrize('name', sorted(ATCONV_SWIN_CONFIGS))
def test_swin_params_match_table_ii(name):
    cfg = ATCONV_SWIN_CONFIGS[name]
    tables = swin_relative_position_params(cfg['depths'], cfg['num_heads'], cfg['window_size'])
    source = meta_params(SwinTransformer, **cfg)
    assert tables == sum(p.numel() for n, p in SwinTransformer(**cfg, device='meta').named_parameters()
                         if 'relative_position_bias_table' in n)
    assert printed(source / 1e6, SWIN_TABLE_II[name])
    model = meta_params(timm.create_model, name)
    assert printed((model + tables) / 1e6, TABLE_II[name][0])
    # what does not fit: a pure attention swap (no conv merging) ...
    with torch.device('meta'):
        swapped = swap_attention_for_atconv(
            SwinTransformer(**cfg), drop_pos_embed=False, class_token_to_avg_pool=False)
    assert not printed((count_params(swapped) + tables) / 1e6, TABLE_II[name][0])
    # ... and, for B-384, the model without the tables
    if name == 'atconv_swin_base_384':
        assert not printed(model / 1e6, TABLE_II[name][0])


@pytest.mark.parametrize('name', ['atconv_pvt_tiny', 'atconv_swin_tiny_224'])
def test_flops_match_table_ii(name):
    """fvcore's convention (conv / linear / matmul MACs, norms per element), eval mode, one 224 px image."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    macs, _ = count_macs(model, (3, 224, 224), convention='fvcore')
    assert printed(macs / 1e9, TABLE_II[name][1])


# --- behaviour on tiny builds -------------------------------------------------------------------------------------

def _tiny(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **(TINY_PVT if 'pvt' in name else TINY_SWIN), **kwargs)


@pytest.mark.parametrize('name', ['atconv_pvt_tiny', 'atconv_swin_tiny_224'])
def test_features_only_strides_4_to_32(name):
    model = _tiny(name, features_only=True).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape[1:]) for o in outs] == [
        (c, 64 // r, 96 // r) for c, r in zip(model.feature_info.channels(), model.feature_info.reduction())]


@pytest.mark.parametrize('name', ['atconv_pvt_tiny', 'atconv_swin_tiny_224'])
def test_reparameterize_and_inference_mode(name):
    model = _tiny(name)
    _randomize_bn(model)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        deploy = dynzoo.reparameterize(model)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deploy.modules())
        assert all(m.kernel_proj is None for m in deploy.modules() if isinstance(m, ATConvTokens))
        direct = _tiny(name, inference_mode=True).eval()
        direct.load_state_dict(deploy.state_dict(), strict=True)
        torch.testing.assert_close(direct(x), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dynzoo.reparameterize(deploy)(x), ref, rtol=1e-4, atol=1e-5)  # twice: no-op
        torch.testing.assert_close(torch.jit.script(deploy)(x), ref, rtol=1e-4, atol=1e-5)


def test_pvt_host_attention_form_runs_at_other_sizes():
    """The source PVT v1 (attention, position embeddings resampled, class token) beside its ATConv form."""
    torch.manual_seed(0)
    model = PyramidVisionTransformerV1(**TINY_PVT, num_classes=5).eval()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), out)
        final, feats = model.forward_intermediates(x)
    assert out.shape == (2, 5) and final.shape == (2, 1 + 3 * 2, 40)
    assert [f.shape[-2:] for f in feats] == [(96 // r, 64 // r) for r in (4, 8, 16, 32)]
    with pytest.raises(ValueError, match='class token'):
        PyramidVisionTransformerV1(token_mixer='atconv', class_token=True)


def test_onnx_export_matches_pytorch(tmp_path):
    pytest.importorskip('onnxruntime')
    from dynzoo.tools.export import check_onnx, export_onnx
    model = dynzoo.reparameterize(_tiny('atconv_pvt_tiny').eval())
    path = export_onnx(model, str(tmp_path / 'atconv_pvt.onnx'), (3, 64, 64), batch_size=2, exporter='torchscript')
    assert check_onnx(model, path, (3, 64, 64), batch_sizes=(1, 3)) < 1e-4
