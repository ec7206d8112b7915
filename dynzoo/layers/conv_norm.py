"""Static conv -> BatchNorm units with an inference form (timm's MobileOne / FastViT contract): the BatchNorm
folded into the conv, from its running statistics, in any mode (:mod:`dynzoo.layers.fusion` holds the folds).

* :func:`fold_conv_norm` -- fold a module's own ``conv -> BatchNorm`` attribute pair (static or dynamic conv);
* :class:`ConvNormSequential` -- an ``nn.Sequential`` folding its conv -> BatchNorm neighbours (timm's ResNet
  downsample, AttNet's stem and downsampling units);
* :class:`RepConvNormAct` -- timm's ``ConvNormAct`` with ``inference_mode`` and ``reparameterize()``.
"""
import torch
import torch.nn as nn

from timm.layers import ConvNormAct, LayerType

from . import fusion

__all__ = ['fold_conv_norm', 'ConvNormSequential', 'RepConvNormAct']


@torch.no_grad()
def fold_conv_norm(parent: nn.Module, conv_name: str, norm_name: str) -> None:
    """Fold the BatchNorm ``parent.<norm_name>`` into the conv ``parent.<conv_name>`` before it.

    A static ``nn.Conv2d`` is replaced by its fused form (``fusion.fuse_conv_bn``), a dynamic conv folds the norm
    into its bank (``fuse_bn``); the norm is replaced by what remains of it (``fusion.norm_act_remainder``). A norm
    that is not a BatchNorm (already folded: the structural sentinel) is left alone, so folding twice is a no-op.
    """
    norm = getattr(parent, norm_name)
    if not fusion.is_batchnorm(norm):
        return
    conv = getattr(parent, conv_name)
    if type(conv) is nn.Conv2d:
        setattr(parent, conv_name, fusion.fuse_conv_bn(conv, norm))
    elif callable(getattr(conv, 'fuse_bn', None)):
        conv.fuse_bn(norm)
    else:
        raise TypeError(f'cannot fold {norm_name} into {type(conv).__name__} {conv_name}')
    setattr(parent, norm_name, fusion.norm_act_remainder(norm))


class ConvNormSequential(nn.Sequential):
    """An ``nn.Sequential`` (timm's ResNet downsample: ``[pool,] conv, norm``) that folds its conv -> BatchNorm
    neighbours in :meth:`reparameterize`; same children, same state-dict keys."""

    def __init__(self, *layers: nn.Module, inference_mode: bool = False):
        super().__init__(*layers)
        if inference_mode:
            self.reparameterize()

    def reparameterize(self) -> None:
        names = list(self._modules)
        for conv_name, norm_name in zip(names[:-1], names[1:]):
            fold_conv_norm(self, conv_name, norm_name)


class RepConvNormAct(ConvNormAct):
    """timm's ``ConvNormAct`` (conv -> ``BatchNormAct2d``, keys ``conv`` / ``bn``) with an inference form: the BN
    folded into the conv (which gains a bias) and ``bn`` reduced to its activation (``inference_mode=True`` or
    :meth:`reparameterize`). DMF's stem and stride-2 depthwise downsampling; SGDM's Ultralytics ``Conv``."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int = 1,
            stride: int = 1,
            groups: int = 1,
            bias: bool = False,
            norm_layer: LayerType = nn.BatchNorm2d,
            act_layer: LayerType = nn.ReLU,
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__(
            in_chs, out_chs, kernel_size, stride=stride, groups=groups, bias=bias or inference_mode,
            norm_layer=norm_layer, act_layer=act_layer, device=device, dtype=dtype)
        if inference_mode:
            self.bn = fusion.norm_act_remainder(self.bn)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the BN into the conv (exact); a no-op once folded."""
        fold_conv_norm(self, 'conv', 'bn')
