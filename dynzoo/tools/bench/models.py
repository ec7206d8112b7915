"""The whole-model benchmark: each dynamic model beside its static twin and its timm counterpart.

For every dynamic model it builds the **static twin** (the same network with every dynamic conv swapped for a plain
``nn.Conv2d`` of identical geometry, :func:`static_twin`) and the timm static counterpart (``resnet18/34/50/101``,
``mobilenetv2_*``, ``convnext_nano`` for AttNet-T1, ...; skipped when it is the very same architecture as the twin),
and measures them **side by side in one run, interleaved** (every repeat times each variant once, in turn), so that
load from other processes hits all variants alike; reported times are medians over repeats.

Per variant and batch size: eval latency (``torch.inference_mode``) and train-step time (forward + cross-entropy
backward, no optimizer step; model in train mode), throughput (from the median of the chosen timer: wall clock, or
process CPU time with ``timer='cpu'``, which on a machine shared with other jobs approximates the time of an idle
machine when run with 1 thread), peak memory (:mod:`~dynzoo.tools.bench.memory`), params and MACs
(``dynzoo.utils.flops``, the ``'macs'`` convention), and the ratio to the static twin and to the timm counterpart.
Given an accuracy, the FMDConv paper's IES and RCS (``dynzoo.utils.metrics``) are computed from the measured train
throughput: ``epoch time = N / (images per second)`` with ``N`` images per epoch (default ImageNet's).
"""
import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynzoo.layers.dynamic import DynamicConv2dBase, get_default_strategy, set_default_strategy
from dynzoo.utils.flops import count_macs, count_params
from dynzoo.utils.metrics import N_IMAGENET, ies, rcs

from .memory import peak_memory
from .timing import autocast, progress, synchronize

__all__ = ['DEFAULT_MODELS', 'BenchResult', 'static_twin', 'timm_counterpart', 'run_benchmark']

DEFAULT_MODELS = ('fmdconv_resnet18', 'odconv_resnet18')

# backbone name inside a dynamic model's name -> timm static counterpart
_COUNTERPARTS = (
    ('mobilenetv2_050', 'mobilenetv2_050'), ('mobilenetv2_075', 'mobilenetv2_075'),
    ('mobilenetv2_100', 'mobilenetv2_100'), ('resnet101', 'resnet101'), ('resnet50', 'resnet50'),
    ('resnet34', 'resnet34'), ('resnet18', 'resnet18'),
)
# whole-model counterparts of similar MACs
_NAMED_COUNTERPARTS = {'attnet_t1': 'convnext_nano', 'dmf_xxs': 'mobilenetv2_100'}


def timm_counterpart(name: str) -> Optional[str]:
    """The timm static network a dynamic model is compared with (``None`` when there is no obvious one)."""
    if name in _NAMED_COUNTERPARTS:
        return _NAMED_COUNTERPARTS[name]
    parts = name.split('_')
    for suffix, static in _COUNTERPARTS:
        n = len(suffix.split('_'))
        if any('_'.join(parts[i:i + n]) == suffix for i in range(len(parts))):
            return static
    return None


class _TwinConv2d(nn.Conv2d):
    """The static stand-in of a dynamic conv: ignores the extra conditioning inputs some take (DMF's token)."""

    def forward(self, x: torch.Tensor, *conditioning) -> torch.Tensor:  # noqa: D401
        return super().forward(x)


def static_twin(model: nn.Module) -> Optional[nn.Module]:
    """A deep copy of ``model`` with every :class:`DynamicConv2dBase` replaced by a plain ``nn.Conv2d`` of the same
    geometry (no bias: in the zoo's hosts a BatchNorm follows). ``None`` if the model has no dynamic conv."""
    twin = copy.deepcopy(model)
    targets = [(n, m) for n, m in twin.named_modules() if isinstance(m, DynamicConv2dBase)]
    if not targets:
        return None
    for name, m in targets:
        w = m.weight
        conv = _TwinConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                           bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(w[0])
        parent_name, _, child = name.rpartition('.')
        parent = twin.get_submodule(parent_name) if parent_name else twin
        setattr(parent, child, conv)
    return twin


@dataclass
class BenchResult:
    """One (model variant, mode, batch size) measurement."""
    model: str
    role: str            # 'dynamic' | 'twin' | 'timm'
    group: str           # the dynamic model the row belongs to
    mode: str            # 'eval' | 'train'
    batch_size: int
    img_size: int
    strategy: str
    params: int
    macs: int            # per image, 'macs' convention
    time_ms: float       # median wall time per call
    time_min_ms: float
    cpu_ms: float        # median process CPU time per call (all threads)
    throughput: float    # images / s from the median time of the chosen timer (wall, or CPU with --timer cpu)
    peak_mem_mib: Optional[float]
    timer: str = 'wall'  # what the ratios compare: median wall time or median process CPU time
    ratio_twin: Optional[float] = None
    ratio_timm: Optional[float] = None
    top1: Optional[float] = None
    ies: Optional[float] = None
    rcs: Optional[float] = None
    times_ms: List[float] = field(default_factory=list)


class _Variant(NamedTuple):
    label: str
    role: str
    model: nn.Module
    strategy: str  # the dynamic models' execution strategy; 'n/a' for the static ones


def _variants(name: str, strategies: Sequence[str], with_timm: bool, quiet: bool) -> List[_Variant]:
    """The dynamic model (one row per strategy), its static twin and its timm counterpart."""
    import timm
    base = timm.create_model(name)
    out = [_Variant(name if len(strategies) == 1 else f'{name}[{s}]', 'dynamic', base, s) for s in strategies]
    twin = static_twin(base)
    if twin is not None:
        out.append(_Variant(f'{name}:static_twin', 'twin', twin, 'n/a'))
    static_name = timm_counterpart(name) if with_timm else None
    if static_name is not None:
        static = timm.create_model(static_name)
        # the same layers in the same order (the root classes may differ)
        same_as_twin = twin is not None and count_params(static) == count_params(twin) and \
            [type(m) for m in static.modules()][1:] == [type(m) for m in twin.modules()][1:]
        if not same_as_twin:
            out.append(_Variant(static_name, 'timm', static, 'n/a'))
        else:
            progress(f'{name}: timm {static_name} is the static twin itself; measured once', quiet)
    return out


def _eval_fn(model: nn.Module, x: torch.Tensor, amp: Optional[str] = None) -> Callable[[], None]:
    def run():
        with torch.inference_mode(), autocast(x.device, amp):
            model(x)
        synchronize(x.device)
    return run


def _train_fn(model: nn.Module, x: torch.Tensor, num_classes: int, amp: Optional[str] = None) -> Callable[[], None]:
    target = torch.randint(0, max(1, num_classes), (x.shape[0],), device=x.device)

    def run():
        model.zero_grad(set_to_none=True)
        with autocast(x.device, amp):
            out = model(x)
            if out.dim() != 2:
                out = out.flatten(1)
            loss = F.cross_entropy(out.float(), target[:out.shape[0]] % out.shape[1])
        loss.backward()
        synchronize(x.device)
    return run


def _prepare(variant: _Variant, mode: str, x: torch.Tensor, num_classes: int, amp: Optional[str],
             channels_last: bool, compile_model: bool) -> Callable[[], None]:
    model = variant.model.to(x.device)
    if channels_last:  # 4-D conv weights only (a dynamic conv's kernel bank is 5-D)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.to(memory_format=torch.channels_last)
    model.train(mode == 'train')
    run_model = torch.compile(model) if compile_model else model
    return _eval_fn(run_model, x, amp) if mode == 'eval' else _train_fn(run_model, x, num_classes, amp)


def _measure(variants: Sequence[_Variant], fns: Sequence[Callable[[], None]], device: torch.device,
             repeats: int, warmup: int, measure_memory: bool, log: Callable[[str], None]):
    """Peak memory of each variant's first warm-up call, then ``repeats`` interleaved rounds of wall and process
    CPU time (seconds); the dynamic variants run at their strategy."""
    wall: Dict[str, List[float]] = {v.label: [] for v in variants}
    cpu: Dict[str, List[float]] = {v.label: [] for v in variants}
    mem: Dict[str, Optional[float]] = {}
    for v, fn in zip(variants, fns):
        set_default_strategy(v.strategy if v.strategy != 'n/a' else 'auto')
        with peak_memory(device, measure_memory) as pm:  # the first warm-up call also measures memory
            fn()
        mem[v.label] = pm.value
        for _ in range(warmup - 1):
            fn()
    for rep in range(repeats):
        for v, fn in zip(variants, fns):
            set_default_strategy(v.strategy if v.strategy != 'n/a' else 'auto')
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[v.label].append(time.perf_counter() - t0)
            cpu[v.label].append(time.process_time() - c0)
        log(f'repeat {rep + 1}/{repeats}: ' + ', '.join(f'{k} {t[-1] * 1e3:.0f} ms' for k, t in wall.items()))
    return wall, cpu, mem


def _add_ratios(rows: Sequence[BenchResult], timer: str, accuracy: Dict[str, float], epoch_images: int) -> None:
    """Ratios to the twin / timm rows of the same setting, and IES / RCS of train rows with a known accuracy."""
    twin_row = next((r for r in rows if r.role == 'twin'), None)
    timm_row = next((r for r in rows if r.role == 'timm'), None)
    key = (lambda r: r.time_ms) if timer == 'wall' else (lambda r: r.cpu_ms)
    for r in rows:
        r.timer = timer
        if twin_row is not None:
            r.ratio_twin = key(r) / key(twin_row)
        if timm_row is not None:
            r.ratio_timm = key(r) / key(timm_row)
        top1 = accuracy.get(r.model.split('[')[0]) if r.role == 'dynamic' else accuracy.get(r.model)
        if r.mode == 'train' and top1 is not None:
            epoch_s = epoch_images / r.throughput
            r.top1, r.ies, r.rcs = top1, ies(epoch_s, top1), rcs(epoch_s, top1, epoch_images)


def run_benchmark(
        models: Sequence[str] = DEFAULT_MODELS,
        batch_sizes: Sequence[int] = (1, 32),
        train_batch_sizes: Sequence[int] = (32,),
        img_size: int = 224,
        repeats: int = 5,
        warmup: int = 1,
        threads: Optional[int] = 2,
        strategies: Sequence[str] = ('auto',),
        accuracy: Optional[Dict[str, float]] = None,
        epoch_images: int = N_IMAGENET,
        with_timm: bool = True,
        measure_memory: bool = True,
        quiet: bool = False,
        timer: str = 'wall',
        device: str = 'cpu',
        amp: Optional[str] = None,
        channels_last: bool = False,
        compile_model: bool = False,
) -> List[BenchResult]:
    """Benchmark every model of ``models`` beside its static twin and timm counterpart (module docstring)."""
    import dynzoo  # noqa: F401  (registers the models)

    if timer not in ('wall', 'cpu'):
        raise ValueError(f"timer must be 'wall' or 'cpu', got {timer!r}")
    if amp not in (None, 'bf16', 'fp16'):
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    dev = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if threads:
        torch.set_num_threads(threads)
    accuracy = dict(accuracy or {})
    results: List[BenchResult] = []
    saved_default = get_default_strategy()
    torch.manual_seed(0)
    try:
        for name in models:
            variants = _variants(name, strategies, with_timm, quiet)
            counts = {}
            for v in variants:
                if id(v.model) not in counts:
                    counts[id(v.model)] = (count_params(v.model), count_macs(v.model, (3, img_size, img_size))[0])
            num_classes = getattr(variants[0].model, 'num_classes', 1000) or 1000
            plan = [('eval', b) for b in batch_sizes] + [('train', b) for b in train_batch_sizes]
            for mode, batch in plan:
                x = torch.randn(batch, 3, img_size, img_size, device=dev).contiguous(memory_format=fmt)
                fns = [_prepare(v, mode, x, num_classes, amp, channels_last, compile_model) for v in variants]
                wall, cpu, mem = _measure(variants, fns, dev, repeats, warmup, measure_memory,
                                          lambda msg: progress(f'[{name}] {mode} b{batch} {msg}', quiet))
                rows = []
                for v in variants:
                    med = statistics.median(wall[v.label])
                    med_timer = med if timer == 'wall' else statistics.median(cpu[v.label])
                    params, macs = counts[id(v.model)]
                    rows.append(BenchResult(
                        model=v.label, role=v.role, group=name, mode=mode, batch_size=batch, img_size=img_size,
                        strategy=v.strategy, params=params, macs=macs, time_ms=med * 1e3,
                        time_min_ms=min(wall[v.label]) * 1e3, cpu_ms=statistics.median(cpu[v.label]) * 1e3,
                        throughput=batch / med_timer, peak_mem_mib=mem[v.label],
                        times_ms=[t * 1e3 for t in wall[v.label]]))
                _add_ratios(rows, timer, accuracy, epoch_images)
                results.extend(rows)
    finally:
        set_default_strategy(saved_default)
    return results
