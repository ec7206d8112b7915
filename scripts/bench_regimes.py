#!/usr/bin/env python
"""Where the time goes, per family and regime, and the batch-1 floor of the exact form.

1. Memory bandwidth of this machine: a read-only pass (``sum``) and a copy over a buffer far larger than the L3.
2. For each network (FMDConv / ODConv-4x ResNet-18, AttNet-T1, DMF-XXS; 224 px) the bytes of every dynamic layer's
   kernel bank (``K`` kernels + static kernel) and of the whole model's parameters, and the batch-1 floor of the
   exact form: the bank read once per forward at the measured read bandwidth.
3. ``torch.profiler`` self CPU time by op category in each regime (eval b1, eval b32, train b16 fwd+bwd), for the
   network and its static twin side by side (the same regime, the same process).

    python scripts/bench_regimes.py [--threads 2] [--models fmdconv_resnet18 ...] [--regimes eval1 eval32 train16]

Ratios and shares, not absolute times, are the result: the machine is shared.
"""
import argparse
import os
import time
from collections import defaultdict
from typing import Dict

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # see scripts/bench_dynamic_resnets.py

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import timm  # noqa: E402
import dynzoo  # noqa: E402,F401
from dynzoo.layers.dynamic import DynamicConv2dBase  # noqa: E402
from dynzoo.tools.bench import interleaved_medians  # noqa: E402

TWINS = {
    'fmdconv_resnet18': 'resnet18',
    'odconv_resnet18': 'resnet18',
    'attnet_t1': 'convnext_nano',
    'dmf_xxs': 'mobilenetv2_100',
}
REGIMES = {'eval1': (False, 1), 'eval32': (False, 32), 'train16': (True, 16)}

# op name fragments -> category (first match wins)
CATEGORIES = (
    ('conv', ('conv', 'mkldnn_convolution')),
    ('matmul', ('mm', 'matmul', 'linear', 'addmm', 'baddbmm')),
    ('norm', ('batch_norm', 'layer_norm', 'native_batch_norm', 'group_norm')),
    ('copy / layout', ('copy_', 'cat', 'clone', 'contiguous', 'stack', 'pad', 'constant_pad', 'index', 'slice')),
    ('alloc', ('empty', 'zeros', 'ones', 'fill_', 'resize')),
    ('pool / reduce', ('pool', 'mean', 'sum')),
    ('elementwise', ('mul', 'add', 'sub', 'div', 'sigmoid', 'softmax', 'relu', 'gelu', 'hardtanh', 'clamp',
                     'threshold', 'tanh', 'exp', 'where')),
)


def memory_bandwidth(mib: int = 512, repeats: int = 7) -> Dict[str, float]:
    """GB/s of a read-only pass (``sum``) and of a copy (read + write) over ``mib`` MiB of fp32: the fastest of
    ``repeats`` passes (the bandwidth the machine reaches; other jobs only ever slow a pass down)."""
    src = torch.ones(mib * 1024 * 1024 // 4)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    best = {'read': float('inf'), 'copy': float('inf')}
    for _ in range(repeats):
        for name, fn in (('read', lambda: src.sum()), ('copy', lambda: dst.copy_(src))):
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {'read': nbytes / best['read'] / 1e9, 'copy': 2 * nbytes / best['copy'] / 1e9}


def bank_bytes(model: nn.Module) -> int:
    """Bytes of every dynamic layer's kernel bank (``K`` kernels and the static kernel), fp32."""
    total = 0
    for m in model.modules():
        if isinstance(m, DynamicConv2dBase):
            total += m.weight.numel() * m.weight.element_size()
            if m.static_weight is not None:
                total += m.static_weight.numel() * m.static_weight.element_size()
    return total


def _category(name: str) -> str:
    name = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return 'other'


def _step(model: nn.Module, x: torch.Tensor, train: bool):
    if train:
        model(x).sum().backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.inference_mode():
            model(x)


def profile_categories(model: nn.Module, x: torch.Tensor, train: bool, steps: int = 2) -> Dict[str, float]:
    """Self CPU milliseconds per step by op category (top-level and nested aten ops, self time only)."""
    _step(model, x, train)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            _step(model, x, train)
    cats: Dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        cats[_category(evt.key)] += evt.self_cpu_time_total / 1e3 / steps
    return dict(cats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--models', nargs='+', default=list(TWINS))
    p.add_argument('--regimes', nargs='+', default=list(REGIMES), choices=list(REGIMES))
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--size', type=int, default=224)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    bw = memory_bandwidth()
    print(f'memory bandwidth: read {bw["read"]:.1f} GB/s, copy (read+write) {bw["copy"]:.1f} GB/s')
    for name in args.models:
        model = timm.create_model(name, num_classes=1000)
        twin = timm.create_model(TWINS[name], num_classes=1000)
        bank = bank_bytes(model)
        params = sum(t.numel() * t.element_size() for t in model.parameters())
        twin_params = sum(t.numel() * t.element_size() for t in twin.parameters())
        floor_ms = bank / (bw['read'] * 1e9) * 1e3
        print(f'\n## {name} (twin {TWINS[name]}): bank {bank / 2**20:.1f} MiB, params {params / 2**20:.1f} MiB '
              f'(twin {twin_params / 2**20:.1f} MiB); b1 floor of reading the bank {floor_ms:.2f} ms')
        for regime in args.regimes:
            train, batch = REGIMES[regime]
            x = torch.randn(batch, 3, args.size, args.size)
            model.train(train)
            twin.train(train)
            t = interleaved_medians({'dyn': lambda: _step(model, x, train), 'twin': lambda: _step(twin, x, train)},
                                    args.repeats)
            cats = profile_categories(model, x, train)
            twin_cats = profile_categories(twin, x, train)
            line = ', '.join(f'{k} {v:.1f}/{twin_cats.get(k, 0.):.1f}' for k, v in
                             sorted(cats.items(), key=lambda kv: -kv[1]) if v >= 0.05 * sum(cats.values()))
            extra = f'; floor {floor_ms:.2f} ms = {floor_ms / (t["dyn"] * 1e3):.0%} of the step' if batch == 1 and \
                not train else ''
            print(f'{regime}: {t["dyn"] * 1e3:.1f} ms vs twin {t["twin"] * 1e3:.1f} ms = '
                  f'{t["dyn"] / t["twin"]:.2f}x{extra}; self CPU ms/step dyn/twin: {line}', flush=True)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
