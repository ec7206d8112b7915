"""``python -m dynzoo`` = the ``dynzoo`` command (:mod:`dynzoo.cli`); ``torchrun ... -m dynzoo train`` for DDP."""
import sys

from dynzoo.cli import main

if __name__ == '__main__':
    sys.exit(main())
