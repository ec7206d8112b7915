#!/usr/bin/env python
"""Train / fine-tune a dynzoo model with timm's components (single process or ``torchrun`` DDP).

Same as ``dynzoo train``; see ``dynzoo.tools.train`` and ``docs/weights.md``.
"""
import sys

from dynzoo.tools.train import main

if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
