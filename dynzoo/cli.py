"""The ``dynzoo`` command line, the one entry point: ``dynzoo [--version] VERB ...`` (also ``python -m dynzoo``).

``list``, ``info``, ``report`` and ``weights`` (with ``weights add`` / ``weights remove``: the user's index)
live here; ``train``, ``bench``, ``export``, ``convert``,
``publish`` and ``timm`` (timm's own scripts, :mod:`dynzoo.tools.timm_scripts`) are the tools of
:mod:`dynzoo.tools`, each with its own ``main(argv)`` this module delegates to (imported lazily, so ``dynzoo list``
does not load the training stack). A bad request (unknown model, missing file, bad value) ends in one line on
stderr and exit status 2.
"""
import argparse
import importlib
import json
import os
import sys
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

__all__ = ['main', 'build_parser', 'format_table', 'model_rows', 'param_breakdown', 'paper_match', 'is_miss',
           'usage_error', 'weights_rows', 'TOOLS']

# verb -> (the dynzoo.tools module whose main(argv) runs it, help line)
TOOLS = {
    'bench': ('dynzoo.tools.bench', 'measure train/eval speed, memory, params and MACs against static twins'),
    'export': ('dynzoo.tools.export', 'export a model to ONNX or TorchScript'),
    'convert': ('dynzoo.tools.convert', "convert an authors' checkpoint to a dynzoo safetensors file"),
    'publish': ('dynzoo.tools.publish', 'write (and push) a timm-format hub folder'),
    'train': ('dynzoo.tools.train', 'train / fine-tune with timm components and a YAML recipe (torchrun for DDP)'),
    'timm': ('dynzoo.tools.timm_scripts', "run one of timm's own scripts (train.py, validate.py ...) with the zoo"),
}

# what a tool raises for a bad request (a missing file, an unknown name, a bad value): one line, no traceback.
# Anything else is a bug and keeps its traceback; DYNZOO_TRACEBACK=1 shows it for these too.
_USAGE_ERRORS = (OSError, ValueError, KeyError)
# verbs that run another program (a timm script): its failures keep their tracebacks; the verb reports its own
# usage errors
_PASS_THROUGH = ('timm',)


def format_table(rows: Sequence[Dict[str, object]], columns: Optional[Sequence[str]] = None,
                 markdown: bool = False) -> str:
    """Render rows as an aligned terminal table (or a Markdown table)."""
    if not rows:
        return '(no rows)'
    columns = list(columns or rows[0].keys())
    cells = [[str(r.get(c, '')) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]

    def _is_num(s: str) -> bool:
        return s.replace(',', '').replace('.', '').replace('-', '').replace('+', '').replace('%', '').isdigit()

    numeric = [any(_is_num(row[i]) for row in cells) and all(_is_num(row[i]) or row[i] in ('-', '')
                                                              for row in cells) for i in range(len(columns))]

    def fmt(values):
        out = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return ('| ' + ' | '.join(out) + ' |') if markdown else '  '.join(out).rstrip()

    header = fmt(columns)
    sep = ('|' + '|'.join('-' * (w + 2) for w in widths) + '|') if markdown else '  '.join('-' * w for w in widths)
    return '\n'.join([header, sep] + [fmt(r) for r in cells])


# MAC convention each family's paper counts with (dynzoo.utils.flops conventions): (convention, train_mode)
_MAC_CONVENTIONS = {'attnet': ('fvcore', True), 'dmf': ('fvcore', False)}


def _rounding_unit(value: int) -> int:
    unit = 1
    while value % (unit * 10) == 0:
        unit *= 10
    return unit


def is_rounded_figure(value: float) -> bool:
    """A figure with at least four trailing zeros (44,900,000 = "44.9 M") is a rounded print."""
    return _rounding_unit(int(round(value))) >= 10_000


def paper_match(computed: float, paper: Optional[float]) -> str:
    """Compare a computed count with a paper's figure at the precision the paper printed it.

    A rounded print (:func:`is_rounded_figure`) matches when the computed count rounds to it: ``'~'``. Any other
    figure is exact (from the authors' code or a table printed in full) and must be equal: ``'exact'``. Otherwise
    the difference is returned (``'+51,208'``); ``'-'`` where the paper gives no figure.
    """
    if not paper:
        return '-'
    computed, paper = int(round(computed)), int(round(paper))
    if is_rounded_figure(paper):
        return '~' if abs(computed - paper) <= _rounding_unit(paper) // 2 else f'{computed - paper:+,}'
    return 'exact' if computed == paper else f'{computed - paper:+,}'


def is_miss(match: str) -> bool:
    """Whether a :func:`paper_match` result is a miss (neither a match nor "no figure")."""
    return match not in ('exact', '~', '-')


def _relative(computed: float, paper: float) -> str:
    return f'{100.0 * (computed - paper) / paper:+.1f}%'


def _progress(i: int, n: int, name: str) -> None:
    """``[i/n] name`` on stderr: a line per step, or on a terminal one line rewritten in place."""
    line = f'[{i}/{n}] {name}'
    if sys.stderr.isatty():
        print('\r' + line.ljust(72), end='\n' if i == n else '', file=sys.stderr, flush=True)
    else:
        print(line, file=sys.stderr, flush=True)


def _count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _weights_status(name: str) -> str:
    from dynzoo.models import _hub as hub
    status = [f"{e.get('tag')}:{e.get('status')}" for e in hub.entries_for(name)]
    upcycled = _upcycled_tags(name)
    if upcycled:
        status.append(f'upcycled:{len(upcycled)} tags from {upcycled[0].partition(".")[0]}')
    return ', '.join(status) or 'none'


def model_rows(names: Optional[Sequence[str]] = None, device: str = 'meta',
               progress: bool = False) -> List[Dict[str, object]]:
    """One row per model: family, paper, computed params, the paper's params, weights status (``progress``: a
    line per model built, on stderr)."""
    import timm
    import torch
    from dynzoo.models import FAMILIES, MODEL_INFO
    rows = []
    names = list(names or sorted(MODEL_INFO))
    for i, name in enumerate(names, 1):
        if progress:
            _progress(i, len(names), name)
        info = MODEL_INFO.get(name, {})
        with torch.device(device):
            model = timm.create_model(name)
        params = _count_params(model)
        paper = info.get('paper_params')
        rows.append(OrderedDict(
            model=name,
            family=info.get('family', '?'),
            params=f'{params:,}',
            paper=f'{paper:,}' if paper else '-',
            match=paper_match(params, paper),
            weights=_weights_status(name),
            paper_ref=FAMILIES.get(info.get('family'), {}).get('paper_ids', ''),
        ))
    return rows


def param_breakdown(model) -> List[Dict[str, object]]:
    """Parameters per top-level part, split into kernel banks, attention heads and static parameters."""
    from dynzoo.layers.dynamic import DynamicConv2dBase
    rows = []
    total = _count_params(model)
    for part, module in model.named_children():
        n_all = _count_params(module)
        if n_all == 0:
            continue
        bank = heads = 0
        for m in module.modules():
            if isinstance(m, DynamicConv2dBase):
                own = m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                bank += own
                heads += _count_params(m) - own
        rows.append(OrderedDict(
            part=part, params=f'{n_all:,}', kernel_banks=f'{bank:,}', attention=f'{heads:,}',
            static=f'{n_all - bank - heads:,}', share=f'{100.0 * n_all / max(total, 1):.1f}%'))
    return rows


def _cmd_list(args) -> int:
    import dynzoo  # noqa: F401  (registers the models)
    names = [n for n in dynzoo.list_dynzoo_models() if not args.family or n.startswith(args.family)]
    if not names:
        print(f'no dynzoo model matches family {args.family!r}', file=sys.stderr)
        return 2
    rows = model_rows(names, progress=True)
    print(format_table(rows, markdown=args.markdown))
    print(f'\n{len(rows)} models; params computed by building each model (1000 classes); '
          '"paper" is the paper\'s or authors\' code\'s count where one is stated.')
    return 0


def _cmd_info(args) -> int:
    import timm
    import torch
    import dynzoo
    if args.name not in dynzoo.list_dynzoo_models():
        close = [n for n in dynzoo.list_dynzoo_models() if args.name.split('.')[0][:6] in n][:8]
        print(f'unknown dynzoo model {args.name!r}' + (f'; did you mean: {", ".join(close)}' if close else ''),
              file=sys.stderr)
        return 2
    from dynzoo.models import FAMILIES, MODEL_INFO
    with torch.device('meta'):
        model = timm.create_model(args.name)
    info = MODEL_INFO.get(args.name, {})
    fam = FAMILIES.get(info.get('family'), {})
    print(f'{args.name}  ({info.get("family")}: {fam.get("paper", "")})')
    print(f'  paper ids: {fam.get("paper_ids", "")}')
    total = _count_params(model)
    paper = info.get('paper_params')
    print(f'  params: {total:,}' + (f'   paper/authors: {paper:,} ({info.get("source", "")})' if paper else ''))
    cfg = dict(model.pretrained_cfg)
    keys = ('architecture', 'tag', 'hf_hub_id', 'input_size', 'crop_pct', 'interpolation', 'mean', 'std',
            'num_classes', 'first_conv', 'classifier', 'license')
    print('\nconfig:')
    print(format_table([{'key': k, 'value': cfg.get(k)} for k in keys]))
    print('\nparameters by part:')
    print(format_table(param_breakdown(model)))
    from dynzoo.models import _hub as hub
    from dynzoo.models._builder import known_tags, upcycled_source
    print('\npretrained tags (the first is the default):')
    tag_rows = []
    for tag in known_tags(args.name):
        e = hub.find_entry(args.name, tag)
        source_tag = upcycled_source(args.name, tag)
        if e is not None:
            src = e.get('source') or {}
            status, source = e.get('status'), e.get('file') or src.get('url') or src.get('from') or ''
        elif source_tag is not None:
            status, source = 'upcycled', f'{source_tag} ({timm.get_pretrained_cfg(source_tag).hf_hub_id})'
        else:
            status, source = 'no checkpoint', ''
        license_ = timm.get_pretrained_cfg(f'{args.name}.{tag}').license or 'unknown'
        tag_rows.append({'tag': f'{args.name}.{tag}', 'status': status, 'license': license_, 'source': source})
    print(format_table(tag_rows))
    return 0


def _upcycled_tags(name: str) -> List[str]:
    """``name``'s upcycled tags in force (:func:`dynzoo.models._builder.upcycled_source`) as their source tags."""
    from dynzoo.models._builder import upcycle_sources, upcycled_source
    return [t for t in upcycle_sources(name) if upcycled_source(name, t.partition('.')[2]) is not None]


def weights_rows() -> List[Dict[str, object]]:
    """Every pretrained tag with weights: the index entries in force (``layer``: the base index or the user's) and
    the upcycled tags (``layer`` ``timm``: the static source's hub file, its sha256 once pinned)."""
    import timm
    import dynzoo
    from dynzoo.models import _hub as hub
    rows = []
    for path, e in hub.entries_in_force():
        metrics = {m.get('name'): m.get('value') for m in e.get('metrics') or [] if isinstance(m, dict)}
        src = e.get('source') or {}
        rows.append(OrderedDict(
            model=hub.entry_name(e), status=e.get('status'),
            layer='user' if path == hub.user_index_path() else 'base',
            weights=e.get('file') or e.get('hf_hub_id') or '-', sha256=(e.get('sha256') or '-')[:12],
            license=e.get('license', '-'), top1=metrics.get('top1', '-'),
            source=src.get('url') or src.get('from') or src.get('recipe') or '-'))
    pins = hub.pins_path()
    pinned = json.loads(pins.read_text(encoding='utf-8')) if pins.is_file() else {}
    for name in dynzoo.list_dynzoo_models():
        for source_tag in _upcycled_tags(name):
            cfg = timm.get_pretrained_cfg(source_tag)
            pin = pinned.get(f'{cfg.hf_hub_id}/{cfg.hf_hub_filename or hub.WEIGHTS_NAME}@main') or {}
            rows.append(OrderedDict(
                model=f'{name}.{source_tag.partition(".")[2]}', status='upcycled', layer='timm',
                weights=cfg.hf_hub_id, sha256=(pin.get('sha256') or 'not pinned')[:12],
                license=cfg.license or 'unknown', top1='-', source=source_tag))
    return rows


def _cmd_weights(args) -> int:
    from dynzoo.models import _hub as hub
    rows = weights_rows()
    if not args.upcycled:
        rows = [r for r in rows if r['status'] != 'upcycled']
    user = hub.user_index_path()
    print(f'weights index: {hub.index_path()}; yours, over it: {user}' + ('' if user.exists() else ' (none yet)'))
    print(format_table(rows, markdown=args.markdown) if rows else '(no entries)')
    if not args.upcycled:
        print('(the upcycled tags, starts from timm\'s static checkpoints: `dynzoo weights --upcycled`)')
    return 0


def _cmd_weights_add(args) -> int:
    from dynzoo.models import _hub as hub
    from dynzoo.tools.publish import index_weights, update_index
    entry = index_weights(args.name, args.source, license_=args.license, dataset=args.dataset,
                          num_classes=args.num_classes, filename=args.filename)
    update_index(hub.user_index_path(), entry)
    print(f'added {args.name} (sha256 {entry["sha256"]}, {entry["size"]:,} bytes, license {entry["license"]}) '
          f'to {hub.user_index_path()}: timm.create_model({args.name!r}, pretrained=True) loads it')
    return 0


def _cmd_weights_remove(args) -> int:
    from dynzoo.models import _hub as hub
    from dynzoo.tools.publish import remove_from_index, split_name
    model, tag = split_name(args.name)
    if not any(path == hub.user_index_path() and (e.get('model'), e.get('tag')) == (model, tag)
               for path, e in hub.entries_in_force()):
        listed = hub.find_entry(model, tag) is not None
        raise KeyError(f'your weights index ({hub.user_index_path()}) lists no {args.name}'
                       + (f'; it is in {hub.index_path()}, which `dynzoo weights remove` does not edit' if listed
                          else ''))
    remove_from_index(hub.user_index_path(), model, tag)
    print(f'removed {args.name} from {hub.user_index_path()}')
    return 0


def _cmd_report(args) -> int:
    """The zoo report: build every model, run it, and check its parameters and MACs against its paper's figures.

    Each figure is compared at the precision the paper printed it (:func:`paper_match`); MACs are compared at the
    model's own resolution only. A miss is flagged ``MISS`` and listed under the table with the figure's source,
    which names where the paper contradicts itself. The exit status is 1 when a forward pass fails or an exact
    figure (the authors' code) is missed -- dynzoo then differs from the authors -- and, with ``--strict``, on
    any miss.
    """
    import timm
    import torch
    import dynzoo
    from dynzoo.models import MODEL_INFO
    torch.manual_seed(0)
    names = [n for n in dynzoo.list_dynzoo_models() if not args.family or n.startswith(args.family)]
    try:
        from dynzoo.utils.flops import count_macs
    except ImportError:  # the counter is optional for the report
        count_macs = None
    rows, misses, failures = [], [], 0
    t_start = time.time()
    for i, name in enumerate(names, 1):
        info = MODEL_INFO.get(name, {})
        _progress(i, len(names), name)
        t0 = time.time()
        model = timm.create_model(name).eval()
        params = _count_params(model)
        own_size = model.pretrained_cfg['input_size'][-1]
        size = args.img_size or own_size
        x = torch.randn(1, 3, size, size)
        with torch.inference_mode():
            out = model(x)
        ok_out = tuple(out.shape) == (1, model.num_classes) and bool(torch.isfinite(out).all())
        paper, paper_macs = info.get('paper_params'), info.get('paper_macs')
        match = paper_match(params, paper)
        macs = None
        if count_macs is not None and not args.no_macs:
            convention, train_mode = _MAC_CONVENTIONS.get(info.get('family'), ('macs', False))
            try:
                macs, _ = count_macs(model, (3, size, size), convention=convention, train_mode=train_mode)
            except Exception as e:  # report it, do not hide it
                macs = f'error: {type(e).__name__}'
        counted = isinstance(macs, (int, float))
        macs_match = paper_match(macs, paper_macs) if counted and size == own_size else '-'
        missed = [(what, computed, figure) for what, computed, figure, m in (
            ('params', params, paper, match), ('MACs', macs, paper_macs, macs_match)) if is_miss(m)]
        hard = not ok_out or (is_miss(match) and not is_rounded_figure(paper))
        failed = hard or (args.strict and bool(missed))
        failures += failed
        if missed:
            misses.append(f'{name}: ' + '; '.join(
                f'{what} {computed:,.0f} vs paper {figure:,.0f} ({_relative(computed, figure)})'
                for what, computed, figure in missed) + f' -- source: {info.get("source", "?")}')
        check = 'ok' if ok_out else 'FAILED forward'
        if missed:
            check = ('MISS ' if ok_out else check + ', MISS ') + '+'.join(what for what, _, _ in missed)
        rows.append(OrderedDict(
            model=name, family=info.get('family', '?'), params=f'{params:,}',
            paper_params=f'{paper:,.0f}' if paper else '-',
            vs_paper=match if not is_miss(match) else f'{match} ({_relative(params, paper)})',
            gmacs=(f'{macs / 1e9:.3f}' if counted else (macs or '-')),
            paper_gmacs=(f'{paper_macs / 1e9:.3f}' if paper_macs else '-'),
            vs_paper_macs=macs_match if not is_miss(macs_match) else _relative(macs, paper_macs),
            forward='ok' if ok_out else 'FAILED',
            check=check,
            weights=_weights_status(name),
            seconds=f'{time.time() - t0:.1f}'))
        del model
    print()
    print(format_table(rows, markdown=args.markdown))
    print(f'\n{len(rows)} models built and run at {args.img_size or "their default"} px in '
          f'{time.time() - t_start:.0f} s; {failures} failed a check; {len(misses)} miss a paper figure'
          + (' (at its printed precision):' if misses else '.'))
    for line in misses:
        print(f'  {line}')
    if args.output:
        with open(args.output, 'w', encoding='utf-8') as f:
            json.dump(rows, f, indent=2)
        print(f'wrote {args.output}')
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    from dynzoo import __version__
    p = argparse.ArgumentParser(prog='dynzoo', description='dynzoo: dynamic-convolution model zoo for timm')
    p.add_argument('--version', action='version', version=f'dynzoo {__version__}')
    sub = p.add_subparsers(dest='command', required=True)
    s = sub.add_parser('list', help='every model with family, params (computed vs paper) and weights status')
    s.add_argument('--family', default='', help='only models whose name starts with this')
    s.add_argument('--markdown', action='store_true')
    s.set_defaults(func=_cmd_list)
    s = sub.add_parser('info', help='config, per-part parameter breakdown and pretrained tags of one model')
    s.add_argument('name')
    s.set_defaults(func=_cmd_info)
    s = sub.add_parser('report', help='build and run every model, check params/MACs against the papers')
    s.add_argument('--family', default='')
    s.add_argument('--img-size', type=int, default=None, help='input resolution (default: each model\'s own)')
    s.add_argument('--no-macs', action='store_true')
    s.add_argument('--markdown', action='store_true')
    s.add_argument('--output', default=None, help='also write the rows as JSON here')
    s.add_argument('--strict', action='store_true', help='exit 1 on any miss of a paper figure, rounded ones too')
    s.set_defaults(func=_cmd_report)
    s = sub.add_parser('weights', help='list the pretrained weights (the weights index, yours over it, and the '
                                       'upcycled tags); add or remove your own')
    s.add_argument('--markdown', action='store_true')
    s.add_argument('--upcycled', action='store_true', help='also list the upcycled tags and their static source')
    s.set_defaults(func=_cmd_weights)
    w = s.add_subparsers(dest='action')
    a = w.add_parser('add', help='add your checkpoint as the pretrained tag MODEL.TAG (in your weights index)')
    a.add_argument('name', help='MODEL.TAG, e.g. attnet_xxs.digits')
    a.add_argument('source', help='a checkpoint file, or hf-hub:ORG/REPO[@REVISION]')
    a.add_argument('--license', default='', help='licence of the weights (default: unknown)')
    a.add_argument('--dataset', default='', help='dataset the weights were trained on (default: unknown)')
    a.add_argument('--num-classes', type=int, default=None,
                   help='class count of the checkpoint\'s classifier where no config.json beside it says it')
    a.add_argument('--filename', default='model.safetensors', help='the file in an hf-hub: repository')
    a.set_defaults(func=_cmd_weights_add)
    r = w.add_parser('remove', help='remove MODEL.TAG from your weights index')
    r.add_argument('name')
    r.set_defaults(func=_cmd_weights_remove)
    for verb, (_, help_text) in TOOLS.items():
        sub.add_parser(verb, help=help_text, add_help=False)
    return p


def usage_error(exc: BaseException) -> Optional[str]:
    """The one-line message of an exception that means a bad request, or ``None`` for any other (a bug)."""
    from dynzoo.models._hub import CheckpointError
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    if isinstance(exc, RuntimeError) and text.startswith('Unknown model ('):  # timm.create_model's message
        return f'unknown model {text[len("Unknown model ("):-1]!r}; `dynzoo list` shows the registered ones'
    if isinstance(exc, (CheckpointError,) + _USAGE_ERRORS):
        return text.splitlines()[0] if text else type(exc).__name__
    return None


def _run(verb: str, func, *args) -> int:
    """``func(*args)``, with a usage error reported as ``dynzoo VERB: error: ...`` and exit status 2."""
    try:
        return int(func(*args) or 0)
    except Exception as e:
        message = usage_error(e)
        if message is None or os.environ.get('DYNZOO_TRACEBACK'):
            raise
        print(f'dynzoo {verb}: error: {message}', file=sys.stderr)
        return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        module = importlib.import_module(TOOLS[argv[0]][0])
        if argv[0] in _PASS_THROUGH:
            return int(module.main(argv[1:]) or 0)
        return _run(argv[0], module.main, argv[1:])
    args = build_parser().parse_args(argv)
    return _run(args.command, args.func, args)


if __name__ == '__main__':
    sys.exit(main())
