"""Efficiency scores of the FMDConv paper (Zhang et al., KBS 2025, §3.2, Eqs. 3-4), as its tables compute them.

* Inverse Efficiency Score ``IES = time / PC`` (lower is better), with ``PC = top1 / 100`` the proportion correct.
* Rate-Correct Score ``RCS = PC * N / time`` (higher is better): correct classifications per second.

The paper replaces psychology's reaction time by the time of one training epoch, and ``N`` is the number of images
behind one epoch's count: 60,000 for CIFAR-10/100 (train + test) and 1,281,167 for ImageNet (train only), so
``RCS = N / IES`` exactly (re-derived from the values of Tables 3-7). ``dynzoo bench`` applies them to measured
times with a given accuracy.
"""

__all__ = ['N_CIFAR', 'N_IMAGENET', 'ies', 'rcs']

N_CIFAR = 60_000       # CIFAR-10 / CIFAR-100: 50,000 train + 10,000 test images (the paper's N)
N_IMAGENET = 1_281_167  # ImageNet-1k training set (the paper's N)


def _proportion_correct(top1_percent: float) -> float:
    pc = float(top1_percent) / 100.0
    if not 0.0 < pc <= 1.0:
        raise ValueError(f'top1_percent must be in (0, 100], got {top1_percent}')
    return pc


def _check_time(time_s: float) -> float:
    t = float(time_s)
    if not t > 0.0:
        raise ValueError(f'time must be > 0 seconds, got {time_s}')
    return t


def ies(time_per_epoch_s: float, top1_percent: float) -> float:
    """Inverse Efficiency Score (Eq. 3): ``time / (top1 / 100)``; seconds per unit of accuracy, lower is better."""
    return _check_time(time_per_epoch_s) / _proportion_correct(top1_percent)


def rcs(time_per_epoch_s: float, top1_percent: float, num_images: int) -> float:
    """Rate-Correct Score (Eq. 4): ``(top1 / 100) * num_images / time``; correct answers per second, higher is better.

    ``num_images`` is :data:`N_CIFAR` or :data:`N_IMAGENET` to reproduce the paper's tables.
    """
    if int(num_images) <= 0:
        raise ValueError(f'num_images must be > 0, got {num_images}')
    return _proportion_correct(top1_percent) * int(num_images) / _check_time(time_per_epoch_s)
