"""``dynzoo bench``: the whole-model benchmark, optionally the layer benchmark, and the reports;
``dynzoo bench compare``: beside the authors' code (:mod:`~dynzoo.tools.bench.compare`)."""
import argparse
import sys
from typing import Dict, List, Optional, Sequence

from dynzoo.utils.metrics import N_IMAGENET

from . import compare
from .layers import bench_layers
from .memory import set_cpu_allocator
from .models import DEFAULT_MODELS, run_benchmark
from .report import layers_markdown, markdown_table, write_reports

__all__ = ['build_parser', 'main']


def _parse_accuracy(items: Sequence[str]) -> Dict[str, float]:
    out = {}
    for item in items:
        if '=' not in item:
            raise argparse.ArgumentTypeError(f'--accuracy expects MODEL=TOP1, got {item!r}')
        k, v = item.split('=', 1)
        out[k] = float(v)
    return out


def build_parser(prog: str = 'dynzoo bench') -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description='Measure dynamic models beside their static twins and timm counterparts '
                               "('%(prog)s compare --help': beside the authors' code).")
    p.add_argument('models', nargs='*', default=list(DEFAULT_MODELS), help='dynamic models (default: %(default)s)')
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 32], help='eval batch sizes')
    p.add_argument('--train-batch-sizes', type=int, nargs='*', default=[32], help='train-step batch sizes')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--timer', choices=('wall', 'cpu'), default='wall',
                   help='what the ratios compare: median wall time, or median process CPU time (steadier on a '
                        'machine shared with other jobs; use it with --threads 1)')
    p.add_argument('--strategies', nargs='+', default=['auto'],
                   help='execution strategies of the dynamic models (each one a row)')
    p.add_argument('--accuracy', nargs='*', default=[], metavar='MODEL=TOP1',
                   help='top-1 (%%) per model, for IES / RCS')
    p.add_argument('--epoch-images', type=int, default=N_IMAGENET, help='images per epoch for IES / RCS')
    p.add_argument('--no-timm', action='store_true', help='skip the timm static counterparts')
    p.add_argument('--no-memory', action='store_true', help='skip peak-memory measurement')
    p.add_argument('--layers', nargs='*', default=None, metavar='MODEL',
                   help='also run the layer benchmark on these models (no name: the first model)')
    p.add_argument('--layer-batch-size', type=int, default=32)
    p.add_argument('--layers-only', action='store_true', help='run the layer benchmark only (implies --layers)')
    p.add_argument('--out', default='bench_out', help='output directory')
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (peak memory: max_memory_allocated)")
    p.add_argument('--amp', choices=('bf16', 'fp16'), default=None, help='autocast dtype (default: fp32)')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--compile', action='store_true', help='torch.compile every model')
    p.add_argument('--allocator', choices=('default', 'retain'), default='default',
                   help="CPU allocator: leave glibc as it is, or 'retain' freed memory for reuse (steadier static "
                        "timings; see dynzoo.tools.bench.memory)")
    p.add_argument('--quiet', action='store_true')
    return p


def main(argv: Optional[Sequence[str]] = None, prog: str = 'dynzoo bench') -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ['compare']:  # `dynzoo bench compare ...`: beside the authors' code (dynzoo.tools.bench.compare)
        return compare.main(argv[1:], prog=prog + ' compare')
    args = build_parser(prog).parse_args(argv)
    if args.layers_only and args.layers is None:
        args.layers = []
    if args.device == 'cpu':
        set_cpu_allocator(args.allocator)
    results = [] if args.layers_only else run_benchmark(
        args.models, args.batch_sizes, args.train_batch_sizes, args.img_size, args.repeats, args.warmup,
        args.threads, args.strategies, _parse_accuracy(args.accuracy), args.epoch_images,
        with_timm=not args.no_timm, measure_memory=not args.no_memory, quiet=args.quiet, timer=args.timer,
        device=args.device, amp=args.amp, channels_last=args.channels_last, compile_model=args.compile)
    layer_rows: List[dict] = []
    if args.layers is not None:
        for name in (args.layers or args.models[:1]):
            layer_rows += bench_layers(name, args.layer_batch_size, args.img_size, args.repeats,
                                       threads=args.threads, quiet=args.quiet, timer=args.timer)
    paths = write_reports(results, args.out, layer_rows, command=' '.join([prog] + argv))
    if results:
        print(markdown_table(results))
    if layer_rows:
        print()
        print(layers_markdown(layer_rows))
    print('\nwrote ' + ', '.join(paths.values()))
    return 0
