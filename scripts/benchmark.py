#!/usr/bin/env python
"""Zoo benchmark: dynamic models beside their static twins and timm counterparts (see ``dynzoo/bench.py``).

Same options as ``dynzoo bench``. The command that produced BENCHMARKS.md:

    python scripts/benchmark.py fmdconv_resnet18 odconv_resnet18 --batch-sizes 1 32 --train-batch-sizes 32 \
        --repeats 5 --threads 2 --accuracy fmdconv_resnet18=73.21 odconv_resnet18=73.09 --layers --out bench_out
"""
import sys

from dynzoo.bench import cli_main

if __name__ == '__main__':
    sys.exit(cli_main(sys.argv[1:], prog='scripts/benchmark.py'))
