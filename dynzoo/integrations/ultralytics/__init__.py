"""SGDM in Ultralytics YOLO detectors, as the SGDM paper uses it (Xing et al., §4.1).

``import dynzoo.integrations.ultralytics`` (or :func:`register`) makes the name ``SGDM`` usable in Ultralytics model
YAMLs, derives ``YOLO('yolov8n-sgdm.yaml')`` (or ``-sgdm-inline``) from the installed ``yolov8n.yaml`` at load time
(:func:`sgdm_model_cfg`; dynzoo ships no Ultralytics YAML) and makes ``DetectionModel.fuse()`` -- hence
Ultralytics' ``val``/``predict``/``export`` -- run SGDM's reparameterized form. Needs the ``ultralytics`` extra
(AGPL-3.0): ``pip install 'dynzoo[ultralytics]'``.
"""
try:
    import ultralytics  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "dynzoo.integrations.ultralytics needs Ultralytics: pip install 'dynzoo[ultralytics]' "
        f"(the optional 'ultralytics' extra, AGPL-3.0); import failed with: {e}") from e

from ._model_cfg import PLACEMENTS, insert_rows_after, parse_sgdm_cfg_name, sgdm_model_cfg
from ._register import cfg_cache_dir, fuse_sgdm, register

register()

__all__ = ['PLACEMENTS', 'cfg_cache_dir', 'fuse_sgdm', 'insert_rows_after', 'parse_sgdm_cfg_name', 'register',
           'sgdm_model_cfg']
