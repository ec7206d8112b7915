"""Peak-memory probes and the CPU allocator setting of a benchmark process.

Peak memory on CPU is the process's peak resident set size during a call above the resident size just before it:
free allocator pages are first returned to the OS (glibc ``malloc_trim``), then Linux's ``VmHWM`` is reset through
``/proc/self/clear_refs`` and read after the call. It counts every allocation of the call (activations, saved
tensors, gradients, temporaries) and is ``None`` where the kernel does not offer the reset. On CUDA it is
``torch.cuda.max_memory_allocated`` above what was allocated before the call.

CPU allocator (:func:`set_cpu_allocator`): glibc serves large buffers with ``mmap`` and returns them to the OS when
freed, so every call of a CNN at batch 32 page-faults its activations in afresh (on a 2-core VM the same static
ResNet-18 swung between 800 and 1000 ms). ``'retain'`` (``mallopt``: no ``mmap``, no trimming) keeps freed memory
in the process for the next call (660-750 ms there, steadier), but it changes which execution strategy is fastest
(``docs/performance.md``) and gave outliers at batch 1 after large batch-32 runs in the same process, so the
default leaves the allocator as users have it. Peak memory is unaffected (free pages are handed back before each
measurement).
"""
from typing import Optional

import torch

__all__ = ['set_cpu_allocator', 'cpu_allocator', 'PeakMemory', 'CudaPeakMemory', 'peak_memory']

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)
_ALLOCATOR = ['default']


def set_cpu_allocator(mode: str) -> str:
    """``'retain'``: glibc keeps freed memory for reuse (no ``mmap`` for large blocks, no automatic trimming);
    ``'default'``: leave the allocator alone. Returns the mode in force (``'default'`` where glibc is absent).
    Process-wide and not undone: meant for a benchmark process."""
    if mode not in ('retain', 'default'):
        raise ValueError(f"allocator must be 'retain' or 'default', got {mode!r}")
    if mode == 'retain':
        try:
            import ctypes
            libc = ctypes.CDLL('libc.so.6')
            if libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1:
                _ALLOCATOR[0] = 'retain'
        except (OSError, AttributeError):
            pass
    return _ALLOCATOR[0]


def cpu_allocator() -> str:
    """The CPU allocator mode in force in this process (``'default'`` or ``'retain'``)."""
    return _ALLOCATOR[0]


def _hwm_reset_supported() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _read_status_kb(key: str) -> Optional[int]:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_memory() -> None:
    """Hand the allocator's free pages back to the OS (glibc ``malloc_trim``), so that RSS is live memory."""
    try:
        import ctypes
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak RSS growth (MiB) during a block, via ``VmHWM`` reset (Linux); ``value`` is None when unsupported."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and _hwm_reset_supported()
        self.value: Optional[float] = None
        self.base: Optional[int] = None

    def __enter__(self):
        if self.enabled:
            _release_free_memory()
            _hwm_reset_supported()  # the reset itself
            self.base = _read_status_kb('VmRSS')
        return self

    def __exit__(self, *exc):
        if self.enabled:
            peak = _read_status_kb('VmHWM')
            if peak is not None and self.base is not None:
                self.value = max(0.0, (peak - self.base) / 1024.0)
        return False


class CudaPeakMemory:
    """Peak CUDA memory allocated during the block above what was allocated before it (MiB)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.value: Optional[float] = None

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)
        self.value = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2 ** 20
        return False


def peak_memory(device: torch.device, enabled: bool = True):
    """The probe for ``device``: :class:`CudaPeakMemory` on CUDA, else :class:`PeakMemory`."""
    return CudaPeakMemory(device) if device.type == 'cuda' else PeakMemory(enabled)
