#!/usr/bin/env python
"""Run timm's own ``tests/test_models.py`` (from the sdist of the installed timm) against dynzoo's models.

The sdist is fetched once from the package index (``pip download --no-binary :all: timm==<installed>``) into
``.cache/timm-sdist``; its ``tests/test_models.py`` runs with a conftest that imports dynzoo (so dynzoo's models
are registered before collection) and ``-k`` restricted to dynzoo's model names. Offline otherwise.

    python scripts/run_timm_model_tests.py [--models attnet_t1 dmf_xxs] [-- extra pytest args]
"""
import argparse
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / '.cache' / 'timm-sdist'

CONFTEST = '''\
import os

import pytest
import torch

import dynzoo  # noqa: F401  -- registers dynzoo's models with timm before test collection

if os.environ.get('PYTEST_XDIST_WORKER'):
    torch.set_num_threads(1)


# timm downloads the weights of every pretrained tag in these two tests (it skips them on its own CI): dynzoo's
# pretrained tags are upcycled from timm's static hub files, and tests/test_pretrained_tags.py makes the same calls
# (in_chans=1, another num_classes, features_only) against a Hugging Face cache on disk
NEEDS_NETWORK = ('test_model_load_pretrained', 'test_model_features_pretrained')


def _default_tag(name):
    from timm.models import get_pretrained_cfg
    arch, _, tag = name.partition('.')
    return not tag or get_pretrained_cfg(arch).tag == tag


def pytest_collection_modifyitems(config, items):
    # keep every test of one model on one xdist worker (--dist loadgroup); of a model's many tags (an upcycled
    # model has one per pretrained tag of its static source, the same architecture and cfg fields as the source's,
    # checked tag by tag in dynzoo's own tests), timm's per-tag tests run on the default tag
    kept, dropped = [], []
    for item in items:
        name = getattr(getattr(item, 'callspec', None), 'params', {}).get('model_name')
        if name and (item.originalname in NEEDS_NETWORK or not _default_tag(str(name))):
            dropped.append(item)
            continue
        if name:
            item.add_marker(pytest.mark.xdist_group(str(name).split('.')[0]))
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
'''


def fetch_sdist(version: str) -> Path:
    """Unpacked timm sdist for ``version`` (downloaded once)."""
    target = CACHE / f'timm-{version}'
    if (target / 'tests' / 'test_models.py').is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    archive = CACHE / f'timm-{version}.tar.gz'
    if not archive.is_file():
        subprocess.run(
            [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--no-binary', ':all:',
             f'timm=={version}', '-d', str(CACHE)], check=True)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f'timm-{version}/tests/')]
        tar.extractall(CACHE, members=members, filter='data')
    return target


def main() -> int:
    import timm
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', nargs='*', default=None, help='dynzoo model names (default: all)')
    p.add_argument('-n', '--workers', type=int, default=0, help='pytest-xdist workers (0: none)')
    p.add_argument('--chunk', type=int, default=10, help='models per pytest process (default: 10)')
    p.add_argument('pytest_args', nargs=argparse.REMAINDER)
    args = p.parse_args()
    sdist = fetch_sdist(timm.__version__)
    tests = sdist / 'tests'
    (tests / 'conftest.py').write_text(CONFTEST)
    if args.models:
        names = args.models
    else:
        import dynzoo
        names = dynzoo.list_dynzoo_models()
    extra = [a for a in args.pytest_args if a != '--']
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    print(f'timm {timm.__version__} upstream model tests on {len(names)} dynzoo models', flush=True)
    # a fresh pytest process per chunk of models: a worker that builds every model of the zoo one after another
    # grew to 12 GiB and was killed by the OOM killer
    failed = []
    for start in range(0, len(names), args.chunk):
        chunk = names[start:start + args.chunk]
        cmd = [sys.executable, '-m', 'pytest', str(tests / 'test_models.py'), '-p', 'no:cacheprovider',
               '-k', ' or '.join(chunk), '-q', '-W', 'ignore::pytest.PytestUnknownMarkWarning', *extra]
        if args.workers:
            cmd += ['-n', str(args.workers), '--dist', 'loadgroup']
        print(f'models {start + 1}-{start + len(chunk)} of {len(names)}: {" ".join(chunk)}', flush=True)
        if subprocess.call(cmd, cwd=str(sdist), env=env) != 0:
            failed.append(' '.join(chunk))
    for chunk in failed:
        print(f'FAILED: timm test_models on {chunk}', flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
