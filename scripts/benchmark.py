#!/usr/bin/env python
"""Zoo benchmark (``dynzoo bench``, :mod:`dynzoo.tools.bench`): dynamic models beside their static counterparts.

Same options as ``dynzoo bench`` (``--help``). The commands that produced BENCHMARKS.md (run from the repository
root; about 7 and 2 minutes of CPU on an idle 2-core machine, much longer when it is shared):

    python scripts/benchmark.py fmdconv_resnet18 odconv_resnet18 --batch-sizes 1 32 --train-batch-sizes 32 \
        --repeats 3 --threads 1 --timer cpu --no-timm --accuracy fmdconv_resnet18=73.21 odconv_resnet18=73.09 \
        --layers fmdconv_resnet18 --out docs/benchmarks
    python scripts/benchmark.py fmdconv_resnet18 --layers-only --layer-batch-size 32 --repeats 3 --threads 1 \
        --timer cpu --out docs/benchmarks/layers_fresh

Beside the authors' code (``dynzoo bench compare``, :mod:`dynzoo.tools.bench.compare`; the regression guard of
BENCHMARKS.md's first table, a few minutes on an idle 2-core machine, ``--quick`` for 2 rounds)::

    python scripts/benchmark.py compare --authors-dir /path/to/authors --out docs/benchmarks/compare
"""
import sys

from dynzoo.tools.bench import main

if __name__ == '__main__':
    sys.exit(main(sys.argv[1:], prog='scripts/benchmark.py'))
