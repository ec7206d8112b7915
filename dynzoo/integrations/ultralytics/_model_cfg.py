"""SGDM model configs derived at load time from the user's installed Ultralytics detector YAMLs.

dynzoo ships no Ultralytics YAML: :func:`sgdm_model_cfg` loads the host's own config through Ultralytics'
``yaml_model_load`` (so ``yolov8n.yaml`` resolves to the installed ``yolov8.yaml`` at scale n) and adds one SGDM per
input of its multi-scale head row (Xing et al., §4.1: "before the P3, P4, and P5 output layers before detection
heads"), either

* ``'paper'``: the SGDM rows appended before the head, which alone reads them (the neck is unchanged), or
* ``'inline'``: each SGDM inserted right after the row it follows, every later reader of that row reading the SGDM.

An SGDM row's channel argument is the feeding row's first argument, its output channels at the YAML's base width
(as for Ultralytics' channel-setting layers: ``Conv``, ``C2f``, ``C3``, ``C3k2`` ...); ``register()``'s
``parse_model`` wrapper scales it like theirs. A feeding row of another kind fails at build time with SGDM's
channel error.
"""
import re
from pathlib import Path
from typing import Dict, List, Optional

from ultralytics.nn import tasks

__all__ = ['PLACEMENTS', 'channel_argument', 'insert_rows_after', 'parse_sgdm_cfg_name', 'sgdm_model_cfg']

PLACEMENTS = {'paper': '-sgdm', 'inline': '-sgdm-inline'}

_CFG_NAME = re.compile(r'^(?P<base>.+?)(?P<suffix>-sgdm(?:-inline)?)(?P<ext>\.ya?ml)$')


def parse_sgdm_cfg_name(name: str) -> Optional[tuple]:
    """``(base YAML name, placement)`` for an SGDM config name (``'yolov5s-sgdm-inline.yaml'`` ->
    ``('yolov5s.yaml', 'inline')``), or None for any other name."""
    match = _CFG_NAME.match(Path(str(name)).name)
    if match is None:
        return None
    placement = next(p for p, suffix in PLACEMENTS.items() if suffix == match['suffix'])
    return match['base'] + match['ext'], placement


def _renumber(f: int, i: int, at: int, source: List[int]) -> int:
    """Old row ``i``'s ``from`` entry ``f`` for the same row at new index ``at``, ``source`` mapping old to new
    (the first row's ``-1``, the model input, stays)."""
    if f >= 0:
        return source[f]
    return (source[i + f] if i + f >= 0 else i + f) - at


def insert_rows_after(rows: List[list], inserted: Dict[int, list]) -> List[list]:
    """``rows`` (Ultralytics' ``[from, number, module, args]``) with ``inserted[j]`` placed right after row ``j``.

    Every ``from`` index is renumbered so that a row that read row ``j`` now reads the row inserted after it (which
    itself reads ``j`` through ``from = -1``); relative (negative) indices stay relative, absolute ones absolute.
    """
    out, source = [], []  # source[k]: the new index of what old row k's readers read
    for i, (f, *rest) in enumerate(rows):
        at = len(out)
        f = [_renumber(x, i, at, source) for x in f] if isinstance(f, list) else _renumber(f, i, at, source)
        out.append([f, *rest])
        source.append(at)
        if i in inserted:
            out.append([-1, *inserted[i][1:]])
            source[i] = len(out) - 1
    return out


def channel_argument(row: list, role: str = 'an SGDM row') -> int:
    """A row's first argument, its channel count at the base width (a ``ValueError`` naming ``role`` if absent)."""
    if not row[3] or not isinstance(row[3][0], int):
        raise ValueError(f'{role} needs its channel count (at the base width) as its first argument, got {row}')
    return row[3][0]


def sgdm_model_cfg(base: str = 'yolov8n.yaml', placement: str = 'paper') -> dict:
    """The Ultralytics model dict of detector ``base`` (any name ``yaml_model_load`` resolves) with one SGDM on
    each input of its head row (the last row); ``placement`` is ``'paper'`` or ``'inline'`` (module docstring).

    ``tasks.DetectionModel(sgdm_model_cfg('yolo11n.yaml'))`` builds it; ``YOLO('yolo11n-sgdm.yaml')`` derives the
    same after ``register()``.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f'placement must be one of {sorted(PLACEMENTS)}, got {placement!r}')
    d = tasks.yaml_model_load(base)
    backbone, head = d.get('backbone') or [], d.get('head') or []
    rows = backbone + head
    if any(row[2] == 'SGDM' for row in rows):
        raise ValueError(f'{base} already has SGDM rows')
    if not head or not isinstance(head[-1][0], list):
        raise ValueError(f'{base} has no multi-scale head row (a last head row reading a list of layers)')
    last = len(rows) - 1
    inputs = [last + f if f < 0 else f for f in rows[last][0]]
    sgdm_rows = {j: [j, 1, 'SGDM', [channel_argument(rows[j], 'the row an SGDM follows')]] for j in inputs}
    if placement == 'paper':
        head_row = [list(range(last, last + len(inputs))), *rows[last][1:]]
        rows = rows[:last] + [sgdm_rows[j] for j in inputs] + [head_row]
        num_backbone = len(backbone)
    else:
        rows = insert_rows_after(rows, sgdm_rows)
        num_backbone = len(backbone) + sum(j < len(backbone) for j in inputs)
    stem, suffix = Path(str(base)).stem, Path(str(base)).suffix or '.yaml'
    d.update(backbone=rows[:num_backbone], head=rows[num_backbone:],
             yaml_file=f'{stem}{PLACEMENTS[placement]}{suffix}')
    return d
