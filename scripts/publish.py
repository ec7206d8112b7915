#!/usr/bin/env python
"""Same as `dynzoo publish`: see `dynzoo.tools.publish` and docs/weights.md."""
import sys

from dynzoo.tools.publish import main

if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
