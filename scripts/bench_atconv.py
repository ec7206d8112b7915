"""Benchmark the per-sample depthwise execution strategies of ATConv on AttNet-T1 shapes.

For every stage of AttNet-T1 at 224x224 (C, H=W) = (48, 56), (96, 28), (224, 14), (384, 7) and batch 1 / 32 it
times :func:`dynzoo.layers.per_sample.per_sample_depthwise_conv2d` with each strategy (``grouped``: batch folded into
the conv groups; ``shift``: sum of the 9 shifted taps; ``gemm``: im2col + one batched matmul; ``loop``: one depthwise
conv per sample) in eval (forward under ``inference_mode``) and train (forward + backward to input and kernel),
and the whole ATConv layer with each strategy. Strategies are interleaved round-robin and the median is kept, so
the printed ratios (time / time of ``grouped``, measured side by side) are robust to a shared, noisy machine.

    python scripts/bench_atconv.py [--threads 1] [--reps 15] [--batches 1 32]
"""
import argparse

import torch

from dynzoo.tools.bench import interleaved_medians
from dynzoo.layers.atconv import ATConv2d
from dynzoo.layers.per_sample import per_sample_depthwise_conv2d

T1_SHAPES = ((48, 56), (96, 28), (224, 14), (384, 7))
STRATEGIES = ('grouped', 'shift', 'gemm', 'loop')


def _op_fn(strategy, batch, channels, size, train):
    x = torch.randn(batch, channels, size, size, requires_grad=train)
    w = torch.randn(batch, channels, 3, 3, requires_grad=train)

    def run():
        if train:
            y = per_sample_depthwise_conv2d(x, w, (1, 1), strategy)
            y.backward(torch.ones_like(y))
        else:
            with torch.inference_mode():
                per_sample_depthwise_conv2d(x, w, (1, 1), strategy)
    return run


def _layer_fn(strategy, batch, channels, size, train):
    layer = ATConv2d(channels, strategy=strategy).train(train)
    x = torch.randn(batch, channels, size, size, requires_grad=train)

    def run():
        if train:
            layer(x).sum().backward()
        else:
            with torch.inference_mode():
                layer(x)
    return run


def bench(make_fn, batch, channels, size, train, reps):
    med = interleaved_medians({s: make_fn(s, batch, channels, size, train) for s in STRATEGIES}, reps)
    return {s: med[s] / med['grouped'] for s in STRATEGIES}, med['grouped']


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--reps', type=int, default=15)
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 32])
    parser.add_argument('--no-layer', action='store_true', help='skip the whole-ATConv-layer rows')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f'torch {torch.__version__}, {args.threads} thread(s), median of {args.reps}; '
          'time / time of grouped (lower is faster)')
    header = f'{"what":6} {"mode":5} {"B":>3} {"C":>4} {"HxW":>6} ' + ' '.join(f'{s:>8}' for s in STRATEGIES) + \
        '   grouped ms'
    print(header)
    kinds = [('op', _op_fn)] + ([] if args.no_layer else [('layer', _layer_fn)])
    for what, make_fn in kinds:
        for train in (False, True):
            for batch in args.batches:
                for channels, size in T1_SHAPES:
                    ratios, base = bench(make_fn, batch, channels, size, train, args.reps)
                    print(f'{what:6} {"train" if train else "eval":5} {batch:3d} {channels:4d} {f"{size}x{size}":>6} '
                          + ' '.join(f'{ratios[s]:8.2f}' for s in STRATEGIES) + f'   {base * 1e3:9.3f}',
                          flush=True)


if __name__ == '__main__':
    main()
