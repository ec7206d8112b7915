"""Run timm's own, unmodified command-line scripts with dynzoo's models registered.

``dynzoo timm SCRIPT.py ARGS...`` imports :mod:`dynzoo` (which registers every model with timm) and runs the
script as ``__main__``, exactly as ``python SCRIPT.py ARGS...`` would: ``sys.argv`` is ``[SCRIPT.py, ARGS...]`` and
the script's folder is first on ``sys.path``. It works under ``torchrun`` too
(``torchrun --nproc_per_node 8 -m dynzoo timm train.py ...``): every rank runs the script the same way.

``SCRIPT`` is a path, or the name of a script in ``$TIMM_SCRIPTS_DIR`` (``train.py``, ``validate.py``,
``benchmark.py``, ``inference.py``, ``onnx_export.py``, ``onnx_validate.py``: timm ships them in its git repository,
huggingface/pytorch-image-models, not in its wheel).
"""
import argparse
import os
import runpy
import sys
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ['SCRIPTS_ENV', 'TIMM_SCRIPTS', 'scripts_dir', 'find_script', 'run_script', 'build_parser', 'main']

SCRIPTS_ENV = 'TIMM_SCRIPTS_DIR'
TIMM_SCRIPTS = ('train.py', 'validate.py', 'benchmark.py', 'inference.py', 'onnx_export.py', 'onnx_validate.py')


def scripts_dir() -> Optional[Path]:
    """``$TIMM_SCRIPTS_DIR``, or ``None`` when unset."""
    value = os.environ.get(SCRIPTS_ENV)
    return Path(value) if value else None


def find_script(script: str) -> Path:
    """``script`` as an existing file, else ``$TIMM_SCRIPTS_DIR/<script>[.py]``; a clear error otherwise."""
    path = Path(script)
    if path.is_file():
        return path.resolve()
    folder = scripts_dir()
    if folder is not None and path.parent == Path('.'):
        for candidate in (folder / script, folder / f'{script}.py'):
            if candidate.is_file():
                return candidate.resolve()
        raise FileNotFoundError(f'no timm script {script!r} in ${SCRIPTS_ENV}={folder}')
    raise FileNotFoundError(
        f'no timm script {script!r}: give its path, or set ${SCRIPTS_ENV} to the folder holding timm\'s scripts '
        '(a checkout of huggingface/pytorch-image-models)')


def run_script(script: str, argv: Sequence[str] = ()) -> int:
    """Run ``script`` as ``__main__`` with ``argv`` and dynzoo's models registered; returns its exit status.

    ``sys.argv`` and ``sys.path`` are restored afterwards, so several scripts can run in one process.
    """
    import dynzoo  # noqa: F401  (registers the zoo with timm)
    path = find_script(script)
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(path), *argv]
    sys.path.insert(0, str(path.parent))
    try:
        runpy.run_path(str(path), run_name='__main__')
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='dynzoo timm', description=__doc__.split('\n\n')[0],
        epilog=f'Scripts found in ${SCRIPTS_ENV}: {", ".join(TIMM_SCRIPTS)}. Everything after SCRIPT goes to it '
               '(`dynzoo timm train.py --help` prints the script\'s own help).')
    p.add_argument('script', metavar='SCRIPT', help='path of a timm script, or its name in $TIMM_SCRIPTS_DIR')
    p.add_argument('args', metavar='ARGS', nargs=argparse.REMAINDER, help='the script\'s own arguments')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``dynzoo timm SCRIPT ARGS...``."""
    argv: List[str] = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith('-'):  # --help, or a usage error: argparse answers and exits
        build_parser().parse_args(argv)
    try:
        path = find_script(argv[0])
    except FileNotFoundError as e:
        print(f'dynzoo timm: error: {e}', file=sys.stderr)
        return 2
    return run_script(str(path), argv[1:])


if __name__ == '__main__':
    sys.exit(main())
