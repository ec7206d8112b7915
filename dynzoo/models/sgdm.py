"""SGDM backbones: YOLOv8-cls C2f-CSPDarknet (n, s) and ResNet-18 with an SGDM after the P3/P4/P5 stages.

Paper: W. Xing, Z. Cui, J. Qi, "SGDM: Static-Guided Dynamic Module Make Stronger Visual Models" (Hebei
University). The paper evaluates SGDM only in YOLO detectors, inserted in the *neck* right before the Detect head
(§4.1); it reports no classification result and publishes neither code nor weights. These timm models are
dynzoo's architectural offerings, not the paper's: SGDM sits at the *backbone* stage outputs,
where a detector takes P3/P4/P5, so ``features_only=True`` gives SGDM-refined P3/P4/P5 maps (strides 8/16/32) for a
YOLO / FPN neck (``docs/sgdm.md``). ``pretrained=True`` raises: no checkpoint exists.

* ``sgdm_cspdarknet_n`` / ``_s`` -- the YOLOv8n/s-cls backbone (Ultralytics ``Conv`` = conv + BN(eps 1e-3,
  momentum 0.03) + SiLU, ``C2f`` with residual bottlenecks; widths 16-256 / 32-512, depths 1, 2, 2, 1) with
  ``SGDM`` after the P3, P4 and P5 stages, and Ultralytics' ``Classify`` head (1x1 Conv to 1280 -> GAP -> dropout ->
  Linear; logits, no softmax). ``num_features`` is the P5 width, ``head_hidden_size`` 1280. ``sppf=True`` adds the
  detection backbone's SPPF after P5 (before its SGDM); off by default, as in YOLOv8-cls.
* ``sgdm_resnet18`` -- timm's ``resnet18`` with ``sgdm2``/``sgdm3``/``sgdm4`` after ``layer2``/``layer3``/``layer4``
  (a plain resnet18 state dict loads with ``strict=False``, only the SGDM keys missing).

Inference form (timm's ``reparameterize_model`` / ``dynzoo.reparameterize``, or built directly with
``inference_mode=True``): every Ultralytics ``Conv`` (:class:`~dynzoo.layers.conv_norm.RepConvNormAct`) and ResNet block
folds its own BNs, each :class:`~dynzoo.layers.sgdm.SGDM` its static guide and BNs; the ResNet stem's root-level
``conv1`` / ``bn1`` stay as they are (an eval BN is exact; timm's walker does not visit the root module).
"""
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.layers import SelectAdaptivePool2d, get_device_dtype
from timm.models import ResNet, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint, checkpoint_seq

from dynzoo.layers.conv_norm import RepConvNormAct
from dynzoo.layers.sgdm import SGDM
from . import _hub as hub
from ._builder import build_dynzoo_model, dynzoo_cfg, generate_dynzoo_cfgs, register_family, register_model_info
from ._hosts import ReparamBasicBlock

__all__ = ['SGDMCSPDarknet', 'SGDMResNet', 'C2f', 'SPPF', 'CSPDarknetStage', 'YoloClassifyHead',
           'checkpoint_filter_fn']

_PAPER = 'SGDM: Static-Guided Dynamic Module Make Stronger Visual Models (Xing, Cui, Qi)'
_PAPER_IDS = 'no arXiv/DOI id in the paper; no official code'

register_family('sgdm', paper=_PAPER, paper_ids=_PAPER_IDS)

# Ultralytics' Conv: conv (no bias, pad k//2) + BN(eps=1e-3, momentum=0.03) + SiLU
_yolo_norm = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.03)


def _yolo_conv(in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, inference_mode: bool = False,
               **dd) -> RepConvNormAct:
    return RepConvNormAct(
        in_chs, out_chs, kernel_size, stride=stride, norm_layer=_yolo_norm, act_layer='silu',
        inference_mode=inference_mode, **dd)


def _sgdm_args(split_ratio: float, razor_ratio: float, num_kernels: int, spatial_kernel: int,
               strategy: str) -> Dict[str, Any]:
    return dict(split_ratio=split_ratio, razor_ratio=razor_ratio, num_kernels=num_kernels,
                spatial_kernel=spatial_kernel, strategy=strategy)


class C2fBottleneck(nn.Module):
    """YOLOv8 bottleneck inside C2f: ``x + Conv3x3(Conv3x3(x))`` (width kept, expansion 1)."""

    def __init__(self, channels: int, shortcut: bool = True, inference_mode: bool = False, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv1 = _yolo_conv(channels, channels, 3, inference_mode=inference_mode, **dd)
        self.conv2 = _yolo_conv(channels, channels, 3, inference_mode=inference_mode, **dd)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        return x + y if self.shortcut else y


class C2f(nn.Module):
    """YOLOv8's CSP block with 2 convs: 1x1 to ``2h`` -> chunk -> ``n`` bottlenecks each on the last chunk ->
    concat all ``(2 + n) h`` channels -> 1x1 to ``out`` (``h = out / 2``)."""

    def __init__(self, in_chs: int, out_chs: int, depth: int = 1, shortcut: bool = True, inference_mode: bool = False,
                 device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype, 'inference_mode': inference_mode}
        self.hidden = out_chs // 2
        self.conv_split = _yolo_conv(in_chs, 2 * self.hidden, 1, **dd)
        self.blocks = nn.ModuleList([C2fBottleneck(self.hidden, shortcut, **dd) for _ in range(depth)])
        self.conv_fuse = _yolo_conv((2 + depth) * self.hidden, out_chs, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_split(x)
        y = [x[:, :self.hidden], x[:, self.hidden:]]  # chunk(2) without iterating (torch.fx)
        for block in self.blocks:
            y.append(block(y[-1]))
        return self.conv_fuse(torch.cat(y, 1))


class SPPF(nn.Module):
    """YOLOv5/8 spatial pyramid pooling (fast): 1x1 to ``c/2`` -> 3 chained ``k x k`` max-pools -> concat -> 1x1."""

    def __init__(self, channels: int, kernel_size: int = 5, inference_mode: bool = False, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype, 'inference_mode': inference_mode}
        hidden = channels // 2
        self.conv1 = _yolo_conv(channels, hidden, 1, **dd)
        self.pool = nn.MaxPool2d(kernel_size, stride=1, padding=kernel_size // 2)
        self.conv2 = _yolo_conv(4 * hidden, channels, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0 = self.conv1(x)
        y1 = self.pool(y0)
        y2 = self.pool(y1)
        return self.conv2(torch.cat([y0, y1, y2, self.pool(y2)], 1))


class CSPDarknetStage(nn.Module):
    """One CSPDarknet level: stride-2 ``Conv3x3`` -> ``C2f`` -> optional SPPF -> optional SGDM (after the stage)."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            sgdm_args: Optional[Dict[str, Any]] = None,
            sppf: bool = False,
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype, 'inference_mode': inference_mode}
        self.downsample = _yolo_conv(in_chs, out_chs, 3, stride=2, **dd)
        self.c2f = C2f(out_chs, out_chs, depth, shortcut=True, **dd)
        self.sppf = SPPF(out_chs, **dd) if sppf else nn.Identity()
        self.sgdm = SGDM(out_chs, **sgdm_args, **dd) if sgdm_args is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sgdm(self.sppf(self.c2f(self.downsample(x))))


class YoloClassifyHead(nn.Module):
    """Ultralytics ``Classify``: ``Conv1x1(in -> hidden) + BN + SiLU -> global pool -> dropout -> Linear``.

    The 1x1 conv comes *before* the pool, so it is part of the head (``num_features`` stays the backbone width and
    ``hidden_size`` is the pre-logits width). Ultralytics applies a softmax in eval mode; timm returns logits.
    ``reset(..., reset_other=True)`` drops the conv (pre-logits = pooled backbone features), as pruning does.
    """

    def __init__(
            self,
            in_features: int,
            hidden_size: int = 1280,
            num_classes: int = 1000,
            pool_type: str = 'avg',
            drop_rate: float = 0.0,
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.in_features = in_features
        self.hidden_size = hidden_size
        self.pool_type = pool_type
        self.conv = _yolo_conv(in_features, hidden_size, 1, inference_mode=inference_mode, **dd)
        self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))
        self.pre_logits_size = hidden_size * self.global_pool.feat_mult()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.pre_logits_size, num_classes, **dd) \
            if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int, pool_type: Optional[str] = None, reset_other: bool = False,
              in_features: Optional[int] = None, device=None, dtype=None) -> None:
        dd = get_device_dtype(self, device=device, dtype=dtype)
        if reset_other:
            self.conv = nn.Identity()
            self.hidden_size = self.in_features = in_features if in_features is not None else self.in_features
        if pool_type is not None:
            self.pool_type = pool_type
            self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))
            self.global_pool.train(self.training)
        self.pre_logits_size = self.hidden_size * self.global_pool.feat_mult()
        if num_classes > 0:
            self.fc = nn.Linear(self.pre_logits_size, num_classes, **dd)
            self.fc.train(self.training)
        else:
            self.fc = nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(self.conv(x))
        x = self.drop(x)
        return x if pre_logits else self.fc(x)


class SGDMCSPDarknet(nn.Module):
    """YOLOv8-cls C2f-CSPDarknet with SGDM after the chosen stages (default P3, P4, P5), timm API.

    Args:
        widths: stem + 4 stage widths (n: 16..256, s: 32..512).
        depths: bottlenecks per C2f (YOLOv8 ``3, 6, 6, 3`` x 0.33 = ``1, 2, 2, 1``).
        sgdm_levels: feature levels (0 stem, 1..4 = P2..P5) followed by an SGDM; default ``(2, 3, 4)``.
        sppf: append the detection backbone's SPPF to P5 (before its SGDM).
        head_hidden_size: width of the Classify head's 1x1 conv (Ultralytics: 1280).
        split_ratio, razor_ratio, num_kernels, spatial_kernel, strategy: forwarded to every :class:`SGDM`.
        inference_mode: build the inference form directly (folded BNs, SGDM guides stored).
    """

    def __init__(
            self,
            widths: Sequence[int] = (16, 32, 64, 128, 256),
            depths: Sequence[int] = (1, 2, 2, 1),
            sgdm_levels: Sequence[int] = (2, 3, 4),
            sppf: bool = False,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            head_hidden_size: int = 1280,
            split_ratio: float = 0.25,
            razor_ratio: float = 0.5,
            num_kernels: int = 4,
            spatial_kernel: int = 15,
            strategy: str = 'auto',
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if len(widths) != 5 or len(depths) != 4:
            raise ValueError(f'widths needs 5 entries (stem + 4 stages) and depths 4, got {widths} / {depths}')
        if any(level not in (1, 2, 3, 4) for level in sgdm_levels):
            raise ValueError(f'sgdm_levels must be stage levels in 1..4 (P2..P5), got {tuple(sgdm_levels)}')
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        sgdm_args = _sgdm_args(split_ratio, razor_ratio, num_kernels, spatial_kernel, strategy)

        self.stem = _yolo_conv(in_chans, widths[0], 3, stride=2, inference_mode=inference_mode, **dd)
        self.feature_info = [dict(num_chs=widths[0], reduction=2, module='stem')]
        stages = []
        for i in range(4):
            level = i + 1
            stages.append(CSPDarknetStage(
                widths[i], widths[i + 1], depths[i],
                sgdm_args=sgdm_args if level in sgdm_levels else None,
                sppf=sppf and level == 4, inference_mode=inference_mode, **dd))
            self.feature_info.append(dict(num_chs=widths[i + 1], reduction=2 ** (level + 1), module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.num_features = widths[-1]
        self.head = YoloClassifyHead(
            self.num_features, head_hidden_size, num_classes, global_pool, drop_rate, inference_mode=inference_mode,
            **dd)
        self.head_hidden_size = self.head.pre_logits_size

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.c2f', (1,)),
                (r'^stages\.(\d+)\.sppf', (2,)),
                (r'^stages\.(\d+)\.sgdm', (3,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False):
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, reset_other=reset_other, in_features=self.num_features)
        self.head_hidden_size = self.head.pre_logits_size

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features of the stem (0) and of each stage (1..4, after its SGDM); timm semantics. No final norm."""
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        if torch.jit.is_scripting() or not stop_early:
            stages = self.stages
        else:
            stages = self.stages[:max_index]
        for i, stage in enumerate(stages):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(stage, x)
            else:
                x = stage(x)
            if i + 1 in take_indices:
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
        """Drop the stages after the last tap; with the head (or a truncated net) drop the Classify conv too."""
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        prune_end = max_index < len(self.stages)
        self.stages = self.stages[:max_index]
        if prune_end:
            self.num_features = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '', reset_other=True)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class SGDMResNet(ResNet):
    """timm ``ResNet`` with an :class:`SGDM` after the chosen stages (``sgdm2``..``sgdm4`` after ``layer2``..``4``).

    Stages without an SGDM hold an ``nn.Identity`` (no parameters, no state-dict keys), so every ``sgdmN`` exists.
    The modules are registered in execution order (``layer2, sgdm2, layer3, ...``) so timm's ``FeatureListNet`` /
    hook extractors see them in order; feature levels 1..4 are taken after the SGDM.

    Args:
        sgdm_stages: ResNet stages (1..4) followed by an SGDM; default ``(2, 3, 4)`` (P3, P4, P5).
        split_ratio, razor_ratio, num_kernels, spatial_kernel, strategy: forwarded to every :class:`SGDM`.
        inference_mode: build the inference form directly (blocks with folded BNs, SGDM guides stored; the
            root-level stem ``conv1`` / ``bn1`` stays a conv + BN in both forms).
        **kwargs: timm ``ResNet`` arguments (``block``, ``layers``, ``num_classes``, ``output_stride``, ...); the
            block class must accept ``inference_mode`` (dynzoo's reparameterizable ResNet blocks do).
    """

    def __init__(
            self,
            sgdm_stages: Sequence[int] = (2, 3, 4),
            split_ratio: float = 0.25,
            razor_ratio: float = 0.5,
            num_kernels: int = 4,
            spatial_kernel: int = 15,
            strategy: str = 'auto',
            inference_mode: bool = False,
            device=None,
            dtype=None,
            **kwargs,
    ):
        block_args = dict(kwargs.pop('block_args', None) or {}, inference_mode=inference_mode)
        super().__init__(block_args=block_args, device=device, dtype=dtype, **kwargs)
        if any(stage not in (1, 2, 3, 4) for stage in sgdm_stages):
            raise ValueError(f'sgdm_stages must be in 1..4, got {tuple(sgdm_stages)}')
        dd = {'device': device, 'dtype': dtype, 'inference_mode': inference_mode}
        sgdm_args = _sgdm_args(split_ratio, razor_ratio, num_kernels, spatial_kernel, strategy)
        # re-register the tail in execution order: layerN, sgdmN, ..., global_pool, fc
        tail = {name: getattr(self, name) for name in ('layer1', 'layer2', 'layer3', 'layer4', 'global_pool', 'fc')}
        for name in tail:
            delattr(self, name)
        for stage in range(1, 5):
            layer = tail[f'layer{stage}']
            setattr(self, f'layer{stage}', layer)
            width = self.feature_info[stage]['num_chs']
            setattr(self, f'sgdm{stage}', SGDM(width, **sgdm_args, **dd) if stage in sgdm_stages else nn.Identity())
            if stage in sgdm_stages:
                self.feature_info[stage]['module'] = f'sgdm{stage}'
        self.global_pool = tail['global_pool']
        self.fc = tail['fc']

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    def _stages(self) -> List[Tuple[nn.Module, nn.Module]]:
        return [(self.layer1, self.sgdm1), (self.layer2, self.sgdm2), (self.layer3, self.sgdm3),
                (self.layer4, self.sgdm4)]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^conv1|bn1|maxpool',
            blocks=r'^(?:layer|sgdm)(\d+)' if coarse else [
                (r'^layer(\d+)\.(\d+)', None),
                (r'^sgdm(\d+)', (99999,)),  # after the blocks of its stage
            ],
        )

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm ResNet's taps (stem act, layer1..4), the stage taps taken after their SGDM."""
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(5, indices)
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        stages = self._stages()
        if stop_early and not torch.jit.is_scripting():
            stages = stages[:max_index]
        feat_idx = 0
        for layer, sgdm in stages:
            feat_idx += 1
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(layer, x)
                x = checkpoint(sgdm, x)
            else:
                x = sgdm(layer(x))
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
        take_indices, max_index = feature_take_indices(5, indices)
        prune_end = max_index < 4
        for stage in range(max_index + 1, 5):
            setattr(self, f'layer{stage}', nn.Sequential())
            setattr(self, f'sgdm{stage}', nn.Identity())
        if max_index == 0:
            self.maxpool = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.layer1, x)
            x = checkpoint(self.sgdm1, x)
            x = checkpoint_seq(self.layer2, x)
            x = checkpoint(self.sgdm2, x)
            x = checkpoint_seq(self.layer3, x)
            x = checkpoint(self.sgdm3, x)
            x = checkpoint_seq(self.layer4, x)
            x = checkpoint(self.sgdm4, x)
        else:
            x = self.sgdm1(self.layer1(x))
            x = self.sgdm2(self.layer2(x))
            x = self.sgdm3(self.layer3(x))
            x = self.sgdm4(self.layer4(x))
        return x


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Unwrap a training container (``state_dict`` / ``model`` / ``ema`` keys, DDP ``module.`` prefix).

    No authors' checkpoint exists; dynzoo's own keys are its module names, so nothing is renamed.
    """
    return hub.strip_prefix(hub.unwrap_checkpoint(state_dict), 'module.')


def _create_cspdarknet(variant: str, pretrained: bool = False, **kwargs) -> SGDMCSPDarknet:
    return build_dynzoo_model(
        SGDMCSPDarknet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(2, 3, 4), flatten_sequential=True), **kwargs)


def _create_resnet(variant: str, pretrained: bool = False, **kwargs) -> SGDMResNet:
    return build_dynzoo_model(
        SGDMResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return dynzoo_cfg(
        license='apache-2.0', paper_name=_PAPER, paper_ids=_PAPER_IDS,
        notes=('architecture only: the paper reports no classification result and releases no code or weights',
               'SGDM at the backbone P3/P4/P5 outputs, not the paper\'s neck placement (use dynzoo.layers.SGDM there)'),
        **kwargs)


# Ultralytics YOLOv8-cls preprocessing: no mean/std normalisation (x / 255), full-image crop
_cspdarknet_cfg = partial(
    _cfg, first_conv='stem.conv', classifier='head.fc', mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_pct=1.0)
_resnet_cfg = partial(_cfg, first_conv='conv1', classifier='fc')

default_cfgs = generate_dynzoo_cfgs({
    'sgdm_cspdarknet_n.untrained': _cspdarknet_cfg(),
    'sgdm_cspdarknet_s.untrained': _cspdarknet_cfg(),
    'sgdm_resnet18.untrained': _resnet_cfg(),
})

# The paper's own numbers concern YOLO detectors (neck SGDM), not these classifiers: none apply here.
_SOURCE = ('no paper numbers for this classifier; paper: YOLOv8n +SGDM 3.1M -> 3.3M (Tables 2, 3, 5), abstract '
           'claims +0.19M on YOLOv8n and +0.33M on YOLOv5n; closed form (sgdm_num_params): +147,740 at n scale')
register_model_info('sgdm_cspdarknet_n', 'sgdm', paper_params=None, paper_macs=None, source=_SOURCE)
register_model_info('sgdm_cspdarknet_s', 'sgdm', paper_params=None, paper_macs=None,
                    source='no paper numbers for this classifier; paper: YOLOv8s +SGDM 11.2M -> 11.8M (Table 2)')
register_model_info('sgdm_resnet18', 'sgdm', paper_params=None, paper_macs=None,
                    source='no paper numbers: ResNet is not a host in the paper')


@register_model
def sgdm_cspdarknet_n(pretrained: bool = False, **kwargs) -> SGDMCSPDarknet:
    """YOLOv8n-cls CSPDarknet (widths 16-256, depths 1-2-2-1) with SGDM(64/128/256) after P3/P4/P5."""
    model_args = dict(widths=(16, 32, 64, 128, 256), depths=(1, 2, 2, 1))
    return _create_cspdarknet('sgdm_cspdarknet_n', pretrained, **dict(model_args, **kwargs))


@register_model
def sgdm_cspdarknet_s(pretrained: bool = False, **kwargs) -> SGDMCSPDarknet:
    """YOLOv8s-cls CSPDarknet (widths 32-512, depths 1-2-2-1) with SGDM(128/256/512) after P3/P4/P5."""
    model_args = dict(widths=(32, 64, 128, 256, 512), depths=(1, 2, 2, 1))
    return _create_cspdarknet('sgdm_cspdarknet_s', pretrained, **dict(model_args, **kwargs))


@register_model
def sgdm_resnet18(pretrained: bool = False, **kwargs) -> SGDMResNet:
    """timm resnet18 with SGDM(128/256/512) after layer2/layer3/layer4."""
    model_args = dict(block=ReparamBasicBlock, layers=(2, 2, 2, 2))
    return _create_resnet('sgdm_resnet18', pretrained, **dict(model_args, **kwargs))
