"""Timing primitives shared by the benchmarks and the scripts under ``scripts/``."""
import contextlib
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

__all__ = ['interleaved_medians', 'synchronize', 'autocast', 'progress']


def interleaved_medians(
        fns: Dict[str, Callable[[], object]],
        repeats: int,
        warmup: int = 1,
        clock: Callable[[], float] = time.perf_counter,
) -> Dict[str, float]:
    """Median seconds per call of each function, the calls interleaved round by round (every round calls each
    function once, in turn), so that load from other processes hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer measures it; a no-op on CPU."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def autocast(device: torch.device, amp: Optional[str]):
    """``torch.autocast`` for ``amp`` in ``('bf16', 'fp16')``; ``None``: fp32 (a null context)."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={'bf16': torch.bfloat16, 'fp16': torch.float16}[amp])


def progress(msg: str, quiet: bool = False) -> None:
    """A progress line on stderr (the results go to stdout), unless ``quiet``."""
    if not quiet:
        print(msg, file=sys.stderr, flush=True)
