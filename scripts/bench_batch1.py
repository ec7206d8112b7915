"""Batch 1 in eval: where a dynamic network's time goes beyond its static twin's, and what a bf16 kernel bank does.

At batch 1 the exact dynamic conv reads its whole kernel bank once per call (``K`` times the static kernel) to mix
the one kernel it convolves with, so the bank's bytes are the floor of its extra time. For the reparameterized
form of each model (default: FMDConv and ODConv-4x ResNet-18) this prints, side by side in one run (medians of
interleaved rounds):

* **floor**: the mixture alone, ``alpha @ W_bank`` over every dynamic layer's bank, its bandwidth over the bank's
  bytes, and ``1 + mixture / static forward``: the ratio to the twin that the exact form cannot go below;
* **layers**: every dynamic layer on the input it gets inside the network (captured once), summed over the
  layers: the whole layer, its attention heads alone (``forward_attention``), the mixture and one conv alone, and a
  static conv of the same geometry -- the heads' share and the remaining per-layer overhead;
* **bf16 bank**: the whole network with every bank stored in bf16 (``layer.weight.data = weight.bfloat16()``; the
  forward casts the mixing weights to the bank's dtype, oneDNN's bf16 GEMM accumulates in fp32, and the mixed
  kernel is cast to the input's dtype, :func:`dynzoo.layers.dynamic.aggregate_kernels`), its time and its error
  against the fp32 bank: max |diff| and relative L2 of the logits and top-1 agreement on random inputs. Random
  init zeroes the last BatchNorm of every residual branch (timm's ``zero_init_last``), which would hide the dynamic
  convs' error, so every BatchNorm scale is drawn from U(0.5, 1.5) first.

The results are in ``docs/performance.md`` ('The batch-1 floor').

    python scripts/bench_batch1.py [MODEL ...] [--threads 2] [--repeats 11] [--img-size 224]
"""
import argparse
import copy
from typing import Dict, List, Tuple

import timm
import torch
import torch.nn.functional as F

import dynzoo
from dynzoo.layers.dynamic import DynamicConv2dBase
from dynzoo.tools.bench import interleaved_medians
from dynzoo.tools.bench.models import timm_counterpart


def bf16_bank(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose dynamic layers keep their kernel bank in bf16 (everything else stays fp32)."""
    model = copy.deepcopy(model)
    for layer in model.modules():
        if isinstance(layer, DynamicConv2dBase):
            layer.weight.data = layer.weight.data.bfloat16()
    return model


def dynamic_layers(model: torch.nn.Module) -> List[DynamicConv2dBase]:
    return [m for m in model.modules() if isinstance(m, DynamicConv2dBase)]


def layer_inputs(model: torch.nn.Module, x: torch.Tensor) -> List[Tuple[DynamicConv2dBase, tuple]]:
    """Each dynamic layer with the positional arguments it is called with in ``model(x)``."""
    calls = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: calls.append((mod, args))) for m in dynamic_layers(model)]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls


def layer_parts(calls, repeats: int) -> Dict[str, float]:
    """Seconds, summed over the layers: the whole layer, its heads, the mixture + one conv, a static conv."""
    def mix_conv(m: DynamicConv2dBase, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        kernel = torch.mm(alpha, m.weight.reshape(m.num_kernels, -1)).reshape(m.weight.shape[1:])
        return F.conv2d(x, kernel, None, m.stride, m.padding, m.dilation, m.groups)

    alphas = [torch.softmax(torch.randn(1, m.num_kernels), 1) for m, _ in calls]
    statics = [m.weight[0].clone() for m, _ in calls]
    parts = {
        'layer': lambda: [m(*args) for m, args in calls],
        'heads': lambda: [m.forward_attention(*args) for m, args in calls],
        'mixture + conv': lambda: [mix_conv(m, args[0], a) for (m, args), a in zip(calls, alphas)],
        'static conv': lambda: [F.conv2d(args[0], w, None, m.stride, m.padding, m.dilation, m.groups)
                                for (m, args), w in zip(calls, statics)],
    }
    return interleaved_medians(parts, repeats)


def mixture_times(model: torch.nn.Module, repeats: int) -> Dict[str, float]:
    """Seconds of ``alpha @ W`` over every dynamic layer's bank at batch 1, with an fp32 and a bf16 bank."""
    banks = [m.weight.detach().reshape(m.num_kernels, -1) for m in dynamic_layers(model)]
    banks16 = [b.bfloat16() for b in banks]
    alpha = {b.shape[0]: torch.softmax(torch.randn(1, b.shape[0]), 1) for b in banks}
    alpha16 = {k: a.bfloat16() for k, a in alpha.items()}
    return interleaved_medians({
        'fp32': lambda: [torch.mm(alpha[b.shape[0]], b) for b in banks],
        'bf16': lambda: [torch.mm(alpha16[b.shape[0]], b) for b in banks16],
    }, repeats)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('models', nargs='*', default=['fmdconv_resnet18', 'odconv_resnet18'])
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--repeats', type=int, default=11)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--error-samples', type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    size = (3, args.img_size, args.img_size)
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.data.uniform_(0.5, 1.5)
        fp32 = dynzoo.reparameterize(model)
        bf16 = bf16_bank(fp32)
        static = timm.create_model(timm_counterpart(name)).eval()
        bank_bytes = sum(m.weight.numel() * m.weight.element_size() for m in dynamic_layers(fp32))
        with torch.inference_mode():
            xs = torch.randn((args.error_samples,) + size)
            ref, out = fp32(xs), bf16(xs)
            err = (out - ref).abs().max().item()
            rel = ((out - ref).norm() / ref.norm()).item()
            agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
            x = torch.randn((1,) + size)
            net = interleaved_medians({'static': lambda: static(x), 'fp32': lambda: fp32(x),
                                       'bf16': lambda: bf16(x)}, args.repeats)
            mix = mixture_times(fp32, args.repeats)
            parts = layer_parts(layer_inputs(fp32, x), args.repeats)
        ms = {k: v * 1e3 for k, v in {**net, **parts}.items()}
        rows.append(
            f"| {name} | {ms['static']:.1f} | {ms['fp32'] / ms['static']:.2f}x | {bank_bytes / 2 ** 20:.1f} MiB, "
            f"{mix['fp32'] * 1e3:.1f} ms ({bank_bytes / mix['fp32'] / 1e9:.1f} GB/s) | "
            f"{1 + mix['fp32'] / net['static']:.2f}x | {ms['layer']:.1f} / {ms['heads']:.1f} / "
            f"{ms['mixture + conv']:.1f} / {ms['static conv']:.1f} | {mix['bf16'] * 1e3:.1f} ms "
            f"({bank_bytes / 2 / mix['bf16'] / 1e9:.1f} GB/s) | {ms['bf16'] / ms['static']:.2f}x | "
            f"{err:.1e} / {rel:.1e} / {agree:.2f} |")
        print(rows[-1], flush=True)
    print()
    print('| model | static ms | dynamic (fp32 bank) | mixture alone | floor | dynamic layers: whole / heads / '
          'mixture + conv / static conv (ms) | bf16 mixture alone | dynamic (bf16 bank) | bf16 vs fp32: max abs diff '
          '/ rel L2 / top-1 agree |')
    print('|---|---|---|---|---|---|---|---|---|')
    print('\n'.join(rows))


if __name__ == '__main__':
    main()
