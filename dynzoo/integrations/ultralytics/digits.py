"""Ultralytics' own training and validation of a YOLO model YAML on the digits detection data set, on CPU.

The data set comes from :func:`dynzoo.tools.digits_detection.make_digits_detection`; ``scripts/
make_digits_detection.py --epochs N`` compares ``yolov8n.yaml`` with ``yolov8n-sgdm.yaml`` at the same budget.
"""
from pathlib import Path

from ultralytics import YOLO

__all__ = ['train_digits']


def train_digits(cfg: str, data, epochs: int, imgsz: int = 128, batch: int = 16, project='runs/digits',
                 seed: int = 0, **train_args) -> dict:
    """``YOLO(cfg).train(...)`` then ``val()`` (which fuses the model: SGDM runs reparameterized) on ``data``.

    Returns the validation ``map50``, ``map`` (mAP50-95), the trained model's ``params`` (``model.info()``) and,
    as the chance level, ``untrained_map50``: the same validation of the freshly initialised model.
    Plots are off (Ultralytics would fetch a font), data loading stays in the process (``workers=0``).
    """
    name = Path(cfg).stem
    common = dict(data=str(data), imgsz=imgsz, batch=batch, device='cpu', workers=0, plots=False,
                  project=str(project), exist_ok=True, verbose=False)
    untrained = YOLO(cfg).val(name=f'{name}-untrained', **common)
    yolo = YOLO(cfg)
    yolo.train(epochs=epochs, seed=seed, deterministic=True, name=name, **common, **train_args)
    params = yolo.model.info(verbose=True)[1]
    metrics = yolo.val(name=f'{name}-val', **common)
    return {'map50': float(metrics.box.map50), 'map': float(metrics.box.map), 'params': params,
            'untrained_map50': float(untrained.box.map50)}
