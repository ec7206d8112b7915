"""The zoo benchmark (``dynzoo bench`` / ``scripts/benchmark.py``): each dynamic model beside its static counterparts.

For every dynamic model it builds the **static twin** (the same network with every dynamic conv swapped for a plain
``nn.Conv2d`` of identical geometry, :func:`static_twin`) and the timm static counterpart (``resnet18/34/50/101``,
``mobilenetv2_*``, ``convnext_nano`` for AttNet-T1, ...; skipped when it is the very same architecture as the twin),
and measures them **side by side in one run, interleaved** (every repeat times each variant once, in turn), so that
load from other processes hits all variants alike; reported times are medians over repeats.

Per variant and batch size: eval latency (``torch.inference_mode``) and train-step time (forward + cross-entropy
backward, no optimizer step; model in train mode), throughput (from the median of the chosen timer: wall clock,
or process CPU time with ``--timer cpu``, which on a machine shared with other jobs approximates the time of an
idle machine when run with 1 thread), peak memory, params and MACs (``dynzoo.utils.flops``, the
``'macs'`` convention), and the ratio to the static twin and to the timm counterpart. Given an accuracy
(``--accuracy model=top1``), the FMDConv paper's IES and RCS (``dynzoo.utils.metrics``) are computed from the measured
train throughput: ``epoch time = N / (images per second)`` with ``N`` images per epoch (default ImageNet's).

Peak memory on CPU is the process's peak resident set size during the first (untimed, warm-up) call above the resident size just
before it: free allocator pages are first returned to the OS (glibc ``malloc_trim``), then Linux's ``VmHWM`` is
reset through ``/proc/self/clear_refs`` and read after the call. It counts every allocation of the call
(activations, saved tensors, gradients, temporaries) and is ``n/a`` where the kernel does not offer the reset.

CPU allocator (``--allocator``, default ``default``): glibc serves large buffers with ``mmap`` and returns them to
the OS when freed, so every call of a CNN at batch 32 page-faults its activations in afresh; on the 2-core VM that
made the same static ResNet-18 swing between 800 and 1000 ms. ``retain`` (``mallopt``: no ``mmap``, no trimming)
keeps freed memory in the process for the next call (static ResNet-18: 660-750 ms, steadier), but it changes which
execution strategy is fastest (``docs/performance.md``) and gave outliers at batch 1 after large batch-32 runs in
the same process, so the default leaves the allocator as users have it (and as the issue's reference figures were
measured). The setting is recorded with the results; peak memory is unaffected (free pages are handed back before
each measurement).

The layer benchmark (``--layers``) times every distinct dynamic-conv geometry of a model on its real input, with
the dispatcher's choice against the per-sample loop reference and the other strategies.

Outputs: ``bench.json``, ``bench.csv``, ``bench.md`` (and ``layers.*``) and ``bench.png`` (needs matplotlib).
"""
import argparse
import contextlib
import copy
import csv
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynzoo.utils.flops import count_macs, count_params
from dynzoo.layers.dynamic import DynamicConv2dBase, get_default_strategy, set_default_strategy
from dynzoo.utils.metrics import N_IMAGENET, ies, rcs

__all__ = [
    'static_twin', 'timm_counterpart', 'BenchResult', 'run_benchmark', 'bench_layers', 'write_reports',
    'cli_main', 'DEFAULT_MODELS',
]

DEFAULT_MODELS = ('fmdconv_resnet18', 'odconv_resnet18')

# backbone name inside a dynamic model's name -> timm static counterpart
_COUNTERPARTS = (
    ('mobilenetv2_050', 'mobilenetv2_050'), ('mobilenetv2_075', 'mobilenetv2_075'),
    ('mobilenetv2_100', 'mobilenetv2_100'), ('resnet101', 'resnet101'), ('resnet50', 'resnet50'),
    ('resnet34', 'resnet34'), ('resnet18', 'resnet18'),
)
# whole-model counterparts named by the targets (similar MACs)
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


# ----------------------------------------------------------------------------------------------------------------
# timing and memory
# ----------------------------------------------------------------------------------------------------------------

def _hwm_reset_supported() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _read_status_kb(key: str) -> Optional[int]:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)
_ALLOCATOR = ['default']


def set_cpu_allocator(mode: str) -> str:
    """``'retain'``: glibc keeps freed memory for reuse (no ``mmap`` for large blocks, no automatic trimming);
    ``'default'``: leave the allocator alone. Returns the mode in force (``'default'`` where glibc is absent).
    Process-wide and not undone: meant for a benchmark process."""
    if mode not in ('retain', 'default'):
        raise ValueError(f"allocator must be 'retain' or 'default', got {mode!r}")
    if mode == 'retain':
        try:
            import ctypes
            libc = ctypes.CDLL('libc.so.6')
            if libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1:
                _ALLOCATOR[0] = 'retain'
        except (OSError, AttributeError):
            pass
    return _ALLOCATOR[0]


def _release_free_memory() -> None:
    """Hand the allocator's free pages back to the OS (glibc ``malloc_trim``), so that RSS is live memory."""
    try:
        import ctypes
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _PeakMemory:
    """Peak RSS growth (MiB) during a block, via ``VmHWM`` reset (Linux); ``value`` is None when unsupported."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and _hwm_reset_supported()
        self.value: Optional[float] = None

    def __enter__(self):
        if self.enabled:
            _release_free_memory()
            _hwm_reset_supported()
            self.base = _read_status_kb('VmRSS')
        return self

    def __exit__(self, *exc):
        if self.enabled:
            peak = _read_status_kb('VmHWM')
            if peak is not None and self.base is not None:
                self.value = max(0.0, (peak - self.base) / 1024.0)
        return False


def _autocast(device: torch.device, amp: Optional[str]):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={'bf16': torch.bfloat16, 'fp16': torch.float16}[amp])


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _eval_fn(model: nn.Module, x: torch.Tensor, amp: Optional[str] = None) -> Callable[[], None]:
    def run():
        with torch.inference_mode(), _autocast(x.device, amp):
            model(x)
        _sync(x.device)
    return run


def _train_fn(model: nn.Module, x: torch.Tensor, num_classes: int, amp: Optional[str] = None) -> Callable[[], None]:
    target = torch.randint(0, max(1, num_classes), (x.shape[0],), device=x.device)

    def run():
        model.zero_grad(set_to_none=True)
        with _autocast(x.device, amp):
            out = model(x)
            if out.dim() != 2:
                out = out.flatten(1)
            loss = F.cross_entropy(out.float(), target[:out.shape[0]] % out.shape[1])
        loss.backward()
        _sync(x.device)
    return run


class _CudaPeakMemory:
    """Peak CUDA memory allocated during the block above what was allocated before it (MiB)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.value: Optional[float] = None

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)
        self.value = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2 ** 20
        return False


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


def interleaved_medians(
        fns: Dict[str, Callable[[], object]],
        repeats: int,
        warmup: int = 1,
        clock: Callable[[], float] = time.perf_counter,
) -> Dict[str, float]:
    """Median seconds per call of each function, the calls interleaved round by round (every round calls each
    function once, in turn), so that load from other processes hits all of them alike. For the scripts under
    ``scripts/`` that time variants side by side."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _progress(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


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
    """Benchmark every model of ``models`` beside its static twin and timm counterpart; see the module docstring."""
    import timm  # local: dynzoo.tools.bench is imported by the CLI, keep its import light
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
            variants: List[Tuple[str, str, nn.Module, str]] = []  # (label, role, model, strategy)
            base = timm.create_model(name)
            for strategy in strategies:
                label = name if len(strategies) == 1 else f'{name}[{strategy}]'
                variants.append((label, 'dynamic', base, strategy))
            twin = static_twin(base)
            if twin is not None:
                variants.append((f'{name}:static_twin', 'twin', twin, 'n/a'))
            static_name = timm_counterpart(name) if with_timm else None
            if static_name is not None:
                static = timm.create_model(static_name)
                # the same layers in the same order (the root classes differ: timm ResNet vs dynzoo's host)
                same_as_twin = twin is not None and count_params(static) == count_params(twin) and \
                    [type(m) for m in static.modules()][1:] == [type(m) for m in twin.modules()][1:]
                if not same_as_twin:
                    variants.append((static_name, 'timm', static, 'n/a'))
                else:
                    _progress(f'{name}: timm {static_name} is the static twin itself; measured once', quiet)
            counts = {}
            for label, role, model, _ in variants:
                if id(model) not in counts:
                    counts[id(model)] = (count_params(model), count_macs(model, (3, img_size, img_size))[0])
            num_classes = getattr(base, 'num_classes', 1000) or 1000
            plan = [('eval', b) for b in batch_sizes] + [('train', b) for b in train_batch_sizes]
            for mode, batch in plan:
                x = torch.randn(batch, 3, img_size, img_size, device=dev).contiguous(memory_format=fmt)
                fns = []
                for label, role, model, strategy in variants:
                    model.to(dev)
                    if channels_last:  # 4-D conv weights only (a dynamic conv's kernel bank is 5-D)
                        for m in model.modules():
                            if isinstance(m, nn.Conv2d):
                                m.to(memory_format=torch.channels_last)
                    model.train(mode == 'train')
                    run_model = torch.compile(model) if compile_model else model
                    fn = _eval_fn(run_model, x, amp) if mode == 'eval' else _train_fn(run_model, x, num_classes, amp)
                    fns.append((label, role, model, strategy, fn))
                wall: Dict[str, List[float]] = {f[0]: [] for f in fns}
                cpu: Dict[str, List[float]] = {f[0]: [] for f in fns}
                mem: Dict[str, Optional[float]] = {}
                for label, role, model, strategy, fn in fns:
                    set_default_strategy(strategy if strategy != 'n/a' else 'auto')
                    pm_ctx = _CudaPeakMemory(dev) if dev.type == 'cuda' else _PeakMemory(measure_memory)
                    with pm_ctx as pm:  # the first warm-up call also measures memory
                        fn()
                    mem[label] = pm.value
                    for _ in range(warmup - 1):
                        fn()
                for rep in range(repeats):
                    for label, role, model, strategy, fn in fns:
                        set_default_strategy(strategy if strategy != 'n/a' else 'auto')
                        t0, c0 = time.perf_counter(), time.process_time()
                        fn()
                        wall[label].append(time.perf_counter() - t0)
                        cpu[label].append(time.process_time() - c0)
                    _progress(f'[{name}] {mode} b{batch} repeat {rep + 1}/{repeats}: ' + ', '.join(
                        f'{lbl} {wall[lbl][-1] * 1e3:.0f} ms' for lbl in wall), quiet)
                rows = {}
                for label, role, model, strategy, fn in fns:
                    med = statistics.median(wall[label])
                    med_timer = med if timer == 'wall' else statistics.median(cpu[label])
                    params, macs = counts[id(model)]
                    rows[label] = BenchResult(
                        model=label, role=role, group=name, mode=mode, batch_size=batch, img_size=img_size,
                        strategy=strategy, params=params, macs=macs, time_ms=med * 1e3,
                        time_min_ms=min(wall[label]) * 1e3, cpu_ms=statistics.median(cpu[label]) * 1e3,
                        throughput=batch / med_timer, peak_mem_mib=mem[label],
                        times_ms=[t * 1e3 for t in wall[label]])
                twin_row = next((r for r in rows.values() if r.role == 'twin'), None)
                timm_row = next((r for r in rows.values() if r.role == 'timm'), None)
                key = (lambda r: r.time_ms) if timer == 'wall' else (lambda r: r.cpu_ms)
                for r in rows.values():
                    r.timer = timer
                    if twin_row is not None:
                        r.ratio_twin = key(r) / key(twin_row)
                    if timm_row is not None:
                        r.ratio_timm = key(r) / key(timm_row)
                    top1 = accuracy.get(r.model.split('[')[0]) if r.role == 'dynamic' else accuracy.get(r.model)
                    if mode == 'train' and top1 is not None:
                        epoch_s = epoch_images / r.throughput
                        r.top1, r.ies, r.rcs = top1, ies(epoch_s, top1), rcs(epoch_s, top1, epoch_images)
                results.extend(rows.values())
    finally:
        set_default_strategy(saved_default)
    return results


# ----------------------------------------------------------------------------------------------------------------
# layer benchmark
# ----------------------------------------------------------------------------------------------------------------

def bench_layers(
        name: str,
        batch_size: int = 32,
        img_size: int = 224,
        repeats: int = 5,
        strategies: Sequence[str] = ('auto', 'loop', 'grouped', 'tiled', 'dense'),
        threads: Optional[int] = 2,
        quiet: bool = False,
        timer: str = 'wall',
) -> List[dict]:
    """Eval time of each distinct dynamic-conv geometry of ``name`` on its real input, per strategy (interleaved,
    median), with the static conv of the same geometry; ``speedup_vs_loop`` is loop time / dispatched time."""
    import timm
    import dynzoo  # noqa: F401
    from dynzoo.layers.dynamic import select_strategy, _out_size

    if threads:
        torch.set_num_threads(threads)
    clock = time.perf_counter if timer == 'wall' else time.process_time
    model = timm.create_model(name).eval()
    captured: Dict[tuple, Tuple[nn.Module, torch.Tensor]] = {}
    hooks = []
    for m in model.modules():
        if isinstance(m, DynamicConv2dBase):
            def hook(mod, inp, key=None):
                k = (mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.groups, inp[0].shape[-2:])
                if k not in captured:
                    captured[k] = (mod, inp[0].detach().clone())
            hooks.append(m.register_forward_pre_hook(hook))
    with torch.inference_mode():
        model(torch.randn(batch_size, 3, img_size, img_size))
    for h in hooks:
        h.remove()
    rows = []
    for i, (key, (mod, x)) in enumerate(captured.items()):
        static = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                           mod.dilation, mod.groups, bias=False)
        out_hw = (_out_size(x.shape[-2], mod.kernel_size[0], mod.stride[0], mod.padding[0], mod.dilation[0]),
                  _out_size(x.shape[-1], mod.kernel_size[1], mod.stride[1], mod.padding[1], mod.dilation[1]))
        chosen = select_strategy(x.shape[0], mod.in_channels, mod.out_channels, mod.kernel_size, mod.groups,
                                 mod.num_kernels, out_hw, False, False)
        saved = mod.strategy

        def run_with(strategy, mod=mod, x=x):
            def run():
                mod.strategy = strategy
                return mod(x)
            return run

        variants = {'static': lambda static=static, x=x: static(x)}
        variants.update({s: run_with(s) for s in strategies})
        try:
            with torch.inference_mode():
                med = {s: t * 1e3 for s, t in interleaved_medians(variants, repeats, warmup=0, clock=clock).items()}
        finally:
            mod.strategy = saved
        row = dict(model=name, layer=f'{mod.in_channels}->{mod.out_channels} k{mod.kernel_size[0]} '
                                     f's{mod.stride[0]} g{mod.groups} @{x.shape[-2]}x{x.shape[-1]}',
                   batch_size=batch_size, dispatched=chosen, static_ms=med['static'],
                   **{f'{s}_ms': med[s] for s in strategies})
        if 'loop' in med and 'auto' in med:
            row['speedup_vs_loop'] = med['loop'] / med['auto']
        row['auto_vs_static'] = med['auto'] / med['static'] if 'auto' in med else None
        rows.append(row)
        _progress(f'[layers {name}] {i + 1}/{len(captured)} {row["layer"]}: dispatched {chosen}, '
                  f'{row.get("speedup_vs_loop", float("nan")):.2f}x faster than loop', quiet)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# reports
# ----------------------------------------------------------------------------------------------------------------

def _fmt(v, digits=2) -> str:
    if v is None:
        return 'n/a'
    if isinstance(v, float):
        return f'{v:.{digits}f}'
    return str(v)


def environment() -> dict:
    return dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                cuda_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none',
                processor=platform.processor() or 'n/a', threads=torch.get_num_threads(),
                cpu_count=os.cpu_count(), allocator=_ALLOCATOR[0],
                date=time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))


def markdown_table(results: Sequence[BenchResult]) -> str:
    head = ('| model | role | mode | batch | wall ms (median) | CPU ms (median) | img/s | x twin | x timm '
            '| peak mem (MiB) | params (M) | GMACs | IES | RCS |')
    lines = [head, '|' + '---|' * 14]
    for r in results:
        lines.append(
            f'| {r.model} | {r.role} | {r.mode} | {r.batch_size} | {r.time_ms:.1f} | {r.cpu_ms:.1f} | '
            f'{r.throughput:.1f} | '
            f'{_fmt(r.ratio_twin)} | {_fmt(r.ratio_timm)} | {_fmt(r.peak_mem_mib, 0)} | {r.params / 1e6:.2f} | '
            f'{r.macs / 1e9:.3f} | {_fmt(r.ies)} | {_fmt(r.rcs)} |')
    return '\n'.join(lines)


def layers_markdown(rows: Sequence[dict]) -> str:
    if not rows:
        return ''
    strat_cols = [k for k in rows[0] if k.endswith('_ms') and k != 'static_ms']
    head = '| model | layer | batch | dispatched | static ms | ' + ' | '.join(strat_cols) + \
        ' | dispatched / static | loop / dispatched |'
    lines = [head, '|' + '---|' * (6 + len(strat_cols) + 1)]
    for r in rows:
        lines.append(f'| {r["model"]} | {r["layer"]} | {r["batch_size"]} | {r["dispatched"]} | {r["static_ms"]:.2f} | '
                     + ' | '.join(f'{r[c]:.2f}' for c in strat_cols)
                     + f' | {_fmt(r.get("auto_vs_static"))} | {_fmt(r.get("speedup_vs_loop"))} |')
    return '\n'.join(lines)


def plot(results: Sequence[BenchResult], path: str) -> Optional[str]:
    """Bar chart of time relative to the static twin per model and setting; ``None`` if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in results if r.role != 'twin' and r.ratio_twin is not None]
    if not rows:
        return None
    settings = sorted({(r.mode, r.batch_size) for r in rows})
    labels = sorted({r.model for r in rows}, key=lambda m: [r.model for r in rows].index(m))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels) * len(settings) / 2), 4))
    width = 0.8 / max(1, len(settings))
    for i, (mode, batch) in enumerate(settings):
        vals = []
        for lbl in labels:
            r = next((r for r in rows if r.model == lbl and r.mode == mode and r.batch_size == batch), None)
            vals.append(r.ratio_twin if r is not None else 0.0)
        ax.bar([j + i * width for j in range(len(labels))], vals, width, label=f'{mode} b{batch}')
    ax.axhline(1.0, color='k', lw=0.8)
    ax.set_xticks([j + width * (len(settings) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=20, ha='right', fontsize=8)
    ax.set_ylabel('time / static twin')
    ax.set_title('dynzoo bench: time relative to the static twin (lower is better)')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(results: Sequence[BenchResult], out_dir: str, layer_rows: Sequence[dict] = (),
                  command: str = '') -> Dict[str, str]:
    """Write ``bench.{json,csv,md,png}`` (and ``layers.{json,md}``) into ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    env = environment()
    with open(os.path.join(out_dir, 'bench.json'), 'w') as f:
        json.dump(dict(environment=env, command=command, results=[asdict(r) for r in results],
                       layers=list(layer_rows)), f, indent=2)
    paths['json'] = os.path.join(out_dir, 'bench.json')
    if results:
        with open(os.path.join(out_dir, 'bench.csv'), 'w', newline='') as f:
            cols = [k for k in asdict(results[0]) if k != 'times_ms']
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in results:
                d = asdict(r)
                d.pop('times_ms')
                w.writerow(d)
        paths['csv'] = os.path.join(out_dir, 'bench.csv')
    md = ['# dynzoo bench\n', f'`{command}`\n' if command else '',
          'Environment: ' + ', '.join(f'{k} {v}' for k, v in env.items()) + '\n',
          'Times are medians of interleaved repeats; `x twin` / `x timm` are ratios of median '
          f'{"wall" if not results or results[0].timer == "wall" else "process CPU"} time to the static '
          'twin / timm counterpart measured in the same run. Peak memory: peak RSS growth during one call (Linux '
          'VmHWM). MACs per image (`dynzoo.utils.flops`, convention `macs`).\n',
          markdown_table(results) if results else '']
    if layer_rows:
        md += ['\n## Layers (eval)\n', layers_markdown(layer_rows)]
    with open(os.path.join(out_dir, 'bench.md'), 'w') as f:
        f.write('\n'.join(md) + '\n')
    paths['md'] = os.path.join(out_dir, 'bench.md')
    png = plot(results, os.path.join(out_dir, 'bench.png'))
    if png:
        paths['png'] = png
    return paths


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def _parse_accuracy(items: Sequence[str]) -> Dict[str, float]:
    out = {}
    for item in items:
        if '=' not in item:
            raise argparse.ArgumentTypeError(f'--accuracy expects MODEL=TOP1, got {item!r}')
        k, v = item.split('=', 1)
        out[k] = float(v)
    return out


def build_parser(prog: str = 'dynzoo bench') -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split('\n\n')[0])
    p.add_argument('models', nargs='*', default=list(DEFAULT_MODELS), help='dynamic models (default: %(default)s)')
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 32], help='eval batch sizes')
    p.add_argument('--train-batch-sizes', type=int, nargs='*', default=[32], help='train-step batch sizes')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--timer', choices=('wall', 'cpu'), default='wall',
                   help='what the ratios compare: median wall time, or median process CPU time (steadier on a '
                        'machine shared with other jobs; use it with --threads 1)')
    p.add_argument('--strategies', nargs='+', default=['auto'],
                   help='execution strategies of the dynamic models (each one a row)')
    p.add_argument('--accuracy', nargs='*', default=[], metavar='MODEL=TOP1',
                   help='top-1 (%%) per model, for IES / RCS')
    p.add_argument('--epoch-images', type=int, default=N_IMAGENET, help='images per epoch for IES / RCS')
    p.add_argument('--no-timm', action='store_true', help='skip the timm static counterparts')
    p.add_argument('--no-memory', action='store_true', help='skip peak-memory measurement')
    p.add_argument('--layers', nargs='*', default=None, metavar='MODEL',
                   help='also run the layer benchmark on these models (no name: the first model)')
    p.add_argument('--layer-batch-size', type=int, default=32)
    p.add_argument('--layers-only', action='store_true', help='run the layer benchmark only (implies --layers)')
    p.add_argument('--out', default='bench_out', help='output directory')
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (peak memory: max_memory_allocated)")
    p.add_argument('--amp', choices=('bf16', 'fp16'), default=None, help='autocast dtype (default: fp32)')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--compile', action='store_true', help='torch.compile every model')
    p.add_argument('--allocator', choices=('default', 'retain'), default='default',
                   help="CPU allocator: leave glibc as it is, or 'retain' freed memory for reuse (steadier static "
                        "timings; see the module docstring)")
    p.add_argument('--quiet', action='store_true')
    return p


def cli_main(argv: Optional[Sequence[str]] = None, prog: str = 'dynzoo bench') -> int:
    args = build_parser(prog).parse_args(list(argv) if argv is not None else None)
    if args.layers_only and args.layers is None:
        args.layers = []
    if args.device == 'cpu':
        set_cpu_allocator(args.allocator)
    results = [] if args.layers_only else run_benchmark(
        args.models, args.batch_sizes, args.train_batch_sizes, args.img_size, args.repeats, args.warmup,
        args.threads, args.strategies, _parse_accuracy(args.accuracy), args.epoch_images,
        with_timm=not args.no_timm, measure_memory=not args.no_memory, quiet=args.quiet, timer=args.timer,
        device=args.device, amp=args.amp, channels_last=args.channels_last, compile_model=args.compile)
    layer_rows: List[dict] = []
    if args.layers is not None:
        for name in (args.layers or args.models[:1]):
            layer_rows += bench_layers(name, args.layer_batch_size, args.img_size, args.repeats,
                                       threads=args.threads, quiet=args.quiet, timer=args.timer)
    command = prog + ' ' + ' '.join(argv if argv is not None else sys.argv[1:])
    paths = write_reports(results, args.out, layer_rows, command)
    if results:
        print(markdown_table(results))
    if layer_rows:
        print()
        print(layers_markdown(layer_rows))
    print('\nwrote ' + ', '.join(paths.values()))
    return 0


if __name__ == '__main__':
    sys.exit(cli_main())
