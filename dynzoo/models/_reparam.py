"""Whole-model reparameterization: timm's ``reparameterize_model`` walker, nothing more.

Every reparameterizable module of the zoo follows timm's MobileOne / FastViT contract: it takes
``inference_mode=`` in its constructor (``True`` builds the inference form directly) and its ``reparameterize()``
folds only its own tensors and conv/norm pairs, reading BatchNorm running statistics in any mode, with a structural
sentinel (the fused module exists or it does not), so a second call is a no-op. The walker visits every module below
the root, parent before children; the root is not visited, so no model class folds anything of its own (the hosts'
stem and head BatchNorms stay: an eval BatchNorm is exact).

Hence ``reparameterize(timm.create_model(name))`` and ``timm.create_model(name, inference_mode=True)`` have the
same structure: the state dict of one loads ``strict=True`` into the other.
"""
import torch.nn as nn

from timm.models import reparameterize_model

__all__ = ['reparameterize']


def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The inference form of ``model`` (``timm.utils.reparameterize_model``): eval outputs agree to rounding.

    Args:
        model: any dynzoo (or timm) model, in training or eval mode (folds read the running statistics).
        inplace: convert ``model`` itself; by default a deep copy is converted.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'reparameterize expects an nn.Module, got {type(model).__name__}')
    return reparameterize_model(model, inplace=inplace)
