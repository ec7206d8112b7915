#!/usr/bin/env python
"""Same as `dynzoo publish`: see `dynzoo.tools.publish` and docs/weights.md."""
import sys

from dynzoo.tools.publish import cli_main

if __name__ == '__main__':
    sys.exit(cli_main(sys.argv[1:]))
