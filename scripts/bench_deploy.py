#!/usr/bin/env python
"""CPU deployment benchmark: training form vs ``dynzoo.reparameterize`` vs onnxruntime, in one run.

For each model: eval latency at batch 1 (median ms) and throughput at batch 32 (images/s), for

* ``train form``  -- ``timm.create_model(name).eval()`` under ``torch.inference_mode()``;
* ``reparam``     -- ``dynzoo.reparameterize(model)``, same PyTorch runtime;
* ``onnxruntime`` -- the reparameterized model exported with a dynamic batch axis (``dynzoo.tools.export.export_onnx``),
  run by onnxruntime's CPU provider with the same thread count;
* ``openvino``    -- the same ONNX file compiled by OpenVINO for its CPU device, fp32, same thread count.

The forms are timed round-robin (one call of each per round), so load from other processes hits them
alike; every figure in the table is a ratio to the training form of the same model in the same run. Outputs of the
three forms are compared too (``max|diff|`` relative to ``max(1, max|logits|)``), beside the model's own fp32
rounding floor (``max|fp32 - fp64|`` of the training form, same scale): a randomly initialised dynamic network can
amplify rounding so much that no fp32 form agrees better than that floor (``tests/test_reparam.py`` asserts
exactness in float64 for those).

No trained weights exist for most models, so each model's BatchNorm statistics are first calibrated on random
batches (:func:`calibrate_norms`). A fresh model evaluated with BN's initial statistics (mean 0, variance 1) can
blow its activations up layer after layer (the dynamic MobileNetV2s at temperature 1 reach logits of 1e30): the
reparameterized outputs then compare meaninglessly, and subnormal or infinite values distort the timings.

Usage::

    python scripts/bench_deploy.py                       # one model per family, 160x160, 2 threads
    python scripts/bench_deploy.py --models fmdconv_resnet18 --img-size 224 --markdown
"""
import argparse
import copy
import os
import sys
import tempfile
import time
import warnings

import torch

import timm

import dynzoo
from dynzoo.layers.fusion import is_batchnorm
from dynzoo.tools.bench import interleaved_medians
from dynzoo.tools.export import export_onnx, runtime_runner

DEFAULT_SMALL_HINTS = ('mobilenetv2_050', 'xxs', 'cspdarknet_n', 'resnet18', 't1', 'xs')


def one_per_family():
    from dynzoo.models import MODEL_INFO

    def rank(name):
        return next((i for i, h in enumerate(DEFAULT_SMALL_HINTS) if h in name), len(DEFAULT_SMALL_HINTS)), name
    best = {}
    for name in dynzoo.list_dynzoo_models():
        fam = MODEL_INFO[name]['family']
        if fam not in best or rank(name) < rank(best[fam]):
            best[fam] = name
    return sorted(best.values())


@torch.no_grad()
def calibrate_norms(model, size, batches=2, batch_size=8):
    """Set every BatchNorm's running statistics to those of ``batches`` random batches (cumulative average), so
    the eval-mode activations keep the scale they have in training mode; returns the model in eval mode."""
    norms = [m for m in model.modules() if is_batchnorm(m)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for _ in range(batches):
        model(torch.randn((batch_size,) + size))
    return model.eval()


def bench_model(name, img_size, threads, rounds1, rounds32, batch, tmpdir, openvino=True):
    torch.manual_seed(0)
    model = timm.create_model(name)
    cfg_size = model.pretrained_cfg['input_size']
    size = (cfg_size[0], img_size, img_size)
    calibrate_norms(model, size)
    fused = dynzoo.reparameterize(model)
    path = os.path.join(tmpdir, f'{name}.onnx')
    t0 = time.perf_counter()
    export_onnx(fused, path, size, batch_size=2, exporter='torchscript')
    export_s = time.perf_counter() - t0
    runtimes = {'ort': runtime_runner(path, 'onnxruntime', threads)}
    if openvino:
        runtimes['ov'] = runtime_runner(path, 'openvino', threads)

    row = {'model': name}
    for b, rounds in ((1, rounds1), (batch, rounds32)):
        x = torch.randn((b,) + size)
        xn = x.numpy()

        def run_train():
            with torch.inference_mode():
                return model(x)

        def run_fused():
            with torch.inference_mode():
                return fused(x)

        ref = run_train()
        scale = max(1.0, float(ref.abs().max()))
        row[f'diff_reparam_b{b}'] = float((run_fused() - ref).abs().max()) / scale
        for form, run in runtimes.items():
            row[f'diff_{form}_b{b}'] = float((torch.from_numpy(run(xn)) - ref).abs().max()) / scale
        with torch.inference_mode():
            ref64 = copy.deepcopy(model).double()(x.double())
        row[f'floor_b{b}'] = float((ref.double() - ref64).abs().max()) / scale
        fns = {'train': run_train, 'fused': run_fused}
        fns.update({form: (lambda run=run: run(xn)) for form, run in runtimes.items()})
        med = interleaved_medians(fns, rounds)
        row.update({f't_{form}_b{b}': t for form, t in med.items()})
    row['export_s'] = export_s
    return row


def format_rows(rows, batch, markdown=True):
    ov = any('t_ov_b1' in r for r in rows)
    cols = ['model', 'b1 train ms', 'b1 reparam', 'b1 onnxrt'] + (['b1 openvino'] if ov else []) + [
        f'b{batch} train img/s', f'b{batch} reparam', f'b{batch} onnxrt'] + ([f'b{batch} openvino'] if ov else []) + [
        f'b{batch} onnxrt / reparam', 'max rel diff', 'fp32 floor']
    lines = []
    if markdown:
        lines.append('| ' + ' | '.join(cols) + ' |')
        lines.append('|' + '|'.join(['---'] * len(cols)) + '|')
    for r in rows:
        if 'error' in r:
            lines.append(f"| {r['model']} | error: {r['error']} |" + ' |' * (len(cols) - 2))
            continue
        diff = max(r[k] for k in r if k.startswith('diff_'))
        forms = ['fused', 'ort'] + (['ov'] if ov else [])
        cells = [r['model'], f"{1000 * r['t_train_b1']:.1f}"]
        cells += [f"{r['t_train_b1'] / r[f't_{form}_b1']:.2f}x" for form in forms]
        cells.append(f"{batch / r[f't_train_b{batch}']:.1f}")
        cells += [f"{r[f't_train_b{batch}'] / r[f't_{form}_b{batch}']:.2f}x" for form in forms]
        cells += [
            f"{r[f't_fused_b{batch}'] / r[f't_ort_b{batch}']:.2f}x",
            f'{diff:.1e}',
            f"{max(r[k] for k in r if k.startswith('floor_')):.1e}",
        ]
        lines.append(('| ' + ' | '.join(cells) + ' |') if markdown else '  '.join(cells))
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='*', default=None, help='default: the smallest model of each family')
    parser.add_argument('--all', action='store_true', help='every registered model')
    parser.add_argument('--img-size', type=int, default=160)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--rounds1', type=int, default=15, help='timed rounds at batch 1')
    parser.add_argument('--rounds32', type=int, default=3, help='timed rounds at the large batch')
    parser.add_argument('--markdown', action='store_true')
    parser.add_argument('--no-openvino', action='store_true', help='onnxruntime only')
    args = parser.parse_args(argv)
    warnings.filterwarnings('ignore')
    torch.set_num_threads(args.threads)
    names = dynzoo.list_dynzoo_models() if args.all else (args.models or one_per_family())
    print(f'# torch {torch.__version__}, timm {timm.__version__}, {args.threads} threads, '
          f'{args.img_size}x{args.img_size}, batch 1 / {args.batch}; speed-ups are ratios to the training form '
          f'(latency at batch 1, throughput at batch {args.batch})', flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for name in names:
            try:
                row = bench_model(name, args.img_size, args.threads, args.rounds1, args.rounds32, args.batch, tmpdir,
                                  openvino=not args.no_openvino)
            except Exception as e:  # keep going; the table says which model failed and why
                row = {'model': name, 'error': f'{type(e).__name__}: {str(e)[:120]}'}
            rows.append(row)
            print(format_rows([row], args.batch, markdown=False), flush=True)
    print()
    print(format_rows(rows, args.batch, markdown=True if args.markdown else True))
    return 0


if __name__ == '__main__':
    sys.exit(main())
