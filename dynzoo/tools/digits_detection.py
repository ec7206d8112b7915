"""A small real-image detection data set: scikit-learn's handwritten digits pasted onto canvases.

:func:`make_digits_detection` writes Ultralytics' YOLO layout (``images/{train,val}/*.png``, ``labels/{train,val}/
*.txt`` with ``class x_center y_center width height`` normalised to the image, and a data YAML naming the ten
classes), so ``YOLO(...).train(data=...)`` reads it as is; :class:`DigitsDetection` reads the same files as
``(image, {'boxes', 'labels'})`` pairs for torchvision-style detectors. The digits are the UCI handwritten digits
that scikit-learn bundles (1797 real 8x8 scans, no download); each image of the split comes from its own, seeded
subset of them, so no scan is in both splits. ``scripts/make_digits_detection.py`` writes it from the command line.
"""
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

__all__ = ['make_digits_detection', 'DigitsDetection']

CLASS_NAMES = tuple(str(d) for d in range(10))


def _place(rng: np.random.Generator, size: int, width: int, height: int, boxes: List[Tuple[int, int, int, int]],
           tries: int = 20) -> Optional[Tuple[int, int]]:
    """A top-left corner where a ``size`` square fits on the canvas without touching ``boxes`` (None if none found)."""
    for _ in range(tries):
        x, y = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
        if all(x + size <= bx0 or bx1 <= x or y + size <= by0 or by1 <= y for bx0, by0, bx1, by1 in boxes):
            return x, y
    return None


def _canvas(rng: np.random.Generator, scans: np.ndarray, targets: np.ndarray, canvas_sizes: Tuple[int, int],
            digit_sizes: Tuple[int, int], max_digits: int):
    """One grey, lightly noisy canvas with 1..max_digits digits; returns the RGB image and its pixel boxes."""
    width, height = (int(v) for v in rng.integers(canvas_sizes[0], canvas_sizes[1] + 1, size=2))
    image = rng.normal(40.0, 12.0, size=(height, width)).clip(0, 255)
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, max_digits + 1))):
        size = int(rng.integers(digit_sizes[0], min(digit_sizes[1], width, height) + 1))
        corner = _place(rng, size, width, height, boxes)
        if corner is None:
            continue
        i = int(rng.integers(0, len(scans)))
        patch = np.asarray(Image.fromarray((scans[i] * (255.0 / 16.0)).astype(np.uint8)).resize(
            (size, size), Image.BILINEAR), dtype=np.float64)
        x, y = corner
        region = image[y:y + size, x:x + size]
        image[y:y + size, x:x + size] = np.maximum(region, patch)
        ys, xs = np.nonzero(patch > 32)  # the ink's extent: the scans have empty margins
        boxes.append((x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1))
        labels.append(int(targets[i]))
    rgb = np.repeat(image.astype(np.uint8)[:, :, None], 3, axis=2)
    return rgb, boxes, labels


def make_digits_detection(
        root,
        num_train: int = 400,
        num_val: int = 100,
        seed: int = 0,
        canvas_sizes: Sequence[int] = (96, 128),
        digit_sizes: Sequence[int] = (20, 48),
        max_digits: int = 3,
        val_fraction: float = 0.3,
) -> Path:
    """Write the digits detection data set under ``root`` and return the path of its data YAML.

    Args:
        root: output folder (created; existing files of the same names are overwritten).
        num_train, num_val: number of canvases per split.
        seed: seeds the split of the 1797 scans and every placement.
        canvas_sizes: (min, max) canvas side in pixels, each side drawn independently.
        digit_sizes: (min, max) side of a pasted digit in pixels.
        max_digits: at most this many digits per canvas (at least one; overlapping placements are skipped).
        val_fraction: fraction of the scans reserved for the validation canvases.
    """
    from sklearn.datasets import load_digits

    if num_train < 1 or num_val < 1:
        raise ValueError(f'num_train and num_val must be >= 1, got {num_train} and {num_val}')
    if not (len(canvas_sizes) == 2 and 8 <= canvas_sizes[0] <= canvas_sizes[1]):
        raise ValueError(f'canvas_sizes must be (min, max) with 8 <= min <= max, got {tuple(canvas_sizes)}')
    if not (len(digit_sizes) == 2 and 8 <= digit_sizes[0] <= digit_sizes[1] <= canvas_sizes[0]):
        raise ValueError(f'digit_sizes must be (min, max) with 8 <= min <= max <= min canvas side, got '
                         f'{tuple(digit_sizes)}')
    if not 0.0 < val_fraction < 1.0 or max_digits < 1:
        raise ValueError(f'need 0 < val_fraction < 1 and max_digits >= 1, got {val_fraction} and {max_digits}')
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    num_val_scans = int(round(val_fraction * len(order)))
    scan_splits = {'val': order[:num_val_scans], 'train': order[num_val_scans:]}
    root = Path(root)
    for split, count in (('train', num_train), ('val', num_val)):
        scans, targets = digits.images[scan_splits[split]], digits.target[scan_splits[split]]
        (root / 'images' / split).mkdir(parents=True, exist_ok=True)
        (root / 'labels' / split).mkdir(parents=True, exist_ok=True)
        for n in range(count):
            rgb, boxes, labels = _canvas(rng, scans, targets, tuple(canvas_sizes), tuple(digit_sizes), max_digits)
            height, width = rgb.shape[:2]
            Image.fromarray(rgb).save(root / 'images' / split / f'{n:05d}.png')
            lines = [f'{c} {(x0 + x1) / 2 / width:.6f} {(y0 + y1) / 2 / height:.6f} {(x1 - x0) / width:.6f} '
                     f'{(y1 - y0) / height:.6f}' for c, (x0, y0, x1, y1) in zip(labels, boxes)]
            (root / 'labels' / split / f'{n:05d}.txt').write_text('\n'.join(lines) + '\n')
    names = '\n'.join(f'  {i}: "{name}"' for i, name in enumerate(CLASS_NAMES))
    data_yaml = root / 'digits.yaml'
    data_yaml.write_text(f'path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}\n')
    return data_yaml


class DigitsDetection(torch.utils.data.Dataset):
    """One split of a :func:`make_digits_detection` folder as torchvision detection samples.

    Item ``i`` is ``(image, target)``: ``image`` a float ``(3, H, W)`` tensor in [0, 1], ``target`` a dict with
    ``boxes`` (``(N, 4)`` float, ``x0, y0, x1, y1`` in pixels) and ``labels`` (``(N,)`` int64, the digit).
    """

    def __init__(self, root, split: str = 'train'):
        self.images = sorted((Path(root) / 'images' / split).glob('*.png'))
        if not self.images:
            raise FileNotFoundError(f'no images in {Path(root) / "images" / split}; run make_digits_detection first')
        self.labels_dir = Path(root) / 'labels' / split

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        path = self.images[index]
        image = torch.from_numpy(np.asarray(Image.open(path).convert('RGB'), dtype=np.float32) / 255.0)
        image = image.permute(2, 0, 1).contiguous()
        height, width = image.shape[1:]
        rows = np.loadtxt(self.labels_dir / f'{path.stem}.txt', ndmin=2, dtype=np.float64).reshape(-1, 5)
        xc, yc, w, h = rows[:, 1] * width, rows[:, 2] * height, rows[:, 3] * width, rows[:, 4] * height
        boxes = np.stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], axis=1)
        return image, {'boxes': torch.tensor(boxes, dtype=torch.float32),
                       'labels': torch.tensor(rows[:, 0], dtype=torch.int64)}

