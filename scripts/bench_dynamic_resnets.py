#!/usr/bin/env python
"""Forward and forward+backward time of the dynamic ResNet-18s against timm's static ``resnet18``, in one run.

Every network is timed in the same process, round-robin (one timed call of each network per round, so a burst of
load from other processes hits all of them alike), and reported as the median over rounds and as a ratio to the
static ResNet-18 of the same run. ``eval`` = ``model.eval()`` forward under ``torch.inference_mode()``;
``train`` = ``model.train()`` forward + backward of ``logits.sum()`` (no optimizer step).

Two clocks per call: wall time (``time.perf_counter``, the latency) and the CPU time of this process
(``time.process_time``, all its threads): on a machine shared with other jobs the wall clock also counts the time
the process waited for a core, the CPU clock does not, so CPU-time ratios are the contention-robust figure. Both
are reported as the minimum over rounds (noise only ever adds time). ``OMP_WAIT_POLICY`` defaults to ``PASSIVE``
(see below); export it yourself to override.

    python scripts/bench_dynamic_resnets.py --threads 2 --batch 8 --size 224 --rounds 5 [--markdown]

Ratios, not absolute times, are the result: absolute times depend on the machine and on what else runs on it.
"""
import argparse
import os
import time
from collections import OrderedDict

# OpenMP threads that busy-wait for each other are starved on a shared machine: measured here, one timm resnet18
# call took 1.6 s with the default spin policy and 40 ms with passive waiting. Set before torch loads OpenMP.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import torch  # noqa: E402

import timm  # noqa: E402
import dynzoo  # noqa: E402,F401  (registers the dynzoo models)

MODELS = OrderedDict([
    ('resnet18', 'static (timm)'),
    ('a2d2c_resnet18', 'A2D2C (fused: route, one aggregated conv)'),
    ('a2d2c_plus_resnet18', 'A2D2C+ (sum: K convs, mixed)'),
    ('fmdconv_resnet18', 'FMDConv'),
    ('odconv_resnet18', 'ODConv (4x)'),
    ('dyconv_resnet18', 'DynamicConv'),
    ('condconv_resnet18', 'CondConv (8 experts)'),
])


def _time_eval(model, x):
    with torch.inference_mode():
        t, c = time.perf_counter(), time.process_time()
        model(x)
        return time.perf_counter() - t, time.process_time() - c


def _time_train(model, x):
    t, c = time.perf_counter(), time.process_time()
    model(x).sum().backward()
    elapsed = time.perf_counter() - t, time.process_time() - c
    model.zero_grad(set_to_none=True)
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--rounds', type=int, default=5, help='timed calls per network and mode (minimum reported)')
    parser.add_argument('--models', nargs='*', default=list(MODELS), help='subset of: ' + ', '.join(MODELS))
    parser.add_argument('--no-train', action='store_true', help='skip forward+backward')
    parser.add_argument('--markdown', action='store_true', help='print a Markdown table')
    args = parser.parse_args(argv)
    if 'resnet18' not in args.models:
        args.models = ['resnet18'] + list(args.models)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    models = OrderedDict((name, timm.create_model(name)) for name in args.models)

    results = {name: {'eval': [], 'train': []} for name in models}
    modes = ['eval'] + ([] if args.no_train else ['train'])
    for mode in modes:
        for model in models.values():
            model.train(mode == 'train')
        for name, model in models.items():  # warm-up (allocator, oneDNN primitives)
            (_time_eval if mode == 'eval' else _time_train)(model, x)
        for _ in range(args.rounds):
            for name, model in models.items():
                results[name][mode].append((_time_eval if mode == 'eval' else _time_train)(model, x))

    def best(name, mode, clock):
        return min(r[clock] for r in results[name][mode])

    rows = []
    for name, model in models.items():
        row = OrderedDict(model=name, method=MODELS.get(name, name),
                          params=f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M')
        for mode in modes:
            label = 'eval' if mode == 'eval' else 'train'
            for clock, cname in ((1, 'cpu'), (0, 'wall')):
                row[f'{label} {cname}'] = f'{best(name, mode, clock) / best("resnet18", mode, clock):.2f}x'
        rows.append(row)
    static = ', '.join(
        f'{mode} {1000 * best("resnet18", mode, 0):.0f} ms wall / {1000 * best("resnet18", mode, 1):.0f} ms cpu'
        for mode in modes)

    print(f'torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.size}x{args.size}, '
          f'best of {args.rounds} round-robin rounds; ratio = time / static resnet18 of this run ({static}); '
          'eval = forward (inference_mode), train = forward + backward')
    keys = list(rows[0])
    if args.markdown:
        print('| ' + ' | '.join(keys) + ' |')
        print('|' + '|'.join('---' for _ in keys) + '|')
        for r in rows:
            print('| ' + ' | '.join(str(r[k]) for k in keys) + ' |')
    else:
        widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
        print('  '.join(k.ljust(widths[k]) for k in keys))
        for r in rows:
            print('  '.join(str(r[k]).ljust(widths[k]) for k in keys))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
