#!/usr/bin/env python
"""The side-by-side table of ``dynzoo bench compare`` on a GPU: fp32, bf16 autocast + channels-last, compiled.

Each configuration times the compared networks (``dynzoo.tools.bench.compare``: the authors' code where
``--authors-dir`` / ``DYNZOO_AUTHORS_CODE`` holds it, dynzoo, dynzoo reparameterized, the timm static
counterpart) interleaved in one process, and each cell is a time over the static counterpart's:

* ``fp32``      -- eager, fp32, NCHW;
* ``bf16-cl``   -- eager, ``torch.autocast(dtype=bfloat16)``, channels-last inputs and 4-D conv weights;
* ``compiled``  -- ``torch.compile`` of every variant, bf16 autocast + channels-last, eval only (every batch size
  and every train step would compile again).

Prepared for one short run on a lent GPU machine: ``--budget`` seconds (default 420) bound the whole run, checked
before each network of each configuration; what the budget leaves out is listed as skipped. Writes
``OUT/gpu.json`` (device name, configurations, rows) and replaces the text between the ``gpu_benchmark.py``
markers of ``--benchmarks-md`` (BENCHMARKS.md's GPU section)::

    python scripts/gpu_benchmark.py --authors-dir /path/to/authors --out docs/benchmarks
    python scripts/gpu_benchmark.py --device cpu --quick --img-size 64 --out /tmp/gpu_smoke \
        --benchmarks-md /tmp/gpu_smoke/BENCHMARKS.md        # smoke test of the script on CPU
"""
import argparse
import json
import os
import platform
import sys
import time

import torch

from dynzoo.tools.bench.compare import AUTHORS_ENV, COMPARED, compare_markdown, run_compare
from dynzoo.tools.bench.report import environment

CONFIGS = {
    'fp32': dict(amp=None, channels_last=False, compile_model=False, eval_only=False),
    'bf16-cl': dict(amp='bf16', channels_last=True, compile_model=False, eval_only=False),
    'compiled': dict(amp='bf16', channels_last=True, compile_model=True, eval_only=True),
}
BEGIN, END = '<!-- gpu_benchmark.py:begin -->', '<!-- gpu_benchmark.py:end -->'


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)'


def replace_section(path: str, text: str) -> None:
    """Put ``text`` between the :data:`BEGIN` and :data:`END` markers of ``path``."""
    with open(path) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        raise ValueError(f'{path} has no {BEGIN} ... {END} section to fill')
    head, rest = doc.split(BEGIN, 1)
    with open(path, 'w') as f:
        f.write(head + BEGIN + '\n' + text.strip() + '\n' + END + rest.split(END, 1)[1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda')
    p.add_argument('--models', nargs='+', default=[n.model for n in COMPARED])
    p.add_argument('--configs', nargs='+', choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument('--authors-dir', default=os.environ.get(AUTHORS_ENV))
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 32])
    p.add_argument('--train-batch-sizes', type=int, nargs='*', default=[16])
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--repeats', type=int, default=10)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--quick', action='store_true', help='2 rounds, 1 warm-up, no reparameterized row')
    p.add_argument('--budget', type=float, default=420.0, help='seconds for the whole run')
    p.add_argument('--out', default='docs/benchmarks')
    p.add_argument('--benchmarks-md', default='BENCHMARKS.md', help="file whose GPU section is replaced ('' : none)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        print('gpu_benchmark.py: no CUDA device (use --device cpu for a smoke test)', file=sys.stderr)
        return 2
    start = time.perf_counter()
    repeats, warmup = (2, 1) if args.quick else (args.repeats, args.warmup)
    results, skipped = [], []
    for config in args.configs:
        c = CONFIGS[config]
        rows = []
        for name in args.models:
            if time.perf_counter() - start > args.budget:
                skipped.append(f'{config}: {name}')
                continue
            t0 = time.perf_counter()
            rows += run_compare([name], args.authors_dir, args.batch_sizes,
                                () if c['eval_only'] else args.train_batch_sizes, args.img_size, repeats, warmup,
                                threads=None, reparam=not args.quick, device=args.device, amp=c['amp'],
                                channels_last=c['channels_last'], compile_model=c['compile_model'], quiet=True)
            print(f'[{config}] {name}: {time.perf_counter() - t0:.0f} s', file=sys.stderr, flush=True)
            if c['compile_model']:
                torch._dynamo.reset()
        results.append(dict(config=config, **c, rows=rows))
    elapsed = time.perf_counter() - start
    name = device_name(device)
    md = [f'Device: **{name}**, torch {torch.__version__}, {args.img_size} px, median of {repeats} interleaved '
          f'rounds ({warmup} warm-up), time over the static counterpart\'s (lower is better); '
          f'`python scripts/gpu_benchmark.py {" ".join(argv if argv is not None else sys.argv[1:])}` '
          f'({elapsed:.0f} s, {time.strftime("%Y-%m-%d", time.gmtime())}).']
    for r in results:
        md += ['', f"### {r['config']}", '', compare_markdown(r['rows']) if r['rows'] else '(skipped: budget)']
    if skipped:
        md += ['', 'Skipped (budget): ' + ', '.join(skipped)]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, 'gpu.json')
    with open(path, 'w') as f:
        json.dump(dict(device=name, environment=environment(), elapsed_s=elapsed, skipped=skipped,
                       configs=results), f, indent=2)
    if args.benchmarks_md:
        replace_section(args.benchmarks_md, '\n'.join(md))
    print('\n'.join(md))
    print(f'\nwrote {path}' + (f', {args.benchmarks_md}' if args.benchmarks_md else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main())
