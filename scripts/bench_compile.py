#!/usr/bin/env python
"""``torch.compile(model, dynamic=True)`` (inductor) of a dynamic network beside its static twin, in one run.

For each network: the compile time (the first call), the graphs Dynamo built over batches ``--batches`` (each a
fresh input size after the first), and the eval time of the compiled network at ``--batch`` next to the compiled
static twin's and both eager models', interleaved round by round (``dynzoo.tools.bench.interleaved_medians``).

    python scripts/bench_compile.py [--models fmdconv_resnet18] [--batch 32] [--batches 3 5] [--threads 2]
"""
import argparse
import os
import time

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # see scripts/bench_dynamic_resnets.py

import torch  # noqa: E402

import timm  # noqa: E402
import dynzoo  # noqa: E402,F401
from dynzoo.tools.bench import interleaved_medians  # noqa: E402

TWINS = {'fmdconv_resnet18': 'resnet18', 'odconv_resnet18': 'resnet18', 'attnet_t1': 'convnext_nano',
         'dmf_xxs': 'mobilenetv2_100'}


def _compiled(name: str, batch: int, size: int, batches):
    model = timm.create_model(name).eval()
    graphs = []

    def counting_inductor(gm, example_inputs):
        graphs.append(1)
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(model, dynamic=True, backend=counting_inductor)
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        t = time.perf_counter()
        y = compiled(x)
        compile_s = time.perf_counter() - t
        torch.testing.assert_close(y, model(x), rtol=1e-3, atol=1e-3)
        for b in batches:
            compiled(torch.randn(b, 3, size, size))
    return model, compiled, x, compile_s, len(graphs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', default=['fmdconv_resnet18'])
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--batches', type=int, nargs='*', default=[3, 5])
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--repeats', type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.models:
        fns = {}
        for n in (name, TWINS[name]):
            model, compiled, x, compile_s, graphs = _compiled(n, args.batch, args.size, args.batches)
            print(f'{n}: compile {compile_s:.0f} s, {graphs} graph(s) over batches {[args.batch] + args.batches}',
                  flush=True)

            def run(compiled=compiled, x=x):
                with torch.inference_mode():
                    compiled(x)
            fns[n] = run

            def run_eager(model=model, x=x):
                with torch.inference_mode():
                    model(x)
            fns[n + ' eager'] = run_eager
        t = interleaved_medians(fns, args.repeats)
        twin = TWINS[name]
        print(f'{name} compiled, eval b{args.batch}: {t[name] * 1e3:.1f} ms vs {twin} '
              f'{t[twin] * 1e3:.1f} ms = {t[name] / t[twin]:.2f}x (eager: {t[name + " eager"] * 1e3:.1f} ms vs '
              f'{t[twin + " eager"] * 1e3:.1f} ms = {t[name + " eager"] / t[twin + " eager"]:.2f}x)', flush=True)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
