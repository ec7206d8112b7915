#!/usr/bin/env python
"""Forward and forward+backward time of the dynamic ResNet-18s against timm's static ``resnet18``, in one run.

Every network is timed in the same process, round-robin (one timed call of each network per round, so a burst of
load from other processes hits all of them alike), and reported as the median over rounds and as a ratio to the
static ResNet-18 of the same run. ``eval`` = ``model.eval()`` forward under ``torch.inference_mode()``;
``train`` = ``model.train()`` forward + backward of ``logits.sum()`` (no optimizer step).

    python scripts/bench_dynamic_resnets.py --threads 2 --batch 8 --size 224 --rounds 5 [--markdown]

Ratios, not absolute times, are the result: absolute times depend on the machine and on what else runs on it.
"""
import argparse
import statistics
import time
from collections import OrderedDict

import torch

import timm
import dynzoo  # noqa: F401  (registers the dynzoo models)

MODELS = OrderedDict([
    ('resnet18', 'static (timm)'),
    ('a2d2c_resnet18', 'A2D2C (fused: route, one aggregated conv)'),
    ('a2d2c_plus_resnet18', 'A2D2C+ (sum: K convs, mixed)'),
    ('fmdconv_resnet18', 'FMDConv'),
    ('odconv_resnet18', 'ODConv (4x)'),
    ('dyconv_resnet18', 'DynamicConv'),
    ('condconv_resnet18', 'CondConv (8 experts)'),
])


def _time_eval(model, x) -> float:
    with torch.inference_mode():
        t = time.perf_counter()
        model(x)
        return time.perf_counter() - t


def _time_train(model, x) -> float:
    t = time.perf_counter()
    model(x).sum().backward()
    elapsed = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--rounds', type=int, default=5, help='timed calls per network and mode (median reported)')
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

    base = {mode: statistics.median(results['resnet18'][mode]) for mode in modes}
    rows = []
    for name, model in models.items():
        row = OrderedDict(model=name, method=MODELS.get(name, name),
                          params=f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M')
        for mode in modes:
            med = statistics.median(results[name][mode])
            label = 'eval fwd' if mode == 'eval' else 'train fwd+bwd'
            row[f'{label} ms'] = f'{1000 * med:.0f}'
            row[f'{label} ratio'] = f'{med / base[mode]:.2f}x'
        rows.append(row)

    print(f'torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.size}x{args.size}, '
          f'median of {args.rounds} round-robin rounds; ratio = time / static resnet18 of this run')
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
