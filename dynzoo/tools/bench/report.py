"""Benchmark reports: ``bench.json``, ``bench.csv``, ``bench.md`` (with the layer table) and ``bench.png``."""
import csv
import json
import os
import platform
import time
from dataclasses import asdict
from typing import Dict, Optional, Sequence

import torch

from .memory import cpu_allocator
from .models import BenchResult

__all__ = ['environment', 'markdown_table', 'layers_markdown', 'plot', 'write_reports']


def _fmt(v, digits=2) -> str:
    if v is None:
        return 'n/a'
    if isinstance(v, float):
        return f'{v:.{digits}f}'
    return str(v)


def environment() -> dict:
    """Versions, machine, threads and allocator the results were measured with."""
    return dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                cuda_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none',
                processor=platform.processor() or 'n/a', threads=torch.get_num_threads(),
                cpu_count=os.cpu_count(), allocator=cpu_allocator(),
                date=time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))


def markdown_table(results: Sequence[BenchResult]) -> str:
    head = ('| model | role | mode | batch | wall ms (median) | CPU ms (median) | img/s | x twin | x timm '
            '| peak mem (MiB) | params (M) | GMACs | IES | RCS |')
    lines = [head, '|' + '---|' * 14]
    for r in results:
        lines.append(
            f'| {r.model} | {r.role} | {r.mode} | {r.batch_size} | {r.time_ms:.1f} | {r.cpu_ms:.1f} | '
            f'{r.throughput:.1f} | '
            f'{_fmt(r.ratio_twin)} | {_fmt(r.ratio_timm)} | {_fmt(r.peak_mem_mib, 0)} | {r.params / 1e6:.2f} | '
            f'{r.macs / 1e9:.3f} | {_fmt(r.ies)} | {_fmt(r.rcs)} |')
    return '\n'.join(lines)


def layers_markdown(rows: Sequence[dict]) -> str:
    if not rows:
        return ''
    strat_cols = [k for k in rows[0] if k.endswith('_ms') and k != 'static_ms']
    head = '| model | layer | batch | dispatched | static ms | ' + ' | '.join(strat_cols) + \
        ' | dispatched / static | loop / dispatched |'
    lines = [head, '|' + '---|' * (6 + len(strat_cols) + 1)]
    for r in rows:
        lines.append(f'| {r["model"]} | {r["layer"]} | {r["batch_size"]} | {r["dispatched"]} | {r["static_ms"]:.2f} | '
                     + ' | '.join(f'{r[c]:.2f}' for c in strat_cols)
                     + f' | {_fmt(r.get("auto_vs_static"))} | {_fmt(r.get("speedup_vs_loop"))} |')
    return '\n'.join(lines)


def plot(results: Sequence[BenchResult], path: str) -> Optional[str]:
    """Bar chart of time relative to the static twin per model and setting; ``None`` if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in results if r.role != 'twin' and r.ratio_twin is not None]
    if not rows:
        return None
    settings = sorted({(r.mode, r.batch_size) for r in rows})
    labels = list(dict.fromkeys(r.model for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels) * len(settings) / 2), 4))
    width = 0.8 / max(1, len(settings))
    for i, (mode, batch) in enumerate(settings):
        vals = []
        for lbl in labels:
            r = next((r for r in rows if r.model == lbl and r.mode == mode and r.batch_size == batch), None)
            vals.append(r.ratio_twin if r is not None else 0.0)
        ax.bar([j + i * width for j in range(len(labels))], vals, width, label=f'{mode} b{batch}')
    ax.axhline(1.0, color='k', lw=0.8)
    ax.set_xticks([j + width * (len(settings) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=20, ha='right', fontsize=8)
    ax.set_ylabel('time / static twin')
    ax.set_title('dynzoo bench: time relative to the static twin (lower is better)')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(results: Sequence[BenchResult], out_dir: str, layer_rows: Sequence[dict] = (),
                  command: str = '') -> Dict[str, str]:
    """Write ``bench.{json,csv,md,png}`` into ``out_dir`` (the layer rows go into the json and md); returns the
    paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    env = environment()
    paths['json'] = os.path.join(out_dir, 'bench.json')
    with open(paths['json'], 'w') as f:
        json.dump(dict(environment=env, command=command, results=[asdict(r) for r in results],
                       layers=list(layer_rows)), f, indent=2)
    if results:
        paths['csv'] = os.path.join(out_dir, 'bench.csv')
        with open(paths['csv'], 'w', newline='') as f:
            cols = [k for k in asdict(results[0]) if k != 'times_ms']
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in results:
                d = asdict(r)
                d.pop('times_ms')
                w.writerow(d)
    md = ['# dynzoo bench\n', f'`{command}`\n' if command else '',
          'Environment: ' + ', '.join(f'{k} {v}' for k, v in env.items()) + '\n',
          'Times are medians of interleaved repeats; `x twin` / `x timm` are ratios of median '
          f'{"wall" if not results or results[0].timer == "wall" else "process CPU"} time to the static '
          'twin / timm counterpart measured in the same run. Peak memory: peak RSS growth during one call (Linux '
          'VmHWM). MACs per image (`dynzoo.utils.flops`, convention `macs`).\n',
          markdown_table(results) if results else '']
    if layer_rows:
        md += ['\n## Layers (eval)\n', layers_markdown(layer_rows)]
    paths['md'] = os.path.join(out_dir, 'bench.md')
    with open(paths['md'], 'w') as f:
        f.write('\n'.join(md) + '\n')
    png = plot(results, os.path.join(out_dir, 'bench.png'))
    if png:
        paths['png'] = png
    return paths
