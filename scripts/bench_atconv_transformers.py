#!/usr/bin/env python
"""Throughput of ATConv-PVT / ATConv-Swin against the transformer each comes from, measured side by side.

Each pair (ATConv model in its inference form, source transformer: PVT v1 with its spatial-reduction attention on
the same host, timm's Swin) is timed with interleaved medians (every round runs each model once), eval mode,
``torch.no_grad``, random weights, at the model's Tab. II resolution. The AttNet paper's Tab. II reports 1.5-3.1x
the source's throughput on one MI-250X GPU; this measures the machine it runs on.

    python scripts/bench_atconv_transformers.py --threads 2 --batch-sizes 1 8 --pairs pvt_tiny swin_tiny
"""
import argparse
import sys

import torch

import timm

import dynzoo
from dynzoo.models.atconv_transformers import PVT_V1_CONFIGS, PyramidVisionTransformerV1
from dynzoo.tools.bench.timing import interleaved_medians, progress, synchronize

PAIRS = {
    'pvt_tiny': ('atconv_pvt_tiny', 'pvt_v1_tiny'),
    'pvt_small': ('atconv_pvt_small', 'pvt_v1_small'),
    'pvt_medium': ('atconv_pvt_medium', 'pvt_v1_medium'),
    'pvt_large': ('atconv_pvt_large', 'pvt_v1_large'),
    'swin_tiny': ('atconv_swin_tiny_224', 'swin_tiny_patch4_window7_224'),
    'swin_small': ('atconv_swin_small_224', 'swin_small_patch4_window7_224'),
    'swin_base': ('atconv_swin_base_224', 'swin_base_patch4_window7_224'),
    'swin_base_384': ('atconv_swin_base_384', 'swin_base_patch4_window12_384'),
}


def build(name: str, device: torch.device) -> torch.nn.Module:
    if name.startswith('pvt_v1_'):
        model = PyramidVisionTransformerV1(**PVT_V1_CONFIGS[name[len('pvt_v1_'):]])
    else:
        model = timm.create_model(name)
        if name.startswith('atconv_'):
            model = dynzoo.reparameterize(model, inplace=True)
    return model.eval().to(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--pairs', nargs='+', default=list(PAIRS), choices=list(PAIRS))
    p.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 8])
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--device', default='cpu')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f'# torch {torch.__version__}, timm {timm.__version__}, device {device}, threads {args.threads}, '
          f'median of {args.repeats} interleaved rounds')
    print('| pair | batch | ATConv (img/s) | source (img/s) | ratio |')
    print('|---|---|---|---|---|')
    for pair in args.pairs:
        ours, source = PAIRS[pair]
        torch.manual_seed(0)
        models = {ours: build(ours, device), source: build(source, device)}
        size = timm.get_pretrained_cfg(ours).input_size
        for batch in args.batch_sizes:
            x = torch.randn((batch,) + tuple(size), device=device)

            def call(model):
                def fn():
                    with torch.no_grad():
                        model(x)
                    synchronize(device)
                return fn

            progress(f'{pair} batch {batch}')
            t = interleaved_medians({k: call(m) for k, m in models.items()}, repeats=args.repeats)
            print(f'| {ours} vs {source} | {batch} | {batch / t[ours]:.1f} | {batch / t[source]:.1f} | '
                  f'{t[source] / t[ours]:.2f}x |', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
