"""Integrations of dynzoo's layers into other frameworks, each behind its own optional extra.

* :mod:`dynzoo.integrations.ultralytics` -- SGDM in Ultralytics YOLO model YAMLs (``pip install 'dynzoo[ultralytics]'``).
"""
