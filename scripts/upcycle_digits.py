#!/usr/bin/env python
"""Upcycle static timm networks trained on scikit-learn's digits to dynamic ones, and fine-tune both starts.

Prints a table: the static source's accuracy, the upcycled network's at step 0 (equal), and the accuracy after the
same fine-tuning steps from the upcycled start and from random init. See ``dynzoo.tools.upcycle_digits`` and
``docs/upcycling.md``.
"""
import sys

from dynzoo.tools.upcycle_digits import main

if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
