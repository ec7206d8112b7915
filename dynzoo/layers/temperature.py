"""Attention temperatures: the buffer every temperature-bearing head holds, and the training schedules.

A head divides its logits by ``T`` before the softmax / sigmoid (DynamicConv, Chen et al. 2020, Eq. 4; ODConv's
``Attention``; FMDConv Eq. 6; A2D2C Eq. 5; DMF Fig. 3). ``T`` is a persistent 0-d buffer, so a checkpoint carries the
temperature it runs at. ``temperature_role`` names which temperature a head holds: ``'kernel'`` (softmax / sigmoid over
the kernel bank) or ``'gate'`` (FMDConv's sigmoid channel / filter heads).

Every schedule is a function of one iteration base: ``step``, the 0-based global training step about to run, and
``steps_per_epoch`` (default 1, so a schedule updated once per epoch passes the epoch as ``step``).
"""
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ['TemperatureMixin', 'set_temperature', 'get_temperatures', 'fmdconv_temperature', 'linear_temperature']

TEMPERATURE_ROLES = ('kernel', 'gate')


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f'temperature must be finite and > 0, got {temperature}')
    return t


class TemperatureMixin:
    """A module with a ``temperature`` buffer and a ``temperature_role`` (``'kernel'`` or ``'gate'``)."""
    temperature_role: str = 'kernel'

    def _init_temperature(self, temperature: float, role: str, device=None) -> None:
        if role not in TEMPERATURE_ROLES:
            raise ValueError(f'temperature role must be one of {TEMPERATURE_ROLES}, got {role!r}')
        self.temperature_role = role
        self.register_buffer('temperature', torch.tensor(_check_temperature(temperature), device=device))

    @torch.no_grad()
    def set_temperature(self, temperature: float) -> None:
        self.temperature.fill_(_check_temperature(temperature))


def set_temperature(model: nn.Module, temperature: float, role: Optional[str] = 'kernel') -> int:
    """Set the temperature of every head of ``model`` whose role matches (``None``: all roles).

    Returns the number of heads updated; raises if the model has none (so a schedule never silently no-ops) or if
    ``temperature`` is not finite and positive.
    """
    t = _check_temperature(temperature)
    count = 0
    for m in model.modules():
        if isinstance(m, TemperatureMixin) and (role is None or m.temperature_role == role):
            m.set_temperature(t)
            count += 1
    if count == 0:
        raise ValueError(f'{type(model).__name__} has no attention head with a {role or "any"!s} temperature')
    return count


def get_temperatures(model: nn.Module) -> Dict[str, Tuple[str, float]]:
    """``{module name: (role, temperature)}`` for every temperature-bearing head."""
    return {
        name: (m.temperature_role, float(m.temperature))
        for name, m in model.named_modules() if isinstance(m, TemperatureMixin)
    }


def _check_steps_per_epoch(steps_per_epoch: int) -> None:
    if steps_per_epoch < 1:
        raise ValueError(f'steps_per_epoch must be >= 1, got {steps_per_epoch}')


def fmdconv_temperature(step: int, steps_per_epoch: int = 1, t0: float = 40.0, decrement: float = 3.0) -> float:
    """FMDConv's kernel-softmax schedule (Zhang et al. 2025, Sec. 3.3.2): ``max(1, t0 - decrement * epoch)``, stepped
    once per epoch, ``epoch = step // steps_per_epoch`` (0-based)."""
    _check_steps_per_epoch(steps_per_epoch)
    return max(1.0, t0 - decrement * (step // steps_per_epoch))


def linear_temperature(step: int, steps_per_epoch: int = 1, t0: float = 30.0, t1: float = 1.0,
                       epochs: float = 10) -> float:
    """``T`` linear from ``t0`` at step 0 to ``t1`` after ``epochs`` epochs, then ``t1``.

    DynamicConv's schedule (Chen et al. 2020, Sec. 3.2: 30 -> 1 over the first 10 epochs), used by ODConv, A2D2C
    (Sec. 4.3) and DMF. DMF's authors count iterations from 1: their value at 0-based step ``s`` is
    ``linear_temperature(s + 1, steps_per_epoch)``.
    """
    _check_steps_per_epoch(steps_per_epoch)
    if epochs <= 0:
        raise ValueError(f'epochs must be > 0, got {epochs}')
    progress = min(max(step / (epochs * steps_per_epoch), 0.0), 1.0)
    return t0 + (t1 - t0) * progress
