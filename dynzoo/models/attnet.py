"""AttNet: the ATConv network family (Yu et al., "Attentive Convolution: Unifying the Expressivity of
Self-Attention with Convolutional Efficiency", arXiv:2510.20092; code: github.com/price112/Attentive-Convolution).

A 4-stage (strides 4, 8, 16, 32), isotropic-per-stage, pre-norm metaformer on NCHW maps (paper §III-E; the stem,
downsampling, channel mixer and head are not in the paper's text and follow the authors' ``models/AttNet.py``):

* stem ``downsample_layers.0``: conv3x3 s2 (3 -> C0/2, no bias) + BN, GELU, conv3x3 s2 (-> C0, no bias) + BN;
* downsampling ``downsample_layers.{1,2,3}``: conv3x3 s2 (no bias) + BN, no norm before and no activation after;
* block: ``x += DropPath(LS(ATConv(LN(x))))``; ``x += DropPath(LS(ConvGLU(LN(x))))`` with timm's LayerNorm2d (eps
  1e-6) and LayerScale 1e-6 (T1-T4, XS; none in XXS, S);
* ConvGLU (the paper's "GLU"): ``fc1`` C -> 2h, first half the gate ``g`` through a 3x3 depthwise conv, ``GELU(g) * v``,
  RmsNorm2d(h) (T1-T4 only), ``fc2`` h -> C, with ``h = int(2 * int(C * e) / 3)`` and ``e = (8, 8, 4, 4)``;
* head: global average pool -> LayerNorm (eps 1e-5) -> Linear (timm's ``NormMlpClassifierHead``).

State-dict keys are the authors' except the head, which timm's head holds as ``head.norm`` / ``head.fc``:
:func:`checkpoint_filter_fn` maps their ``norm.*`` / ``head.*`` and unwraps their training container
``{'model': ..., 'model_ema': ...}``, so their checkpoints load with ``strict=True``.

Checkpoint EMA choice (dynzoo's): the authors' ``train.py`` keeps an EMA (decay 0.99995) but its
``evaluate()`` reports the *raw* model, so the paper's accuracies are those of the ``'model'`` weights, which is
what loads by default. ``timm.create_model(name, pretrained=True, use_ema=True, ...)`` loads ``'model_ema'``
instead (an error if the file has none). Which of the two the authors' released files hold is not documented.

Drop-path rates (authors' launch scripts ``runs/*.txt``): T1 0.1, T2 0.2, T3 0.4, T4 0.5, S 0.05, XS 0.02,
XXS 0 -- the training recipes (``dynzoo/tools/recipes/attnet_*.yaml``) pass them; the constructors default to 0 as timm
models do.

Inference form (timm's ``reparameterize_model`` / ``dynzoo.reparameterize``, or built directly with
``inference_mode=True``): each conv + BN downsampling unit folds its BN into its conv and each ATConv switches to
its pool-first context (exact). The LayerScales stay, as in timm's FastViT: a block's LayerScale scales the output
of a projection its child owns, and a module folds only its own tensors (dynzoo's choice; one multiply per element).
"""
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.layers import DropPath, LayerNorm2d, LayerScale2d, NormMlpClassifierHead, RmsNorm2d, trunc_normal_
from timm.models import register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from dynzoo.layers.atconv import ATConv2d
from dynzoo.layers.conv_norm import ConvNormSequential
from . import _hub as hub
from ._builder import build_dynzoo_model, dynzoo_cfg, generate_dynzoo_cfgs, register_family, register_model_info

__all__ = ['AttNet', 'AttNetBlock', 'ConvGLU', 'checkpoint_filter_fn', 'ATTNET_CONFIGS']


def _conv_bn(in_chs: int, out_chs: int, inference_mode: bool = False, device=None, dtype=None) -> nn.Sequential:
    """conv3x3 stride 2 (no bias) + BN: the authors' downsampling unit (keys ``0`` conv, ``1`` BN), which folds
    its BN into the conv in the inference form."""
    dd = {'device': device, 'dtype': dtype}
    return ConvNormSequential(
        nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1, bias=False, **dd),
        nn.BatchNorm2d(out_chs, **dd),
        inference_mode=inference_mode,
    )


class ConvGLU(nn.Module):
    """Gated channel mixer of the authors' code (the paper's "GLU", §III-E; ``ConvGLU`` in ``models/AttNet.py``).

    ``fc1`` (C -> 2h), gate half through a depthwise 3x3 (``dwconv``), ``GELU(gate) * value``, optional
    ``RmsNorm2d`` (``norm_layer``), ``fc2`` (h -> C). Chunk order: first half gate, second half value.
    """

    def __init__(
            self,
            dim: int,
            hidden_dim: int,
            use_norm: bool = True,
            drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.fc1 = nn.Conv2d(dim, 2 * hidden_dim, 1, **dd)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim, **dd)
        self.act = nn.GELU()
        self.norm_layer = RmsNorm2d(hidden_dim, eps=1e-6, **dd) if use_norm else nn.Identity()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=1)
        x = self.act(self.dwconv(gate)) * value
        x = self.norm_layer(x)
        x = self.drop(x)
        return self.fc2(x)


class AttNetBlock(nn.Module):
    """Pre-norm block: ATConv token mixer and ConvGLU channel mixer, each with LayerScale and DropPath."""

    def __init__(
            self,
            dim: int,
            glu_hidden: int,
            kernel_size: int = 3,
            pool_mode: str = '1d',
            use_layer_scale: bool = True,
            layer_scale_init_value: float = 1e-6,
            glu_norm: bool = True,
            drop_path: float = 0.,
            strategy: str = 'auto',
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm_1 = LayerNorm2d(dim, eps=1e-6, **dd)
        self.token_mixer = ATConv2d(
            dim, kernel_size, pool_mode=pool_mode, strategy=strategy, inference_mode=inference_mode, **dd)
        self.layer_scale_1 = LayerScale2d(dim, layer_scale_init_value, **dd) if use_layer_scale else nn.Identity()
        self.drop_path_1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm_2 = LayerNorm2d(dim, eps=1e-6, **dd)
        self.channel_mixer = ConvGLU(dim, glu_hidden, use_norm=glu_norm, **dd)
        self.layer_scale_2 = LayerScale2d(dim, layer_scale_init_value, **dd) if use_layer_scale else nn.Identity()
        self.drop_path_2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path_1(self.layer_scale_1(self.token_mixer(self.norm_1(x))))
        x = x + self.drop_path_2(self.layer_scale_2(self.channel_mixer(self.norm_2(x))))
        return x


def glu_hidden_dim(dim: int, exp_rate: float) -> int:
    """The authors' GLU width ``int(2 * int(C * e) / 3)`` (2/3 rule, truncated twice)."""
    return int(2 * int(dim * exp_rate) / 3)


class AttNet(nn.Module):
    """AttNet (arXiv:2510.20092, §III-E, Tab. I; the authors' ``models/AttNet.py``).

    Args:
        in_chans: input channels.
        num_classes: classes of the head (0: no classifier).
        global_pool: head pooling (timm ``SelectAdaptivePool2d`` types of width 1; ``''`` none).
        depths / dims: blocks and channels per stage.
        exp_rates: ConvGLU expansion per stage (authors: 8, 8, 4, 4).
        kernel_size: ATConv ``K``, an int or one per stage (Tab. IX(a) tries [7, 5, 3, 3] etc.).
        pool_mode: ATConv context pooling, ``'1d'`` (authors' code, default) or ``'2d'`` (paper's text).
        use_layer_scale / layer_scale_init_value: LayerScale on both residual branches (init 1e-6).
        glu_norm: RmsNorm2d inside the ConvGLU.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, rising linearly over all blocks from 0.
        strategy: per-sample depthwise execution strategy of every ATConv (``'auto'`` dispatches).
        inference_mode: build the inference form directly (folded conv + BN units, pool-first ATConv), with the
            state-dict keys that reparameterizing the training form leaves.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            depths: Sequence[int] = (2, 3, 12, 3),
            dims: Sequence[int] = (48, 96, 224, 384),
            exp_rates: Sequence[float] = (8, 8, 4, 4),
            kernel_size: Union[int, Sequence[int]] = 3,
            pool_mode: str = '1d',
            use_layer_scale: bool = True,
            layer_scale_init_value: float = 1e-6,
            glu_norm: bool = True,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            strategy: str = 'auto',
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        num_stages = len(depths)
        if num_stages < 1 or len(dims) != num_stages or len(exp_rates) != num_stages:
            raise ValueError(f'depths {tuple(depths)}, dims {tuple(dims)} and exp_rates {tuple(exp_rates)} must be '
                             'non-empty and of equal length')
        if any(d < 1 for d in depths) or any(c < 2 for c in dims):
            raise ValueError(
                f'every stage needs depth >= 1 and dim >= 2, got depths {tuple(depths)}, dims {tuple(dims)}')
        kernel_sizes = (kernel_size,) * num_stages if isinstance(kernel_size, int) else tuple(kernel_size)
        if len(kernel_sizes) != num_stages:
            raise ValueError(f'kernel_size needs one entry per stage ({num_stages}), got {kernel_size}')
        if not 0. <= drop_path_rate < 1.:
            raise ValueError(f'drop_path_rate must be in [0, 1), got {drop_path_rate}')
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        conv_bn = partial(_conv_bn, inference_mode=inference_mode, **dd)
        stem = nn.Sequential(conv_bn(in_chans, dims[0] // 2), nn.GELU(), conv_bn(dims[0] // 2, dims[0]))
        self.downsample_layers = nn.ModuleList(
            [stem] + [conv_bn(dims[i - 1], dims[i]) for i in range(1, num_stages)])

        # the authors' linear rule; on cpu even under a meta device context
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        stages = []
        self.feature_info = []
        cur = 0
        for i in range(num_stages):
            hidden = glu_hidden_dim(dims[i], exp_rates[i])
            stages.append(nn.Sequential(*[
                AttNetBlock(
                    dims[i], hidden, kernel_size=kernel_sizes[i], pool_mode=pool_mode,
                    use_layer_scale=use_layer_scale, layer_scale_init_value=layer_scale_init_value,
                    glu_norm=glu_norm, drop_path=dpr[cur + j], strategy=strategy, inference_mode=inference_mode,
                    **dd)
                for j in range(depths[i])
            ]))
            cur += depths[i]
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.ModuleList(stages)

        self.num_features = dims[-1]
        self.head = NormMlpClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
            norm_layer=partial(LayerNorm2d, eps=1e-5), **dd)
        self.head_hidden_size = self.head.num_features
        self.apply(self._init_weights)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise every parameter and buffer, e.g. after ``to_empty()`` from the meta device."""
        for m in self.modules():
            if m is not self and callable(getattr(m, 'reset_parameters', None)):
                m.reset_parameters()  # norms, BN statistics, LayerScale, ATConv (gamma = 0)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Authors' init: trunc-normal(0.02) conv / linear weights, zero biases (norms keep their defaults)."""
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^downsample_layers\.0\.',
            blocks=[(r'^downsample_layers\.(\d+)', None), (r'^stages\.(\d+)', None)] if coarse else [
                (r'^downsample_layers\.(\d+)', (0,)),
                (r'^stages\.(\d+)\.(\d+)', None),
                (r'^head\.norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """What the authors' optimizer (timm ``create_optimizer``, ``filter_bias_and_bn``) leaves undecayed: every
        1-D parameter -- ``difference_control``, LayerScale ``gamma``, norm weights, biases."""
        patterns = ('*.difference_control', '*.gamma', '*.bias', '*norm*.weight', 'downsample_layers.*.1.weight')
        names = [n for n, _ in self.named_parameters()]
        from fnmatch import fnmatch
        return {p for p in patterns if any(fnmatch(n, p) for n in names)}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False) -> None:
        self.num_classes = num_classes
        p = next(self.parameters())
        self.head.reset(num_classes, global_pool, reset_other=reset_other, in_features=self.num_features,
                        device=p.device, dtype=p.dtype)
        self.head_hidden_size = self.head.num_features

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (strides 4, 8, 16, 32) for dense prediction; ``norm`` has nothing to apply (the only
        final norm sits after pooling, in the head)."""
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        num_run = len(self.stages) if torch.jit.is_scripting() or not stop_early else max_index + 1
        for feat_idx, (down, stage) in enumerate(zip(self.downsample_layers, self.stages)):
            if feat_idx < num_run:
                x = down(x)
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint_seq(stage, x)
                else:
                    x = stage(x)
                if feat_idx in take_indices:
                    intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        self.downsample_layers = self.downsample_layers[:max_index + 1]
        if prune_end:
            # the head's norm is sized for the final stage, so it goes with it
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '', reset_other=True)
        elif prune_norm:
            self.head.norm = nn.Identity()
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for down, stage in zip(self.downsample_layers, self.stages):
            x = down(x)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


# the authors' AttNet_* configs (models/AttNet.py)
ATTNET_CONFIGS: Dict[str, Dict[str, Any]] = {
    'attnet_xxs': dict(depths=(2, 2, 4, 2), dims=(32, 64, 128, 240), use_layer_scale=False, glu_norm=False),
    'attnet_xs': dict(depths=(2, 2, 7, 2), dims=(40, 80, 160, 320), use_layer_scale=True, glu_norm=False),
    'attnet_s': dict(depths=(2, 3, 10, 3), dims=(40, 80, 160, 320), use_layer_scale=False, glu_norm=False),
    'attnet_t1': dict(depths=(2, 3, 12, 3), dims=(48, 96, 224, 384)),
    'attnet_t2': dict(depths=(3, 3, 16, 3), dims=(64, 128, 288, 512)),
    'attnet_t3': dict(depths=(4, 4, 26, 4), dims=(72, 144, 320, 576)),
    'attnet_t4': dict(depths=(5, 5, 28, 5), dims=(96, 192, 384, 768)),
}

# the authors' launch scripts (runs/*.txt), used by the recipes; the model constructors default to 0
AUTHORS_DROP_PATH = {
    'attnet_xxs': 0.0, 'attnet_xs': 0.02, 'attnet_s': 0.05,
    'attnet_t1': 0.1, 'attnet_t2': 0.2, 'attnet_t3': 0.4, 'attnet_t4': 0.5,
}


def checkpoint_filter_fn(
        state_dict: Dict[str, Any],
        model: nn.Module,
        use_ema: bool = False,
) -> Dict[str, torch.Tensor]:
    """Authors' AttNet checkpoint (their ``train.py`` container or a bare state dict) or a dynzoo one -> dynzoo.

    Unwraps ``{'model': ..., 'model_ema': ...}`` (``use_ema`` picks the EMA copy), strips a DDP ``module.``
    prefix and maps the authors' head (``norm.*`` -> ``head.norm.*``, ``head.{weight,bias}`` ->
    ``head.fc.{weight,bias}``); every other key is already the authors'.
    """
    sd = hub.strip_prefix(hub.unwrap_checkpoint(state_dict, use_ema=use_ema), 'module.')
    if 'head.fc.weight' in sd or 'head.norm.weight' in sd:
        return sd  # dynzoo layout
    out = {}
    for k, v in sd.items():
        if k.startswith('norm.'):
            k = 'head.' + k
        elif k in ('head.weight', 'head.bias'):
            k = 'head.fc.' + k[len('head.'):]
        out[k] = v
    return out


def _create_attnet(variant: str, pretrained: bool = False, **kwargs) -> AttNet:
    use_ema = kwargs.pop('use_ema', False)
    model_args = dict(ATTNET_CONFIGS[variant])
    model_args.update(kwargs)
    return build_dynzoo_model(
        AttNet, variant, pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn, use_ema=use_ema),
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)),
        **model_args)


_PAPER = 'Attentive Convolution: Unifying the Expressivity of Self-Attention with Convolutional Efficiency'
_PAPER_IDS = 'arXiv:2510.20092'
_SOURCE = 'https://github.com/price112/Attentive-Convolution'

register_family('attnet', paper=_PAPER + ' (Yu et al., 2025)', paper_ids=_PAPER_IDS, code=_SOURCE)


def _cfg(**kwargs) -> Dict[str, Any]:
    return dynzoo_cfg(
        license='mit', paper_name=_PAPER, paper_ids=_PAPER_IDS, origin_url=_SOURCE,
        interpolation='bicubic', crop_pct=0.875,
        first_conv='downsample_layers.0.0.0', classifier='head.fc',
        **kwargs)


_RELEASED = ('the authors released ImageNet-1K weights (README folder link, not yet mirrored by dynzoo): load the '
             'downloaded .pth with pretrained_cfg_overlay=dict(file=...)',)
_CODE_ONLY = ('code-only variant: not in the paper, no paper results and no released weights (unverified)',)

default_cfgs = generate_dynzoo_cfgs({
    'attnet_xxs.untrained': _cfg(notes=_CODE_ONLY),
    'attnet_xs.untrained': _cfg(notes=_CODE_ONLY),
    'attnet_s.untrained': _cfg(notes=_CODE_ONLY),
    'attnet_t1.in1k': _cfg(notes=_RELEASED),
    'attnet_t2.in1k': _cfg(notes=_RELEASED),
    'attnet_t3.in1k': _cfg(notes=_RELEASED),
    'attnet_t4.in1k': _cfg(notes=_RELEASED),
})

# What the paper (Tab. I / III) and the authors' code state; tests compute ours and compare.
_SRC_PAPER = 'paper Tab. III (params, FLOPs at 224, fvcore train mode); exact count: authors\' code'
_SRC_CODE = 'authors\' code only (models/AttNet.py); not in the paper'
register_model_info('attnet_xxs', 'attnet', paper_params=2_853_556,
                    paper_macs=None, paper_top1=None, source=_SRC_CODE)
register_model_info('attnet_xs', 'attnet', paper_params=5_554_902,
                    paper_macs=None, paper_top1=None, source=_SRC_CODE)
register_model_info('attnet_s', 'attnet', paper_params=7_681_316,
                    paper_macs=None, paper_top1=None, source=_SRC_CODE)
register_model_info('attnet_t1', 'attnet', paper_params=13_714_900,
                    paper_macs=2.4e9, paper_top1=82.8, source=_SRC_PAPER)
register_model_info('attnet_t2', 'attnet', paper_params=27_010_782,
                    paper_macs=5.1e9, paper_top1=84.4, source=_SRC_PAPER)
register_model_info('attnet_t3', 'attnet', paper_params=49_175_682,
                    paper_macs=9.4e9, paper_top1=85.3, source=_SRC_PAPER)
register_model_info('attnet_t4', 'attnet', paper_params=87_320_214,
                    paper_macs=16.7e9, paper_top1=85.6, source=_SRC_PAPER)


@register_model
def attnet_xxs(pretrained: bool = False, **kwargs) -> AttNet:
    """AttNet-XXS (authors' code only): depths (2, 2, 4, 2), dims (32, 64, 128, 240), no LayerScale/GLU norm."""
    return _create_attnet('attnet_xxs', pretrained, **kwargs)


@register_model
def attnet_xs(pretrained: bool = False, **kwargs) -> AttNet:
    """AttNet-XS (authors' code only): depths (2, 2, 7, 2), dims (40, 80, 160, 320), LayerScale, no GLU norm."""
    return _create_attnet('attnet_xs', pretrained, **kwargs)


@register_model
def attnet_s(pretrained: bool = False, **kwargs) -> AttNet:
    """AttNet-S (authors' code only): depths (2, 3, 10, 3), dims (40, 80, 160, 320), no LayerScale/GLU norm."""
    return _create_attnet('attnet_s', pretrained, **kwargs)


@register_model
def attnet_t1(pretrained: bool = False, **kwargs) -> AttNet:
    """AttNet-T1 (paper Tab. I): depths (2, 3, 12, 3), dims (48, 96, 224, 384); 13.7M params, 2.4 GFLOPs."""
    return _create_attnet('attnet_t1', pretrained, **kwargs)


@register_model
def attnet_t2(pretrained: bool = False, **kwargs) -> AttNet:
    """AttNet-T2 (paper Tab. I): depths (3, 3, 16, 3), dims (64, 128, 288, 512); 27.0M params, 5.1 GFLOPs."""
    return _create_attnet('attnet_t2', pretrained, **kwargs)


@register_model
def attnet_t3(pretrained: bool = False, **kwargs) -> AttNet:
    """AttNet-T3 (paper Tab. I): depths (4, 4, 26, 4), dims (72, 144, 320, 576); 49.1M params, 9.4 GFLOPs."""
    return _create_attnet('attnet_t3', pretrained, **kwargs)


@register_model
def attnet_t4(pretrained: bool = False, **kwargs) -> AttNet:
    """AttNet-T4 (paper Tab. I): depths (5, 5, 28, 5), dims (96, 192, 384, 768); 87.3M params, 16.7 GFLOPs."""
    return _create_attnet('attnet_t4', pretrained, **kwargs)
