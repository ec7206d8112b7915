"""The zoo benchmark (``dynzoo bench``): dynamic models beside their static counterparts, and their layers.

* :mod:`~dynzoo.tools.bench.models` -- the whole-model benchmark (:func:`run_benchmark`): each dynamic model, its
  static twin (:func:`static_twin`) and its timm counterpart, timed interleaved in one run;
* :mod:`~dynzoo.tools.bench.layers` -- the layer benchmark (:func:`bench_layers`): every dynamic-conv geometry of a
  model, per execution strategy, against the static conv;
* :mod:`~dynzoo.tools.bench.memory` -- peak-memory probes and the CPU allocator setting;
* :mod:`~dynzoo.tools.bench.timing` -- :func:`interleaved_medians` and the device helpers the scripts share;
* :mod:`~dynzoo.tools.bench.report` -- ``bench.{json,csv,md,png}``;
* :mod:`~dynzoo.tools.bench.compare` -- ``dynzoo bench compare`` (:func:`run_compare`): the authors' code, dynzoo and
  the static counterpart side by side, the regression guard of the issue's table;
* :mod:`~dynzoo.tools.bench.cli` -- the command line (:func:`main`).
"""
from .cli import build_parser, main
from .compare import COMPARED, compare_markdown, load_authors_model, run_compare
from .layers import bench_layers
from .memory import cpu_allocator, set_cpu_allocator
from .models import DEFAULT_MODELS, BenchResult, run_benchmark, static_twin, timm_counterpart
from .report import environment, layers_markdown, markdown_table, write_reports
from .timing import interleaved_medians

__all__ = [
    'DEFAULT_MODELS', 'BenchResult', 'static_twin', 'timm_counterpart', 'run_benchmark', 'bench_layers',
    'set_cpu_allocator', 'cpu_allocator', 'interleaved_medians', 'environment', 'markdown_table', 'layers_markdown',
    'write_reports', 'build_parser', 'main', 'COMPARED', 'load_authors_model', 'run_compare', 'compare_markdown',
]
