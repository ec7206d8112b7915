"""The ``dynzoo`` command line, the one entry point: ``dynzoo [--version] VERB ...`` (also ``python -m dynzoo``).

``list``, ``info``, ``report`` and ``weights`` live here; ``train``, ``bench``, ``export``, ``convert`` and
``publish`` are the tools of :mod:`dynzoo.tools`, each with its own ``main(argv)`` this module delegates to
(imported lazily, so ``dynzoo list`` does not load the training stack).
"""
import argparse
import importlib
import json
import sys
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

__all__ = ['main', 'build_parser', 'format_table', 'model_rows', 'param_breakdown', 'paper_match', 'TOOLS']

# verb -> (the dynzoo.tools module whose main(argv) runs it, help line)
TOOLS = {
    'bench': ('dynzoo.tools.bench', 'measure train/eval speed, memory, params and MACs against static twins'),
    'export': ('dynzoo.tools.export', 'export a model to ONNX or TorchScript'),
    'convert': ('dynzoo.tools.convert', "convert an authors' checkpoint to a dynzoo safetensors file"),
    'publish': ('dynzoo.tools.publish', 'write (and push) a timm-format hub folder'),
    'train': ('dynzoo.tools.train', 'train / fine-tune with timm components and a YAML recipe (torchrun for DDP)'),
}


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


def is_rounded_figure(value: int) -> bool:
    return _rounding_unit(int(value)) >= 10_000


def paper_match(computed: int, paper: Optional[int]) -> str:
    """Compare a computed count with a paper's figure at the precision the paper printed it.

    A figure with at least four trailing zeros (44,900,000 = "44.90 M") is a rounded print: it matches when the
    computed count rounds to it ("~"). Any other figure is exact (from the authors' code or a table printed in
    full) and must be equal ("exact"). Otherwise the difference is shown.
    """
    if not paper:
        return '-'
    if is_rounded_figure(paper):
        unit = _rounding_unit(paper)
        return '~' if abs(computed - paper) <= unit // 2 else f'{computed - paper:+,}'
    return 'exact' if computed == paper else f'{computed - paper:+,}'


def _count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _weights_status(name: str) -> str:
    from dynzoo.models import _hub as hub
    entries = hub.entries_for(name)
    if not entries:
        return 'none'
    return ', '.join(f"{e.get('tag')}:{e.get('status')}" for e in entries)


def model_rows(names: Optional[Sequence[str]] = None, device: str = 'meta') -> List[Dict[str, object]]:
    """One row per model: family, paper, computed params, the paper's params, weights status."""
    import timm
    import torch
    from dynzoo.models import FAMILIES, MODEL_INFO
    rows = []
    for name in names or sorted(MODEL_INFO):
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
    rows = model_rows(names)
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
    from dynzoo.models._builder import known_tags
    print('\npretrained tags:')
    tag_rows = []
    for tag in known_tags(args.name):
        e = hub.find_entry(args.name, tag)
        tag_rows.append({'tag': f'{args.name}.{tag}', 'status': e.get('status') if e else 'no checkpoint',
                         'source': (e.get('source') or {}).get('url', '') if e else ''})
    print(format_table(tag_rows))
    return 0


def _cmd_weights(args) -> int:
    from dynzoo.models import _hub as hub
    index = hub.load_index()
    rows = []
    for e in index['entries']:
        metrics = e.get('metrics') or {}
        if isinstance(metrics, list):  # schema of docs/weights.md: [{name, value, protocol, measured_by}]
            metrics = {m.get('name'): m.get('value') for m in metrics if isinstance(m, dict)}
        rows.append(OrderedDict(
            model=f"{e.get('model')}.{e.get('tag')}", status=e.get('status'),
            hub_id=e.get('hf_hub_id') or '-', sha256=(e.get('sha256') or '-')[:12],
            top1=metrics.get('top1', '-'), source=(e.get('source') or {}).get('url', '-')))
    print(f'weights index: {hub.index_path()}')
    print(format_table(rows, markdown=args.markdown) if rows else '(no entries)')
    return 0


def _cmd_report(args) -> int:
    """The zoo report: build every model, run it, and check it against its paper's numbers."""
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
    rows, failures = [], 0
    t_start = time.time()
    for i, name in enumerate(names, 1):
        info = MODEL_INFO.get(name, {})
        print(f'[{i}/{len(names)}] {name} ...', file=sys.stderr, flush=True)
        t0 = time.time()
        model = timm.create_model(name).eval()
        params = _count_params(model)
        size = args.img_size or model.pretrained_cfg['input_size'][-1]
        x = torch.randn(1, 3, size, size)
        with torch.inference_mode():
            out = model(x)
        ok_out = tuple(out.shape) == (1, model.num_classes) and bool(torch.isfinite(out).all())
        paper = info.get('paper_params')
        match = paper_match(params, paper)
        macs = None
        if count_macs is not None and not args.no_macs:
            convention, train_mode = _MAC_CONVENTIONS.get(info.get('family'), ('macs', False))
            try:
                macs, _ = count_macs(model, (3, size, size), convention=convention, train_mode=train_mode)
            except Exception as e:  # report it, do not hide it
                macs = f'error: {type(e).__name__}'
        paper_macs = info.get('paper_macs')
        # an exact figure (authors' code, full print) must be met; rounded prints are shown, not enforced
        ok = ok_out and (paper is None or is_rounded_figure(paper) or match == 'exact')
        failures += not ok
        rows.append(OrderedDict(
            model=name, family=info.get('family', '?'), params=f'{params:,}',
            paper_params=f'{paper:,}' if paper else '-',
            vs_paper=match,
            gmacs=(f'{macs / 1e9:.3f}' if isinstance(macs, (int, float)) else (macs or '-')),
            paper_gmacs=(f'{paper_macs / 1e9:.3f}' if paper_macs else '-'),
            forward='ok' if ok_out else 'FAILED',
            check='ok' if ok else 'FAILED',
            weights=_weights_status(name),
            seconds=f'{time.time() - t0:.1f}'))
        del model
    print()
    print(format_table(rows, markdown=args.markdown))
    print(f'\n{len(rows)} models built and run at {args.img_size or "their default"} px in '
          f'{time.time() - t_start:.0f} s; {failures} failed a check.')
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
    s.set_defaults(func=_cmd_report)
    s = sub.add_parser('weights', help='list the weights index')
    s.add_argument('--markdown', action='store_true')
    s.set_defaults(func=_cmd_weights)
    for verb, (_, help_text) in TOOLS.items():
        sub.add_parser(verb, help=help_text, add_help=False)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        module = importlib.import_module(TOOLS[argv[0]][0])
        return int(module.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == '__main__':
    sys.exit(main())
