"""The layer benchmark: every distinct dynamic-conv geometry of a model on its real input, per strategy."""
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from dynzoo.layers.dynamic import DynamicConv2dBase, select_strategy
from dynzoo.layers.per_sample import conv_output_size

from .timing import interleaved_medians, progress

__all__ = ['bench_layers']


def _capture_inputs(model: nn.Module, x: torch.Tensor) -> Dict[tuple, Tuple[DynamicConv2dBase, torch.Tensor]]:
    """The first input each distinct dynamic-conv geometry of ``model`` receives in a forward of ``x``."""
    captured: Dict[tuple, Tuple[DynamicConv2dBase, torch.Tensor]] = {}

    def hook(mod, inp):
        k = (mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.groups, inp[0].shape[-2:])
        if k not in captured:
            captured[k] = (mod, inp[0].detach().clone())

    hooks = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, DynamicConv2dBase)]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return captured


def _dispatched(mod: DynamicConv2dBase, x: torch.Tensor) -> str:
    """The strategy ``'auto'`` picks for ``mod`` on ``x`` in eval."""
    out_hw = tuple(conv_output_size(x.shape[-2 + i], mod.kernel_size[i], mod.stride[i], mod.padding[i],
                                    mod.dilation[i]) for i in range(2))
    return select_strategy(x.shape[0], mod.in_channels, mod.out_channels, mod.kernel_size, mod.groups,
                           mod.num_kernels, out_hw, False, False)


def bench_layers(
        name: str,
        batch_size: int = 32,
        img_size: int = 224,
        repeats: int = 5,
        strategies: Sequence[str] = ('auto', 'loop', 'grouped', 'tiled', 'dense'),
        threads: Optional[int] = 2,
        quiet: bool = False,
        timer: str = 'wall',
) -> List[dict]:
    """Eval time of each distinct dynamic-conv geometry of ``name`` on its real input, per strategy (interleaved,
    median), with the static conv of the same geometry; ``speedup_vs_loop`` is loop time / dispatched time."""
    import timm
    import dynzoo  # noqa: F401

    if threads:
        torch.set_num_threads(threads)
    clock = time.perf_counter if timer == 'wall' else time.process_time
    model = timm.create_model(name).eval()
    captured = _capture_inputs(model, torch.randn(batch_size, 3, img_size, img_size))
    rows = []
    for i, (mod, x) in enumerate(captured.values()):
        static = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                           mod.dilation, mod.groups, bias=False)
        chosen = _dispatched(mod, x)
        saved = mod.strategy

        def run_with(strategy, mod=mod, x=x):
            def run():
                mod.strategy = strategy
                return mod(x)
            return run

        variants = {'static': lambda static=static, x=x: static(x)}
        variants.update({s: run_with(s) for s in strategies})
        try:
            with torch.inference_mode():
                med = {s: t * 1e3 for s, t in interleaved_medians(variants, repeats, warmup=0, clock=clock).items()}
        finally:
            mod.strategy = saved
        row = dict(model=name, layer=f'{mod.in_channels}->{mod.out_channels} k{mod.kernel_size[0]} '
                                     f's{mod.stride[0]} g{mod.groups} @{x.shape[-2]}x{x.shape[-1]}',
                   batch_size=batch_size, dispatched=chosen, static_ms=med['static'],
                   **{f'{s}_ms': med[s] for s in strategies})
        if 'loop' in med and 'auto' in med:
            row['speedup_vs_loop'] = med['loop'] / med['auto']
        row['auto_vs_static'] = med['auto'] / med['static'] if 'auto' in med else None
        rows.append(row)
        progress(f'[layers {name}] {i + 1}/{len(captured)} {row["layer"]}: dispatched {chosen}, '
                  f'{row.get("speedup_vs_loop", float("nan")):.2f}x faster than loop', quiet)
    return rows
