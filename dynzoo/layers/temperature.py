"""Attention temperatures: the buffer every temperature-bearing head holds, and the training schedules.

A head divides its logits by ``T`` before the softmax / sigmoid (DynamicConv, Chen et al. 2020, Eq. 4; ODConv's
``Attention``; FMDConv Eq. 6; A2D2C Eq. 5; DMF Fig. 3). ``T`` is a persistent 0-d buffer, so a checkpoint carries the
temperature it runs at. ``temperature_role`` names which temperature a head holds: ``'kernel'`` (softmax / sigmoid over
the kernel bank) or ``'gate'`` (FMDConv's sigmoid channel / filter heads).

Every schedule is a function of one iteration base: ``step``, the 0-based global training step about to run, and
``steps_per_epoch`` (default 1, so a schedule updated once per epoch passes the epoch as ``step``).
"""
import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

__all__ = [
    'TemperatureMixin', 'set_temperature', 'get_temperatures', 'fmdconv_temperature', 'linear_temperature',
    'TEMPERATURE_SCHEDULES', 'TemperatureAnnealing', 'attach_temperature_schedule',
]

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

    Returns the number of heads updated; raises a ``ValueError`` if the model has none of that role (so a schedule
    never silently no-ops; the message names the roles it has), if ``role`` is unknown, or if ``temperature`` is not
    finite and positive. The buffers change in place: not thread-safe against a forward of the same model running in
    another thread (serialise the two).
    """
    t = _check_temperature(temperature)
    if role is not None and role not in TEMPERATURE_ROLES:
        raise ValueError(f'temperature role must be one of {TEMPERATURE_ROLES} or None (every role), got {role!r}')
    heads = [m for m in model.modules() if isinstance(m, TemperatureMixin)]
    matching = [m for m in heads if role is None or m.temperature_role == role]
    if not matching:
        found = ', '.join(sorted({f'{m.temperature_role!r}' for m in heads})) or 'none'
        wanted = 'a temperature' if role is None else f'a {role!r} temperature'
        raise ValueError(f'{type(model).__name__} has no attention head with {wanted} '
                         f'(temperature roles found: {found})')
    for m in matching:
        m.set_temperature(t)
    return len(matching)


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


# schedule name -> {role: function of (step, steps_per_epoch)}; the families' papers' schedules
TEMPERATURE_SCHEDULES: Dict[str, Dict[str, Callable[[int, int], float]]] = {
    # FMDConv Sec. 3.3.2: the kernel softmax 40 -> 1 by 3 per epoch; the sigmoid gates have no temperature (T = 1)
    'fmdconv': {'kernel': fmdconv_temperature, 'gate': lambda step, steps_per_epoch: 1.0},
    # DynamicConv Sec. 3.2 (ODConv, A2D2C Sec. 4.3): 30 -> 1 linearly over the first 10 epochs, per step
    'linear': {'kernel': linear_temperature},
    # DMF's authors' code: the same line, counted from iteration 1
    'dmf': {'kernel': lambda step, steps_per_epoch: linear_temperature(step + 1, steps_per_epoch)},
}


class TemperatureAnnealing(nn.Module):
    """A model's own temperature schedule: each training forward pass sets the temperatures of the model's heads
    for the step about to run, then counts it.

    The step count ``num_steps`` is a persistent buffer, so a checkpoint resumes the schedule exactly, and every DDP
    rank (one forward per step each) follows the same one. A step is a forward pass in training mode with gradients
    enabled (evaluation, ``torch.no_grad()`` BatchNorm calibration and EMA copies in eval mode do not count); with
    gradient accumulation, count ``steps_per_epoch`` in forward passes. Attach it with :func:`attach_temperature_schedule`.
    """

    def __init__(self, schedule: Optional[str] = None, steps_per_epoch: int = 1):
        super().__init__()
        if schedule is not None and schedule not in TEMPERATURE_SCHEDULES:
            raise ValueError(f'unknown temperature schedule {schedule!r}; expected one of '
                             f'{sorted(TEMPERATURE_SCHEDULES)}')
        _check_steps_per_epoch(int(steps_per_epoch))
        self.schedule = schedule
        self.steps_per_epoch = int(steps_per_epoch)
        # no schedule: no step count (the model's temperatures stay where they are)
        self.register_buffer('num_steps', torch.zeros((), dtype=torch.int64) if schedule is not None else None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the step count is training state, so any checkpoint loads into any model (timm's load_checkpoint is
        # strict): a model without a schedule ignores a saved count, a scheduled one without a saved count starts at 0
        key = prefix + 'num_steps'
        if self.num_steps is None:
            state_dict.pop(key, None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if key in missing_keys:
            missing_keys.remove(key)

    def temperatures(self, step: int) -> Dict[str, float]:
        """``{role: T}`` of the schedule at 0-based ``step``."""
        return {role: fn(step, self.steps_per_epoch) for role, fn in TEMPERATURE_SCHEDULES[self.schedule].items()}

    def advance(self, model: nn.Module) -> None:
        """Set ``model``'s temperatures for the current step and count it (a no-op outside training)."""
        if self.num_steps is None or not (model.training and torch.is_grad_enabled()):
            return
        with torch.no_grad():
            self._advance(model)

    def _advance(self, model: nn.Module) -> None:
        for role, t in self.temperatures(int(self.num_steps)).items():
            for m in model.modules():
                if isinstance(m, TemperatureMixin) and m.temperature_role == role:
                    m.set_temperature(t)
        self.num_steps += 1

    def extra_repr(self) -> str:
        return f'{self.schedule!r}, steps_per_epoch={self.steps_per_epoch}' if self.schedule else 'no schedule'


@torch.compiler.disable  # Python-side schedule state: run eagerly before the compiled forward, not traced
def _anneal_before_forward(model: nn.Module, args) -> None:
    model.temperature_annealing.advance(model)


def attach_temperature_schedule(model: nn.Module, schedule: Optional[str], steps_per_epoch: int = 1) -> nn.Module:
    """Give ``model`` its :class:`TemperatureAnnealing` as ``model.temperature_annealing`` (key
    ``temperature_annealing.num_steps`` with a schedule), run before each of its forward passes; returns ``model``.

    ``schedule=None`` attaches an idle one, so that a checkpoint saved with a schedule loads into the model."""
    annealing = TemperatureAnnealing(schedule, steps_per_epoch)
    if schedule is not None:
        roles = set(TEMPERATURE_SCHEDULES[schedule])
        if not any(isinstance(m, TemperatureMixin) and m.temperature_role in roles for m in model.modules()):
            raise ValueError(f'{type(model).__name__} has no attention head with a temperature of the roles '
                             f'{sorted(roles)} that the {schedule!r} schedule anneals')
        buffer = next(iter(model.buffers()), None)
        if buffer is not None:
            annealing.to(buffer.device)
    model.temperature_annealing = annealing
    if schedule is not None:
        model.register_forward_pre_hook(_anneal_before_forward)
    return model
