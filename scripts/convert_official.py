#!/usr/bin/env python
"""Same as `dynzoo convert`: see `dynzoo.tools.convert` and docs/weights.md."""
import sys

from dynzoo.tools.convert import cli_main

if __name__ == '__main__':
    sys.exit(cli_main(sys.argv[1:]))
