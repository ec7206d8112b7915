"""Compare the two eval tile plans of the ``'tiled'`` strategy on ResNet-18's dynamic-conv layers (K = 4).

``rows first`` (:data:`~dynzoo.layers.dynamic.TILE_BYTES`, the one-thread plan) against ``samples first``
(``threads x THREAD_TILE_BYTES``, at least ``threads x THREAD_TILE_SAMPLES`` samples per tile: the multi-thread
plan), each layer at batch 32 in eval, printed as time / time of the static conv of the same shape. The variants are
interleaved round-robin and the median is kept, so the ratios are measured side by side (this machine is noisy).
The numbers in ``docs/performance.md`` ('Dispatcher') come from this script.

    python scripts/bench_tile_plan.py [--threads 1 2] [--reps 7] [--batch 32]
"""
import argparse

import torch
import torch.nn.functional as F

from dynzoo.tools.bench import interleaved_medians
from dynzoo.layers import dynamic as core

LAYERS = ((64, 56), (128, 28), (256, 14), (512, 7))  # (channels, H = W) of ResNet-18's 3x3 stage convs


def _run_tiled(x, weight, attn, budget, min_samples):
    return core.tiled_dynamic_conv2d(x, weight, attn, None, None, None, (1, 1), (1, 1), (1, 1), 1, budget,
                                     min_samples)


def bench_layer(channels, size, batch, threads, reps):
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size)
    weight = torch.randn(4, channels, channels, 3, 3) * 0.02
    attn = torch.softmax(torch.randn(batch, 4), 1)
    multi = core.tile_config(False, max(2, threads))  # the multi-thread plan, also when timed on one thread
    variants = {
        'static': lambda: F.conv2d(x, weight[0], None, 1, 1),
        'rows first': lambda: _run_tiled(x, weight, attn, core.TILE_BYTES, 1),
        'samples first': lambda: _run_tiled(x, weight, attn, *multi),
    }
    with torch.inference_mode():
        ref = core.per_sample_conv2d(x, core.aggregate_kernels(weight, attn), None, (1, 1), (1, 1), (1, 1), 1,
                                     'loop')
        for name in ('rows first', 'samples first'):
            torch.testing.assert_close(variants[name](), ref, rtol=1e-4, atol=1e-4)  # exact plans, not just fast
        med = interleaved_medians(variants, reps)
    plans = {'rows first': core.tile_plan(batch, channels, 1, channels * 9, 4, core.TILE_BYTES, 1),
             'samples first': core.tile_plan(batch, channels, 1, channels * 9, 4, *multi)}
    return med, plans


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    p.add_argument('--reps', type=int, default=7)
    p.add_argument('--batch', type=int, default=32)
    args = p.parse_args()
    print('| layer | threads | static ms | rows first (plan) | samples first (plan) |')
    print('|---|---|---|---|---|')
    for threads in args.threads:
        torch.set_num_threads(threads)
        for channels, size in LAYERS:
            med, plans = bench_layer(channels, size, args.batch, threads, args.reps)
            s = med['static']
            cells = [f"{med[k] / s:.2f}x ({plans[k][0]} rows x {plans[k][1]})" for k in ('rows first', 'samples first')]
            print(f'| {channels}->{channels}, {size}x{size} | {threads} | {s * 1e3:.1f} | ' + ' | '.join(cells) + ' |',
                  flush=True)


if __name__ == '__main__':
    main()
