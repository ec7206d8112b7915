"""``dynzoo bench compare``: the authors' code, dynzoo and the static counterpart, side by side in one process.

The regression guard of the zoo's speed. For each network of :data:`COMPARED` (FMDConv and ODConv-4x ResNet-18,
AttNet-T1, DMF-XXS) it times, interleaved round by round (median of ``repeats``): the authors' own network, built
from their public repository where it is present on disk (``--authors-dir`` / ``DYNZOO_AUTHORS_CODE``: a folder
holding one checkout per repository, named as the repository), dynzoo's model, dynzoo's reparameterized model
(eval only) and the timm static counterpart. Each cell is a time divided by the static counterpart's time of the
same regime (lower is better): eval at batch 1 and 32, one train step (forward + cross-entropy backward) at
batch 16.

Same math: the authors' network is built with the constructor and arguments of the paper's configuration (same
number of kernels, reductions and temperature as dynzoo's model); its state dict is then loaded into dynzoo's model
the way a user loads the authors' release (``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=...)``,
through the family's ``checkpoint_filter_fn``), so both are timed with identical weights, and their outputs and
parameter counts are compared (``max|diff| / max(1, max|logits|)``).

The authors' files are imported from the user's folder, never copied: each file is loaded under a private module
name with its repository root on ``sys.path`` for its own imports (``from modules.odconv import ...``), and the
repository's modules are dropped from ``sys.modules`` afterwards (ODConv and FMDConv both name theirs
``modules``). Two shims for the timm of today, in force only while the file is imported: ``register_model`` leaves
timm's registry alone (the authors' names are not registered), and the ``timm.models.layers.helpers`` module
that newer timm releases dropped is served from ``timm.layers``.
"""
import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import types
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

from .models import _measure, _prepare, _Variant, timm_counterpart
from .report import environment
from .timing import progress

__all__ = ['ComparedNetwork', 'COMPARED', 'AUTHORS_ENV', 'find_authors_repo', 'load_authors_model',
           'authors_weights_in_dynzoo', 'run_compare', 'compare_markdown', 'write_compare', 'recorded_command',
           'build_parser', 'main']

AUTHORS_ENV = 'DYNZOO_AUTHORS_CODE'


class ComparedNetwork(NamedTuple):
    label: str            # the network as the papers name it
    model: str            # dynzoo's registered name
    repo: str             # the authors' GitHub repository, owner/name
    source: str           # the file of that repository that defines the network
    constructor: str      # the function of that file that builds it
    kwargs: Dict[str, Any]


COMPARED = (
    ComparedNetwork('FMDConv ResNet-18', 'fmdconv_resnet18', 'tianyu00824/FMDConv', 'models/fmd_resnet.py',
                    'fmd_resnet18', dict(kernel_num=4, reduction=0.0625)),
    ComparedNetwork('ODConv-4x ResNet-18', 'odconv_resnet18', 'OSVAI/ODConv', 'models/od_resnet.py',
                    'od_resnet18', dict(kernel_num=4, reduction=0.0625)),
    ComparedNetwork('AttNet-T1', 'attnet_t1', 'price112/Attentive-Convolution', 'models/AttNet.py', 'AttNet_T1', {}),
    ComparedNetwork('DMF-XXS', 'dmf_xxs', 'ysj9909/DMF', 'dmf_final.py', 'dmf_198', {}),
)


def find_authors_repo(authors_dir: str, repo: str) -> str:
    """The checkout of ``repo`` (``owner/name``) inside ``authors_dir``: a folder named ``name`` or
    ``owner+name`` (case-insensitive). Raises ``FileNotFoundError`` saying what is missing and where."""
    if not authors_dir or not os.path.isdir(authors_dir):
        raise FileNotFoundError(
            f"authors' code directory {authors_dir!r} does not exist (set --authors-dir or {AUTHORS_ENV} to a "
            "folder holding one checkout per repository)")
    wanted = {repo.split('/')[-1].lower(), repo.replace('/', '+').lower()}
    for entry in sorted(os.listdir(authors_dir)):
        path = os.path.join(authors_dir, entry)
        if entry.lower() in wanted and os.path.isdir(path):
            return path
    raise FileNotFoundError(
        f"no checkout of {repo} in {authors_dir!r}: expected a folder named {repo.split('/')[-1]!r} "
        f"(git clone https://github.com/{repo})")


def _import_authors_file(root: str, source: str, module_name: str) -> types.ModuleType:
    import timm.layers
    import timm.models
    import timm.models.registry
    path = os.path.join(root, source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: the checkout in {root!r} lacks {source}")
    before = set(sys.modules)
    saved = timm.models.register_model, timm.models.registry.register_model
    helpers = None
    if 'timm.models.layers.helpers' not in sys.modules:
        helpers = types.ModuleType('timm.models.layers.helpers')
        helpers.to_2tuple = timm.layers.to_2tuple
        sys.modules[helpers.__name__] = helpers
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    sys.path.insert(0, root)
    timm.models.register_model = timm.models.registry.register_model = lambda fn: fn
    try:
        spec.loader.exec_module(module)
    finally:
        timm.models.register_model, timm.models.registry.register_model = saved
        sys.path.remove(root)
        if helpers is not None:
            sys.modules.pop(helpers.__name__, None)
        for name in set(sys.modules) - before:  # the repository's own packages (`models`, `modules`, ...)
            file = getattr(sys.modules[name], '__file__', None) or ''
            if os.path.abspath(file).startswith(os.path.abspath(root) + os.sep):
                del sys.modules[name]
    return module


def load_authors_model(authors_dir: str, network: ComparedNetwork) -> nn.Module:
    """The authors' own ``network``, built by their constructor from their checkout in ``authors_dir``."""
    root = find_authors_repo(authors_dir, network.repo)
    module = _import_authors_file(root, network.source, '_dynzoo_authors_' + network.model)
    return getattr(module, network.constructor)(**network.kwargs)


def authors_weights_in_dynzoo(authors: nn.Module, name: str) -> nn.Module:
    """dynzoo's ``name`` with the authors' network's weights, loaded as a user loads the authors' release."""
    import timm
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'authors.pth')
        torch.save(authors.state_dict(), path)
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))


@torch.no_grad()
def _parity(authors: nn.Module, model: nn.Module, img_size: int) -> float:
    x = torch.randn(2, 3, img_size, img_size)
    ref = authors.eval()(x)
    return float((model.eval()(x) - ref).abs().max()) / max(1.0, float(ref.abs().max()))


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_compare(
        models: Sequence[str] = tuple(n.model for n in COMPARED),
        authors_dir: Optional[str] = None,
        batch_sizes: Sequence[int] = (1, 32),
        train_batch_sizes: Sequence[int] = (16,),
        img_size: int = 224,
        repeats: int = 5,
        warmup: int = 1,
        threads: Optional[int] = 2,
        reparam: bool = True,
        device: str = 'cpu',
        amp: Optional[str] = None,
        channels_last: bool = False,
        compile_model: bool = False,
        quiet: bool = False,
) -> List[dict]:
    """One row per network and regime: median ms of each variant and its ratio to the static counterpart's
    (module docstring). ``authors_dir`` ``None``: dynzoo and the static counterpart only."""
    import timm
    import dynzoo

    by_name = {n.model: n for n in COMPARED}
    unknown = [m for m in models if m not in by_name]
    if unknown:
        raise ValueError(f'no compared network {unknown}; choose from {sorted(by_name)}')
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    rows: List[dict] = []
    for name in models:
        network = by_name[name]
        torch.manual_seed(0)
        authors, note, parity = None, None, None
        if authors_dir is not None:
            try:
                authors = load_authors_model(authors_dir, network)
            except FileNotFoundError as e:
                note = str(e)
                progress(f'[{name}] {note}', quiet)
        model = timm.create_model(name) if authors is None else authors_weights_in_dynzoo(authors, name)
        if authors is not None:
            parity = _parity(authors, model, min(img_size, 224))
        static_name = timm_counterpart(name)
        variants = [_Variant('authors', 'authors', authors, 'n/a')] if authors is not None else []
        variants += [_Variant('dynzoo', 'dynamic', model, 'auto')]
        if reparam:
            variants.append(_Variant('dynzoo_reparam', 'dynamic', dynzoo.reparameterize(model), 'auto'))
        variants.append(_Variant('static', 'static', timm.create_model(static_name), 'n/a'))
        params = {v.label: _count(v.model) for v in variants}
        plan = [('eval', b) for b in batch_sizes] + [('train', b) for b in train_batch_sizes]
        for mode, batch in plan:
            run = [v for v in variants if mode == 'eval' or v.label != 'dynzoo_reparam']
            x = torch.randn(batch, 3, img_size, img_size, device=dev).contiguous(memory_format=fmt)
            fns = [_prepare(v, mode, x, 1000, amp, channels_last, compile_model) for v in run]
            wall, _, _ = _measure(run, fns, dev, repeats, warmup, False,
                                  lambda msg: progress(f'[{name}] {mode} b{batch} {msg}', quiet))
            ms = {v.label: statistics.median(wall[v.label]) * 1e3 for v in run}
            rows.append(dict(
                network=network.label, model=name, static=static_name, authors_repo=network.repo, mode=mode,
                batch_size=batch, img_size=img_size, time_ms=ms,
                ratio_static={k: t / ms['static'] for k, t in ms.items()},
                authors_over_dynzoo=ms['authors'] / ms['dynzoo'] if 'authors' in ms else None,
                params=params, authors_vs_dynzoo_max_rel_diff=parity, authors_note=note))
    return rows


def _cell(ratios: Dict[str, float], key: str) -> str:
    return f'{ratios[key]:.2f}' if key in ratios else 'n/a'


def compare_markdown(rows: Sequence[dict]) -> str:
    """The issue's table (``authors / dynzoo`` time over the static counterpart's, per regime), the reparameterized
    model's eval ratios, then the milliseconds, speed-ups over the authors' code and parity of every row."""
    regimes = list(dict.fromkeys((r['mode'], r['batch_size']) for r in rows))
    names = list(dict.fromkeys(r['model'] for r in rows))
    by_key = {(r['model'], r['mode'], r['batch_size']): r for r in rows}
    head = '| network (vs) | ' + ' | '.join(f'{m} b{b}: authors / dynzoo' for m, b in regimes) + \
        ' | ' + ' | '.join(f'reparam {m} b{b}' for m, b in regimes if m == 'eval') + ' |'
    lines = [head, '|' + '---|' * (1 + len(regimes) + sum(m == 'eval' for m, _ in regimes))]
    for name in names:
        first = next(r for r in rows if r['model'] == name)
        cells = []
        for m, b in regimes:
            r = by_key.get((name, m, b))
            cells.append('n/a' if r is None else
                         f"{_cell(r['ratio_static'], 'authors')} / {_cell(r['ratio_static'], 'dynzoo')}")
        for m, b in regimes:
            if m == 'eval':
                r = by_key.get((name, m, b))
                cells.append('n/a' if r is None else _cell(r['ratio_static'], 'dynzoo_reparam'))
        lines.append(f"| {first['network']} ({first['static']}) | " + ' | '.join(cells) + ' |')
    lines += ['', '| network | regime | authors ms | dynzoo ms | reparam ms | static ms | authors / dynzoo |',
              '|---|---|---|---|---|---|---|']
    for r in rows:
        t = r['time_ms']
        fmt = {k: f'{v:.1f}' for k, v in t.items()}
        speed = 'n/a' if r['authors_over_dynzoo'] is None else f"{r['authors_over_dynzoo']:.2f}x"
        lines.append(f"| {r['network']} | {r['mode']} b{r['batch_size']} | {fmt.get('authors', 'n/a')} | "
                     f"{fmt['dynzoo']} | {fmt.get('dynzoo_reparam', 'n/a')} | {fmt['static']} | {speed} |")
    lines += ['', '| network | params: authors / dynzoo / static | authors vs dynzoo max rel diff | note |',
              '|---|---|---|---|']
    for name in names:
        r = next(r for r in rows if r['model'] == name)
        params = ' / '.join(f"{r['params'][k]:,}" if k in r['params'] else 'n/a'
                            for k in ('authors', 'dynzoo', 'static'))
        diff = 'n/a' if r['authors_vs_dynzoo_max_rel_diff'] is None else f"{r['authors_vs_dynzoo_max_rel_diff']:.1e}"
        lines.append(f"| {r['network']} | {params} | {diff} | {r['authors_note'] or ''} |")
    return '\n'.join(lines)


def write_compare(rows: Sequence[dict], out_dir: str, command: str = '', stem: str = 'compare',
                  extra: Optional[dict] = None) -> Dict[str, str]:
    """``{stem}.json`` (environment, command, rows) and ``{stem}.md`` (:func:`compare_markdown`) in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    env = environment()
    paths = {'json': os.path.join(out_dir, stem + '.json'), 'md': os.path.join(out_dir, stem + '.md')}
    with open(paths['json'], 'w') as f:
        json.dump(dict(environment=env, command=command, rows=list(rows), **(extra or {})), f, indent=2)
    with open(paths['md'], 'w') as f:
        f.write(f'# dynzoo bench compare\n\n`{command}`\n\n' + 'Environment: ' +
                ', '.join(f'{k} {v}' for k, v in env.items()) + '\n\n' +
                'Time over the static counterpart\'s time in the same regime, median of interleaved rounds, '
                'wall clock (lower is better).\n\n' + compare_markdown(rows) + '\n')
    return paths


def recorded_command(prog: str, argv: Sequence[str]) -> str:
    """The command line as the report records it, with the ``--authors-dir`` folder written as the placeholder
    ``AUTHORS_DIR``: the authors' checkouts lie outside the repository, and a report names no path of the machine
    it ran on."""
    words: List[str] = []
    hide_next = False
    for word in argv:
        if hide_next:
            words.append('AUTHORS_DIR')
            hide_next = False
        elif word == '--authors-dir':
            words.append(word)
            hide_next = True
        elif word.startswith('--authors-dir='):
            words.append('--authors-dir=AUTHORS_DIR')
        else:
            words.append(word)
    return ' '.join([prog] + words)


def build_parser(prog: str = 'dynzoo bench compare') -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split('\n')[0])
    p.add_argument('models', nargs='*', default=[n.model for n in COMPARED],
                   help='compared networks (default: %(default)s)')
    p.add_argument('--authors-dir', default=os.environ.get(AUTHORS_ENV),
                   help=f"folder with one checkout per authors' repository (default: ${AUTHORS_ENV}; "
                        "none: dynzoo and the static counterpart only)")
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 32], help='eval batch sizes')
    p.add_argument('--train-batch-sizes', type=int, nargs='*', default=[16], help='train-step batch sizes')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--repeats', type=int, default=5, help='interleaved timed rounds (median)')
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--quick', action='store_true', help='2 rounds, no reparameterized row (a first look)')
    p.add_argument('--no-reparam', action='store_true', help="skip dynzoo's reparameterized model")
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--out', default='bench_out', help='output directory (compare.json, compare.md)')
    p.add_argument('--quiet', action='store_true')
    return p


def main(argv: Optional[Sequence[str]] = None, prog: str = 'dynzoo bench compare') -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    if args.authors_dir is not None and not os.path.isdir(args.authors_dir):
        print(f"{prog}: authors' code directory {args.authors_dir!r} does not exist", file=sys.stderr)
        return 2
    try:
        rows = run_compare(args.models, args.authors_dir, args.batch_sizes, args.train_batch_sizes, args.img_size,
                           2 if args.quick else args.repeats, args.warmup, args.threads,
                           reparam=not (args.quick or args.no_reparam), quiet=args.quiet)
    except ValueError as e:
        print(f'{prog}: {e}', file=sys.stderr)
        return 2
    paths = write_compare(rows, args.out, recorded_command(prog, argv))
    print(compare_markdown(rows))
    print('\nwrote ' + ', '.join(paths.values()))
    return 0
