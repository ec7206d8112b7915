"""Parameter and MAC/FLOP counting that understands dynamic convolutions (``dynzoo.utils.flops``).

The counter intercepts the ops a forward pass calls at the ``torch``/``torch.nn.functional`` level (a
``TorchFunctionMode``: it sees ``F.conv2d``, ``F.linear``, ``torch.mm``, ``F.batch_norm``, ... before any
decomposition, like fvcore's JIT-trace-level counting), so it counts whatever a layer really computes:

* a dynamic conv's per-sample convolution (the batch folded into the conv groups counts ``C_out*(C_in/g)*k^2*H'*W'``
  per sample), its kernel aggregation ``alpha @ W`` (``K*C_out*(C_in/g)*k^2`` per sample, an ``mm``), and its
  attention heads (1x1 convs / linears on pooled context);
* while counting, every dynamic conv runs the ``'grouped'`` strategy (aggregate, then convolve): the computation the
  papers count, independent of the execution strategy the dispatcher would pick (``'dense'`` does ``K`` convs).
  The count runs on a private copy of the model (:func:`counting_copy`), so it changes nothing another thread sees.

Conventions (``convention=``), one multiply-add = one MAC, counted per image at batch 1 by default:

* ``'macs'`` (default) -- conv, linear and matrix products (``mm``, ``bmm``, ``matmul``, ``addmm``, ``baddbmm``,
  ``einsum``, ``scaled_dot_product_attention`` as its two products), plus, inside a dynamic conv
  (:class:`~dynzoo.layers.dynamic.DynamicConv2dBase`) only, its context pooling (1 per input element) and its
  tensor-tensor multiplications (1 per output element: the input/output attention scalings). This is dynzoo's
  convention for a dynamic conv (static conv + GAP + attention FCs + kernel aggregation + input/output scaling;
  the FMDConv paper reports no FLOPs of its own models); for a static CNN it is the usual conv+linear MAC count
  (ResNet-18 1.814 G).
* ``'fvcore'`` -- fvcore's ``FlopCountAnalysis`` rules (AttNet's and DMF's papers count with it): conv, linear and
  matrix products as MACs, ``batch_norm`` 2 per element in eval / 5 in training mode (1 / 4 without affine),
  ``layer_norm``/``group_norm``/``instance_norm`` 5 per element (4 without affine), ``adaptive_avg_pool2d`` 1 per
  input element (and ``x.mean((2, 3))`` of a 4-D map, the same global pooling written another way, so that a
  re-implementation counts like the original); element-wise ops, activations, ``adaptive_avg_pool1d`` and other
  means are not counted.
* ``'conv_linear'`` -- conv, linear and matrix products only.

Threads: :func:`count_macs`, :func:`count_model` and :func:`count_params` are thread-safe, also while other threads
run the same model: counting reads the model's tensors and writes nothing (not its mode, hooks, layer strategies
or BatchNorm statistics, nor the process-wide default strategy), and the counting mode is a ``TorchFunctionMode``,
whose stack is per thread. Not thread-safe -- the caller serialises them against any forward of the model:
``dynzoo.set_temperature`` (it writes the temperature buffers a forward reads), assigning a layer's ``strategy``,
``dynzoo.reparameterize(model, inplace=True)``, ``model.train()`` / ``eval()``, and
:func:`dynzoo.layers.set_default_strategy`, which is process-wide state that every layer built with
``strategy='auto'`` reads. A count in training mode draws dropout / drop-path masks from torch's global generator.
"""
import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dynzoo.layers.dynamic import DynamicConv2dBase

__all__ = ['CONVENTIONS', 'FlopCount', 'count_params', 'count_macs', 'count_model', 'MacCounterMode',
           'counting_copy']

CONVENTIONS = ('macs', 'fvcore', 'conv_linear')


def _numel(t: Any) -> int:
    return t.numel() if isinstance(t, torch.Tensor) else 0


def _arg(args: Sequence[Any], kwargs: Dict[str, Any], index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _conv_macs(args, kwargs, out) -> int:
    weight = _arg(args, kwargs, 1, 'weight')
    # weight (C_out, C_in/g, *k): each output element costs C_in/g * prod(k) MACs
    return out.numel() * weight[0].numel()


def _conv_transpose_macs(args, kwargs, out) -> int:
    x = _arg(args, kwargs, 0, 'input')
    weight = _arg(args, kwargs, 1, 'weight')
    # weight (C_in, C_out/g, *k): each input element is scattered to C_out/g * prod(k) outputs
    return x.numel() * weight[0].numel()


def _linear_macs(args, kwargs, out) -> int:
    weight = _arg(args, kwargs, 1, 'weight')
    return out.numel() * weight.shape[-1]


def _matmul_macs(args, kwargs, out) -> int:
    a = _arg(args, kwargs, 0, 'input')
    return out.numel() * (a.shape[-1] if a.dim() > 0 else 1)


def _addmm_macs(args, kwargs, out) -> int:  # addmm / baddbmm / addbmm: (bias, a, b)
    a = _arg(args, kwargs, 1, 'mat1' if 'mat1' in kwargs else 'batch1')
    return out.numel() * a.shape[-1]


def _einsum_macs(args, kwargs, out) -> int:
    equation = args[0]
    operands = args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else args[1]
    lhs = equation.replace(' ', '').split('->')[0].split(',')
    sizes: Dict[str, int] = {}
    for spec, op in zip(lhs, operands):
        for ch, n in zip(spec.replace('...', ''), op.shape[-len(spec.replace('...', '')):] if spec else ()):
            sizes[ch] = max(sizes.get(ch, 1), int(n))
    total = 1
    for n in sizes.values():
        total *= n
    batch_extra = 1
    if '...' in equation:  # broadcast dims: take them from the output
        batch_extra = max(1, out.numel() // max(1, _prod_out_letters(equation, sizes)))
    return total * batch_extra


def _prod_out_letters(equation: str, sizes: Dict[str, int]) -> int:
    parts = equation.replace(' ', '').split('->')
    out_spec = parts[1] if len(parts) > 1 else ''
    total = 1
    for ch in out_spec.replace('...', ''):
        total *= sizes.get(ch, 1)
    return total


def _sdpa_macs(args, kwargs, out) -> int:
    # softmax(q k^T) v as its two matrix products: L_q*L_k*(E + E_v) per batch/head
    q = _arg(args, kwargs, 0, 'query')
    k = _arg(args, kwargs, 1, 'key')
    v = _arg(args, kwargs, 2, 'value')
    return q.numel() // q.shape[-1] * k.shape[-2] * (q.shape[-1] + v.shape[-1])


def _pool_macs(args, kwargs, out) -> int:
    return _numel(_arg(args, kwargs, 0, 'input'))


def _spatial_mean_macs(args, kwargs, out) -> int:
    # x.mean((2, 3)) of a 4-D map is global average pooling: counted like adaptive_avg_pool2d
    x = _arg(args, kwargs, 0, 'input')
    dim = _arg(args, kwargs, 1, 'dim')
    if isinstance(x, torch.Tensor) and x.dim() == 4 and isinstance(dim, (tuple, list)) and \
            sorted(d % 4 for d in dim) == [2, 3]:
        return x.numel()
    return 0


def _mul_macs(args, kwargs, out) -> int:
    a = _arg(args, kwargs, 0, 'input')
    b = _arg(args, kwargs, 1, 'other')
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.numel() > 1 and b.numel() > 1:
        return out.numel()
    return 0


def _batch_norm_fvcore(args, kwargs, out) -> int:
    x = _arg(args, kwargs, 0, 'input')
    weight = _arg(args, kwargs, 3, 'weight')
    training = bool(_arg(args, kwargs, 5, 'training', False))
    affine = weight is not None
    if training:
        return x.numel() * (5 if affine else 4)
    return x.numel() * (2 if affine else 1)


def _norm_fvcore(weight_index: int, weight_name: str) -> Callable:
    def count(args, kwargs, out) -> int:
        x = _arg(args, kwargs, 0, 'input')
        weight = _arg(args, kwargs, weight_index, weight_name)
        return x.numel() * (5 if weight is not None else 4)
    return count


_CONV_LINEAR: Dict[Callable, Callable] = {
    torch.conv1d: _conv_macs, torch.conv2d: _conv_macs, torch.conv3d: _conv_macs,
    torch.conv_transpose1d: _conv_transpose_macs, torch.conv_transpose2d: _conv_transpose_macs,
    torch.conv_transpose3d: _conv_transpose_macs,
    F.linear: _linear_macs,
    torch.mm: _matmul_macs, torch.bmm: _matmul_macs, torch.matmul: _matmul_macs,
    torch.Tensor.mm: _matmul_macs, torch.Tensor.bmm: _matmul_macs, torch.Tensor.matmul: _matmul_macs,
    torch.Tensor.__matmul__: _matmul_macs,
    torch.addmm: _addmm_macs, torch.baddbmm: _addmm_macs, torch.Tensor.addmm: _addmm_macs,
    torch.Tensor.baddbmm: _addmm_macs,
    torch.einsum: _einsum_macs,
    F.scaled_dot_product_attention: _sdpa_macs,
}

# counted only inside a dynamic conv (DynamicConv2dBase) under the 'macs' convention: its context pooling and its
# attention scalings (see the module docstring); a network's classifier pooling is not counted
_DYNAMIC_ONLY: Dict[Callable, Callable] = {
    F.adaptive_avg_pool2d: _pool_macs, F.adaptive_avg_pool1d: _pool_macs,
    torch.mean: _spatial_mean_macs, torch.Tensor.mean: _spatial_mean_macs,
    torch.mul: _mul_macs, torch.Tensor.mul: _mul_macs, torch.Tensor.__mul__: _mul_macs,
    torch.Tensor.__rmul__: _mul_macs,
}

_HANDLERS: Dict[str, Dict[Callable, Callable]] = {
    'conv_linear': dict(_CONV_LINEAR),
    'macs': dict(_CONV_LINEAR),
    'fvcore': {
        **_CONV_LINEAR,
        F.adaptive_avg_pool2d: _pool_macs, torch.mean: _spatial_mean_macs, torch.Tensor.mean: _spatial_mean_macs,
        F.batch_norm: _batch_norm_fvcore,
        F.layer_norm: _norm_fvcore(2, 'weight'),
        F.group_norm: _norm_fvcore(2, 'weight'),
        F.instance_norm: _norm_fvcore(3, 'weight'),
    },
}


class MacCounterMode(TorchFunctionMode):
    """Counts MACs of the top-level torch ops called inside the block, per convention and per op name.

    Only the outermost op is counted: while an op runs, the mode is off (``F.linear`` is not counted again as the
    ``addmm`` it calls).
    """

    def __init__(self, convention: str = 'macs'):
        super().__init__()
        if convention not in CONVENTIONS:
            raise ValueError(f'unknown convention {convention!r}; expected one of {CONVENTIONS}')
        self.convention = convention
        self.handlers = _HANDLERS[convention]
        self.by_op: Dict[str, int] = defaultdict(int)
        self.dynamic_depth = 0  # > 0 while a DynamicConv2dBase forward runs (see count_macs)

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        handler = self.handlers.get(func)
        if handler is None and self.dynamic_depth > 0 and self.convention == 'macs':
            handler = _DYNAMIC_ONLY.get(func)
        if handler is not None and isinstance(out, torch.Tensor):
            self.by_op[getattr(func, '__name__', str(func))] += int(handler(args, kwargs, out))
        return out


def counting_copy(model: nn.Module, strategy: str = 'grouped') -> nn.Module:
    """A copy of ``model`` whose dynamic convs run ``strategy``, sharing the model's parameters (no weight copy).

    Modules, buffers, hooks and attributes are the copy's own, so running it (in training mode too, which updates
    BatchNorm statistics) changes nothing that ``model`` or another thread sees. Every dynamic conv gets its own
    ``strategy``, so the process-wide default of :func:`dynzoo.layers.set_default_strategy` is not read.
    """
    memo = {id(p): p for p in model.parameters()}
    clone = copy.deepcopy(model, memo)
    for m in clone.modules():
        if isinstance(m, DynamicConv2dBase):
            m.strategy = strategy
    return clone


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (``sum(p.numel())``; buffers such as BN statistics and temperatures excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@dataclass
class FlopCount:
    """Result of :func:`count_model`: MACs per image under ``convention`` and the parameter count."""
    macs: int
    params: int
    convention: str
    input_size: Tuple[int, ...]
    by_op: Dict[str, int] = field(default_factory=dict)

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


def count_macs(
        model: nn.Module,
        input_size: Sequence[int] = (3, 224, 224),
        convention: str = 'macs',
        train_mode: bool = False,
        inputs: Optional[torch.Tensor] = None,
) -> Tuple[int, Dict[str, int]]:
    """MACs of one forward pass per image (batch 1 unless ``inputs`` is given, then divided by its batch size).

    ``train_mode=True`` counts with the model in training mode (how AttNet's official script calls fvcore; only
    the fvcore convention's BN rule depends on it). The count runs on :func:`counting_copy`: the model itself, its
    mode and its BatchNorm statistics are left as they are.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f'unknown convention {convention!r}; expected one of {CONVENTIONS}')
    if inputs is None:
        p = next(iter(model.parameters()), None)
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        device = p.device if p is not None else torch.device('cpu')
        generator = torch.Generator(device).manual_seed(0)  # not the global generator other threads draw from
        inputs = torch.randn((1,) + tuple(input_size), dtype=dtype, device=device, generator=generator)
    clone = counting_copy(model, 'grouped').train(train_mode)
    mode = MacCounterMode(convention)

    def enter(*_):
        mode.dynamic_depth += 1

    def leave(*_):
        mode.dynamic_depth -= 1

    for m in clone.modules():
        if isinstance(m, DynamicConv2dBase):
            m.register_forward_pre_hook(enter)
            m.register_forward_hook(leave)
    with torch.no_grad(), mode:
        if train_mode and inputs.shape[0] == 1:
            # BatchNorm in training mode needs more than one value per channel (attention trunks on pooled
            # context): count at batch 2 and halve
            clone(torch.cat([inputs, inputs], 0))
            batch = 2
        else:
            clone(inputs)
            batch = inputs.shape[0]
    by_op = {k: v // batch for k, v in mode.by_op.items()}
    return mode.total // batch, by_op


def count_model(
        model: nn.Module,
        input_size: Sequence[int] = (3, 224, 224),
        convention: str = 'macs',
        train_mode: bool = False,
) -> FlopCount:
    """Params and MACs per image of ``model`` at ``input_size`` under ``convention``."""
    macs, by_op = count_macs(model, input_size, convention, train_mode)
    return FlopCount(macs=macs, params=count_params(model), convention=convention,
                     input_size=tuple(input_size), by_op=by_op)
