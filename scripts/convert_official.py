#!/usr/bin/env python
"""Same as `dynzoo convert`: see `dynzoo.tools.convert` and docs/weights.md."""
import sys

from dynzoo.tools.convert import main

if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
