"""The jobs behind the ``dynzoo`` command line: training, benchmarks, export, conversion and publishing.

Each is its own module with a ``main(argv)``; :mod:`dynzoo.cli` is the one entry point.
"""
