"""Train or fine-tune any dynzoo (or timm) model with timm's components, on one device or many (DDP).

``dynzoo train --config fmdconv_resnet18_in1k --data-dir /data/imagenet`` or, on 8 GPUs,
``torchrun --nproc_per_node 8 -m dynzoo train --config ...``. The pieces are timm's: ``create_dataset`` /
``create_loader`` and their transforms, ``Mixup`` (mixup / cutmix) with soft-target or label-smoothing losses,
``create_optimizer_v2`` (layer-wise lr decay through the model's ``group_matcher``), ``create_scheduler_v2``,
``ModelEmaV3``, ``torch.autocast`` AMP with timm's ``NativeScaler``, ``CheckpointSaver`` and ``distribute_bn``.

What dynzoo adds:

* **Temperature schedules** (``temperature:`` in a recipe): a list of ``{role, schedule, ...}``, each applied to
  every attention head of that role (``'kernel'`` softmax over the kernel bank, ``'gate'`` sigmoid heads) through
  :func:`dynzoo.set_temperature`, which refuses a model with no such head. Schedules: ``fmdconv`` (stepped per
  epoch, ``max(1, t0 - step * epoch)``, FMDConv §3.3.2), ``linear`` (per iteration, ``t0 -> t1`` over the first
  ``epochs`` epochs, DynamicConv/ODConv/A2D2C/DMF), ``constant``. The temperature in force is a buffer, so every
  checkpoint records the temperature its weights run at.
* **Recipes** are YAML files (``dynzoo/tools/recipes/*.yaml``, or any path) whose keys are this script's options.
* **Built-in data**: ``sklearn/digits`` (the UCI handwritten digits shipped with scikit-learn, split by seed)
  and ``synthetic`` (a small generated set for smoke and DDP tests); everything else goes to timm's
  ``create_dataset`` (image folders, ``torch/cifar10``, ...). Every recipe names its data set (``dataset:``), and
  ``--data-dir`` is never ignored: without a named data set it means an image folder, and the built-in sets refuse
  it. :func:`write_digits_imagefolder` writes the digits as an image folder for timm's own scripts.
* **Exact resume**: every epoch reseeds the RNGs from ``seed + epoch`` (and rank), so ``--resume`` from the last
  checkpoint continues bit-for-bit like an uninterrupted run on the same setup.
* ``results.json`` in the output folder (best epoch, its metrics and the evaluation protocol, recipe hash, wall
  time), which ``dynzoo publish --train-dir`` turns into a model card and a weights-index entry.

The run, by job: :func:`init_devices` (threads, device, DDP process group), :func:`setup_model`,
:func:`create_data` (datasets and loaders), :func:`create_components` (optimizer, AMP, resume, EMA, DDP wrapper,
loss, lr schedule), then per epoch :func:`train_one_epoch` and :func:`evaluate_epoch`, with :func:`create_saver`'s
checkpoints and :func:`write_results`; :func:`train` strings them together.
"""
import argparse
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynzoo.layers.temperature import TEMPERATURE_ROLES, fmdconv_temperature, linear_temperature, set_temperature

__all__ = [
    'RECIPE_DIR', 'BUILTIN_DATASETS', 'ArrayImageDataset', 'TemperatureSchedule', 'apply_temperatures', 'TrainResult',
    'build_parser', 'parse_args', 'find_recipe', 'load_recipe', 'digits_datasets', 'write_digits_imagefolder',
    'synthetic_datasets', 'create_datasets', 'TrainData', 'TrainComponents', 'init_devices', 'create_model',
    'setup_model', 'create_data', 'create_optimizer', 'create_loss', 'create_components', 'train_one_epoch',
    'evaluate', 'evaluate_epoch', 'create_saver', 'write_results', 'train', 'main',
]

_logger = logging.getLogger('dynzoo.tools.train')

RECIPE_DIR = Path(__file__).with_name('recipes')
CHECKPOINT_LAST = 'last.pth.tar'
CHECKPOINT_BEST = 'model_best.pth.tar'
RESULTS_FILE = 'results.json'


# --------------------------------------------------------------------------------------------------------------
# options and recipes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='dynzoo train', description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--config', '-c', default='', help='recipe: a YAML file, or the name of one in dynzoo/tools/recipes')
    g = p.add_argument_group('model')
    g.add_argument('--model', default='', help='registered model name (timm or dynzoo)')
    g.add_argument('--tag', default='', help='tag the resulting weights will be published under (e.g. digits)')
    g.add_argument('--pretrained', action='store_true', help='start from the published weights of --model')
    g.add_argument('--initial-checkpoint', default='',
                   help='start from this checkpoint file (dynzoo safetensors or an authors\' .pth), loaded through '
                        'the model\'s checkpoint filter; a head of another size is re-initialised')
    g.add_argument('--num-classes', type=int, default=None)
    g.add_argument('--drop', type=float, default=None, help='dropout before the classifier')
    g.add_argument('--drop-path', type=float, default=None, help='stochastic depth rate')
    g.add_argument('--model-kwargs', type=json.loads, default={}, help='extra model kwargs as JSON')
    g.add_argument('--grad-checkpointing', action='store_true')
    g = p.add_argument_group('data')
    g.add_argument('--dataset', default=None,
                   help="'sklearn/digits', 'synthetic', or a timm create_dataset name ('' = image folder); "
                        "default: an image folder when --data-dir is given, else sklearn/digits")
    g.add_argument('--data-dir', default='', help='root of the data set for timm datasets (required by an image '
                                                  'folder; refused by the built-in sklearn/digits and synthetic)')
    g.add_argument('--train-split', default='train')
    g.add_argument('--val-split', default='validation')
    g.add_argument('--dataset-download', action='store_true')
    g.add_argument('--val-fraction', type=float, default=0.2, help='held-out fraction (sklearn/digits, synthetic)')
    g.add_argument('--split-seed', type=int, default=0, help='seed of the train/validation split')
    g.add_argument('--synthetic-size', type=int, default=64, help='number of generated images (synthetic)')
    g.add_argument('--input-size', type=int, default=None, help='square input resolution (model default if unset)')
    g.add_argument('--img-size', type=int, default=None, help='timm train.py name of --input-size')
    g.add_argument('--mean', type=float, nargs=3, default=None)
    g.add_argument('--std', type=float, nargs=3, default=None)
    g.add_argument('--interpolation', default='', help='resize interpolation (model default if empty)')
    g.add_argument('--train-interpolation', default='', help='training resize interpolation (default: as eval)')
    g.add_argument('--crop-pct', type=float, default=None, help='eval center-crop fraction')
    g.add_argument('--no-aug', action='store_true', help='no training augmentation')
    g.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0], help='RandomResizedCrop scale range')
    g.add_argument('--ratio', type=float, nargs=2, default=[3. / 4., 4. / 3.], help='RandomResizedCrop ratios')
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--vflip', type=float, default=0.0)
    g.add_argument('--color-jitter', type=float, default=0.4)
    g.add_argument('--aa', default=None, help='AutoAugment / RandAugment policy, e.g. rand-m9-mstd0.5-inc1')
    g.add_argument('--reprob', type=float, default=0.0, help='random erasing probability')
    g.add_argument('--remode', default='pixel', help='random erasing mode')
    g.add_argument('--recount', type=int, default=1, help='random erasing count')
    g.add_argument('--aug-repeats', type=int, default=0, help='repeated augmentation (distributed runs)')
    g.add_argument('--workers', '-j', type=int, default=2, help='data loader workers per process')
    g.add_argument('--batch-size', '-b', type=int, default=64, help='per-process training batch size')
    g.add_argument('--grad-accum-steps', type=int, default=1, help='micro-batches per optimizer update')
    g.add_argument('--validation-batch-size', type=int, default=None)
    g = p.add_argument_group('mixup / cutmix / loss')
    g.add_argument('--mixup', type=float, default=0.0)
    g.add_argument('--cutmix', type=float, default=0.0)
    g.add_argument('--cutmix-minmax', type=float, nargs=2, default=None)
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', default='batch')
    g.add_argument('--smoothing', type=float, default=0.0, help='label smoothing')
    g = p.add_argument_group('optimizer')
    g.add_argument('--opt', default='sgd')
    g.add_argument('--lr', type=float, default=None, help='learning rate (default: lr-base scaled by batch)')
    g.add_argument('--lr-base', type=float, default=0.1)
    g.add_argument('--lr-base-size', type=int, default=256, help='global batch size lr-base refers to')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=1e-4)
    g.add_argument('--opt-eps', type=float, default=None)
    g.add_argument('--opt-betas', type=float, nargs='+', default=None)
    g.add_argument('--layer-decay', type=float, default=None, help='layer-wise lr decay (uses group_matcher)')
    g.add_argument('--clip-grad', type=float, default=None)
    g = p.add_argument_group('schedule')
    g.add_argument('--sched', default='cosine')
    g.add_argument('--epochs', type=int, default=10)
    g.add_argument('--sched-on-updates', action='store_true', help='step the lr schedule every iteration')
    g.add_argument('--decay-epochs', type=float, default=30)
    g.add_argument('--decay-milestones', type=int, nargs='+', default=[30, 60, 90])
    g.add_argument('--decay-rate', type=float, default=0.1)
    g.add_argument('--warmup-epochs', type=int, default=0)
    g.add_argument('--warmup-lr', type=float, default=1e-5)
    g.add_argument('--min-lr', type=float, default=0.0)
    g.add_argument('--cooldown-epochs', type=int, default=0)
    g.add_argument('--temperature', type=_parse_temperature_option, default=[],
                   help='temperature schedules as JSON list of {role, schedule, t0, ...}, or "none"')
    g = p.add_argument_group('EMA / AMP / devices')
    g.add_argument('--model-ema', action='store_true')
    g.add_argument('--model-ema-decay', type=float, default=0.9998)
    g.add_argument('--model-ema-warmup', action='store_true')
    g.add_argument('--amp', action='store_true', help='mixed precision (autocast)')
    g.add_argument('--amp-dtype', default='', help="'float16' or 'bfloat16' (default: fp16 on CUDA, bf16 on CPU)")
    g.add_argument('--device', default='', help="'cuda', 'cpu' ... (default: cuda if available)")
    g.add_argument('--dist-backend', default=None, help='torch.distributed backend (default nccl on CUDA, gloo)')
    g.add_argument('--dist-bn', default='reduce', choices=('reduce', 'broadcast', ''),
                   help='synchronise BatchNorm statistics across ranks after every epoch')
    g.add_argument('--sync-bn', action='store_true', help='SyncBatchNorm (CUDA)')
    g.add_argument('--threads', type=int, default=None, help='torch CPU threads per process')
    g = p.add_argument_group('run')
    g.add_argument('--output', default='', help='output folder (default: output/train/<model>[.<tag>])')
    g.add_argument('--resume', default='',
                   help="checkpoint to resume from, or 'auto' for <output>/last.pth.tar when it exists")
    g.add_argument('--no-resume-opt', action='store_true', help='resume the weights only')
    g.add_argument('--checkpoint-hist', type=int, default=3)
    g.add_argument('--eval-metric', default='top1', choices=('top1', 'top5', 'loss'))
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--log-interval', type=int, default=50)
    g.add_argument('--no-progress', action='store_true', help='no progress bars')
    return p


def _parse_temperature_option(text: str) -> List[Dict[str, Any]]:
    if text.strip().lower() in ('', 'none', '[]'):
        return []
    value = json.loads(text)
    return value if isinstance(value, list) else [value]


def find_recipe(name_or_path: str) -> Path:
    """A recipe path: an existing file, or ``dynzoo/tools/recipes/<name>[.yaml]``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (RECIPE_DIR / name_or_path, RECIPE_DIR / f'{name_or_path}.yaml'):
        if candidate.is_file():
            return candidate
    known = ', '.join(sorted(p.stem for p in RECIPE_DIR.glob('*.yaml')))
    raise FileNotFoundError(f'recipe {name_or_path!r} is neither a file nor one of dynzoo/tools/recipes: {known}')


def load_recipe(name_or_path: str, parser: Optional[argparse.ArgumentParser] = None) -> Dict[str, Any]:
    """Read a YAML recipe and check every key is an option of the training script and that it names its data set."""
    import yaml
    path = find_recipe(name_or_path)
    with open(path, 'r', encoding='utf-8') as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f'recipe {path} must be a mapping of option: value, got {type(cfg).__name__}')
    cfg = {k.replace('-', '_'): v for k, v in cfg.items() if k != 'description'}
    parser = parser or build_parser()
    known = set(vars(parser.parse_args([])))
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f'recipe {path} has unknown option(s) {unknown}; see `dynzoo train --help`')
    if 'dataset' not in cfg:
        raise ValueError(f"recipe {path} names no data set: add a `dataset:` key ('' for an image folder given by "
                         f"--data-dir, 'sklearn/digits', 'synthetic' or a timm dataset name)")
    if 'temperature' in cfg:
        cfg['temperature'] = cfg['temperature'] or []
        if isinstance(cfg['temperature'], dict):
            cfg['temperature'] = [cfg['temperature']]
    return cfg


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Options from the recipe (``--config``) overridden by the command line."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    recipe_path, recipe_sha = '', ''
    if pre.config:
        path = find_recipe(pre.config)
        parser.set_defaults(**load_recipe(str(path), parser))
        recipe_path, recipe_sha = str(path), hashlib.sha256(path.read_bytes()).hexdigest()
    args = parser.parse_args(argv)
    args.recipe_path, args.recipe_sha256 = recipe_path, recipe_sha
    if not args.model:
        parser.error('no model: give --model or a recipe that names one')
    _check_data_source(parser, args)
    args.temperature = [TemperatureSchedule.from_dict(t).to_dict() for t in args.temperature]
    return args


BUILTIN_DATASETS = ('sklearn/digits', 'synthetic')


def _check_data_source(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every ``--data-dir`` is used or refused: a built-in data set has no folder, an image folder needs one."""
    source = f'recipe {Path(args.recipe_path).stem} trains on' if args.recipe_path else '--dataset is'
    if args.dataset is None:
        args.dataset = '' if args.data_dir else 'sklearn/digits'
    if args.dataset in BUILTIN_DATASETS and args.data_dir:
        parser.error(f'{source} {args.dataset!r}, which would ignore --data-dir {args.data_dir!r}; pass '
                     f"--dataset '' to train on that image folder (or another timm dataset name)")
    if args.dataset == '' and not args.data_dir:
        parser.error(f'{source} an image folder: give its root with --data-dir')


# --------------------------------------------------------------------------------------------------------------
# temperature schedules


@dataclass
class TemperatureSchedule:
    """One temperature schedule of a recipe, applied to every head of ``role`` (``None``: every role).

    Every schedule is a function of the 0-based global optimizer step about to run and the steps per epoch
    (:mod:`dynzoo.layers.temperature`): ``fmdconv``: ``max(1, t0 - decrement * epoch)``, set at every epoch start
    (FMDConv, Sec. 3.3.2: t0 = 40, decrement = 3); ``linear``: per step, ``t0 -> t1`` over the first ``epochs``
    epochs, then ``t1`` (DynamicConv, Sec. 3.2, and ODConv: 30 -> 1 over 10 epochs), counted from 1 as DMF's code
    does (``T = 1 + (T0 - 1)(N - n)/N`` at iteration ``n``), i.e. the value at step ``s`` is
    ``linear_temperature(s + 1, ...)``; ``constant``: ``t0`` throughout (e.g. the FMDConv authors' kernel softmax
    at 34).
    """
    role: Optional[str] = 'kernel'
    schedule: str = 'fmdconv'
    t0: float = 40.0
    t1: float = 1.0
    decrement: float = 3.0
    epochs: float = 10.0

    SCHEDULES = ('fmdconv', 'linear', 'constant')

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> 'TemperatureSchedule':
        if not isinstance(d, dict):
            raise ValueError(f'a temperature schedule must be a mapping, got {d!r}')
        unknown = set(d) - {'role', 'schedule', 't0', 't1', 'decrement', 'epochs'}
        if unknown:
            raise ValueError(f'unknown temperature schedule field(s) {sorted(unknown)} in {d}')
        s = cls(**d)
        if s.schedule not in cls.SCHEDULES:
            raise ValueError(f'unknown temperature schedule {s.schedule!r}; expected one of {cls.SCHEDULES}')
        if s.role is not None and s.role not in TEMPERATURE_ROLES:
            raise ValueError(f'temperature role must be one of {TEMPERATURE_ROLES} or null, got {s.role!r}')
        if min(s.t0, s.t1) <= 0 or s.epochs <= 0:
            raise ValueError(f'temperatures and anneal epochs must be > 0: {d}')
        return s

    def to_dict(self) -> Dict[str, Any]:
        return dict(role=self.role, schedule=self.schedule, t0=self.t0, t1=self.t1, decrement=self.decrement,
                    epochs=self.epochs)

    @property
    def per_step(self) -> bool:
        return self.schedule == 'linear'

    def value(self, step: int, steps_per_epoch: int = 1) -> float:
        """The temperature for the 0-based global ``step`` about to run."""
        if self.schedule == 'fmdconv':
            return fmdconv_temperature(step, steps_per_epoch, self.t0, self.decrement)
        if self.schedule == 'linear':
            return linear_temperature(step + 1, steps_per_epoch, self.t0, self.t1, self.epochs)
        return self.t0


def apply_temperatures(model: nn.Module, schedules: Sequence[TemperatureSchedule], step: int,
                       steps_per_epoch: int, per_step: bool) -> Dict[str, float]:
    """Set the temperatures of the schedules that update at this granularity (per step, or per epoch) for the
    0-based global ``step`` about to run; returns ``{role: value}``."""
    done = {}
    for s in schedules:
        if s.per_step == per_step:
            t = s.value(step, steps_per_epoch)
            set_temperature(model, t, role=s.role)
            done[s.role or 'all'] = t
    return done


# --------------------------------------------------------------------------------------------------------------
# data


class ArrayImageDataset(torch.utils.data.Dataset):
    """In-memory uint8 images ``(N, H, W)`` or ``(N, H, W, 3)`` with integer targets -> ``(PIL RGB, target)``.

    ``transform`` is set by timm's ``create_loader`` (train or eval transforms).
    """

    def __init__(self, images: np.ndarray, targets: np.ndarray, classes: Optional[Sequence[str]] = None):
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(targets):
            raise ValueError(f'images must be uint8 (N, H, W[, 3]) with one target each, got {images.dtype} '
                             f'{images.shape} and {len(targets)} targets')
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = list(classes) if classes is not None else sorted(set(self.targets.tolist()))
        self.transform = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from PIL import Image
        img = Image.fromarray(self.images[index]).convert('RGB')
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])


def digits_datasets(val_fraction: float = 0.2, split_seed: int = 0):
    """scikit-learn's UCI handwritten digits (1,797 real 8x8 images, 10 classes), split stratified by seed.

    Pixel values 0..16 are scaled to 0..255; the loader's transforms upsample to the model resolution.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    idx_train, idx_val = train_test_split(
        np.arange(len(images)), test_size=val_fraction, random_state=split_seed, stratify=digits.target)
    classes = [str(c) for c in digits.target_names]
    return (ArrayImageDataset(images[idx_train], digits.target[idx_train], classes),
            ArrayImageDataset(images[idx_val], digits.target[idx_val], classes))


def write_digits_imagefolder(root, size: int = 32, val_fraction: float = 0.2, split_seed: int = 0) -> Path:
    """Write :func:`digits_datasets` as an image folder that any timm script reads: ``root/train/<digit>/*.png``
    and ``root/validation/<digit>/*.png``, each image upsampled (bicubic) to ``size`` x ``size`` RGB.

    The same split and pixels as ``--dataset sklearn/digits``; a folder that already holds it is reused.
    """
    from PIL import Image
    root = Path(root)
    done = root / f'.digits-{size}px-{val_fraction}-{split_seed}'
    if done.is_file():
        return root
    splits = dict(zip(('train', 'validation'), digits_datasets(val_fraction, split_seed)))
    for split, ds in splits.items():
        for i, (image, target) in enumerate(zip(ds.images, ds.targets)):
            folder = root / split / ds.classes[target]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).convert('RGB').resize((size, size), Image.BICUBIC).save(folder / f'{i:04d}.png')
    done.write_text(json.dumps({split: len(ds) for split, ds in splits.items()}))
    return root


def synthetic_datasets(num_samples: int = 64, num_classes: int = 4, size: int = 16, val_fraction: float = 0.25,
                       seed: int = 0):
    """A generated, learnable set: class ``c`` is a bright square at a class-specific place on a noisy field."""
    rng = np.random.default_rng(seed)
    targets = np.arange(num_samples) % num_classes
    rng.shuffle(targets)
    images = rng.integers(0, 60, size=(num_samples, size, size, 3)).astype(np.uint8)
    cells = int(math.ceil(math.sqrt(num_classes)))
    cell = size // cells
    for i, c in enumerate(targets):
        r, q = divmod(int(c), cells)
        images[i, r * cell:(r + 1) * cell, q * cell:(q + 1) * cell] = 220
    n_val = max(1, int(round(num_samples * val_fraction)))
    classes = [f'class{c}' for c in range(num_classes)]
    return (ArrayImageDataset(images[n_val:], targets[n_val:], classes),
            ArrayImageDataset(images[:n_val], targets[:n_val], classes))


def create_datasets(args) -> Tuple[torch.utils.data.Dataset, torch.utils.data.Dataset, str]:
    """``(train, validation, description of the split)`` for ``args.dataset``."""
    if args.dataset == 'sklearn/digits':
        train_ds, val_ds = digits_datasets(args.val_fraction, args.split_seed)
        desc = (f'scikit-learn load_digits (UCI handwritten digits, 1797 real 8x8 images), stratified split with '
                f'val_fraction={args.val_fraction} and seed {args.split_seed}: {len(train_ds)} train / '
                f'{len(val_ds)} validation images')
    elif args.dataset == 'synthetic':
        size = args.input_size or 16
        train_ds, val_ds = synthetic_datasets(
            args.synthetic_size, args.num_classes or 4, size, args.val_fraction, args.split_seed)
        desc = f'synthetic squares, {len(train_ds)} train / {len(val_ds)} validation images, seed {args.split_seed}'
    else:
        from timm.data import create_dataset
        train_ds = create_dataset(args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
                                  download=args.dataset_download, batch_size=args.batch_size)
        val_ds = create_dataset(args.dataset, root=args.data_dir, split=args.val_split, is_training=False,
                                download=args.dataset_download, batch_size=args.batch_size)
        desc = f'{args.dataset or "image folder"} at {args.data_dir!r}, splits {args.train_split}/{args.val_split}'
    return train_ds, val_ds, desc


# --------------------------------------------------------------------------------------------------------------
# devices, data, model and the training components


def init_devices(args) -> torch.device:
    """CPU threads, the device and, under torchrun, the process group (timm's ``init_distributed_device`` sets
    ``args.rank``, ``args.world_size`` and ``args.distributed`` from the ``env://`` variables)."""
    from timm.utils import init_distributed_device
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.device:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = init_distributed_device(args)
    if args.distributed:
        _logger.info(f'DDP rank {args.rank}/{args.world_size} on {device} ({args.dist_backend or "auto"} backend)')
    return device


def create_model(args) -> nn.Module:
    import timm
    import dynzoo  # noqa: F401  (registers the zoo)
    kwargs = dict(args.model_kwargs or {})
    for key, value in (('num_classes', args.num_classes), ('drop_rate', args.drop),
                       ('drop_path_rate', args.drop_path)):
        if value is not None:
            kwargs[key] = value
    if args.initial_checkpoint:
        return timm.create_model(args.model, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=args.initial_checkpoint), **kwargs)
    return timm.create_model(args.model, pretrained=args.pretrained, **kwargs)


def setup_model(args, schedules: Sequence[TemperatureSchedule], device: torch.device) -> nn.Module:
    """:func:`create_model` with the same initial weights on every rank, checked against the temperature
    schedules (a schedule naming a role the model lacks fails here, before training), on ``device``."""
    from timm.utils import random_seed
    random_seed(args.seed, 0)
    model = create_model(args)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    for per_step in ((False, True) if schedules else ()):
        apply_temperatures(model, schedules, 0, 1, per_step=per_step)
    model.to(device)
    if args.distributed and args.sync_bn:
        from timm.layers import convert_sync_batchnorm
        model = convert_sync_batchnorm(model)
    return model


@dataclass
class TrainData:
    """The two loaders of a run, their preprocessing and what ``results.json`` says of the split."""
    loader_train: Any
    loader_eval: Any
    data_config: Dict[str, Any]
    description: str
    num_train: int
    num_val: int
    steps_per_epoch: int  # optimizer updates per epoch


def create_data(args, model: nn.Module, device: torch.device) -> TrainData:
    """timm's ``create_loader`` on :func:`create_datasets`, with the model's data config overridden by ``args``."""
    from timm.data import create_loader, resolve_data_config
    size = args.input_size or args.img_size
    data_config = resolve_data_config(
        args={k: v for k, v in dict(
            input_size=(3, size, size) if size else None,
            mean=args.mean, std=args.std, interpolation=args.interpolation or None,
            crop_pct=args.crop_pct).items() if v is not None},
        model=model, verbose=False)
    train_ds, val_ds, description = create_datasets(args)
    loader_train = create_loader(
        train_ds, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, auto_augment=args.aa,
        num_aug_repeats=args.aug_repeats if args.distributed else 0,
        interpolation=args.train_interpolation or data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'],
        num_workers=args.workers, distributed=args.distributed, use_prefetcher=False, device=device)
    loader_eval = create_loader(
        val_ds, input_size=data_config['input_size'], batch_size=args.validation_batch_size or args.batch_size,
        is_training=False, interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], crop_pct=data_config['crop_pct'], crop_mode=data_config.get('crop_mode'),
        num_workers=args.workers, distributed=args.distributed, use_prefetcher=False, device=device)
    if len(loader_train) == 0:
        raise ValueError(f'training set of {len(train_ds)} images is smaller than one batch of {args.batch_size}')
    return TrainData(loader_train, loader_eval, data_config, description, len(train_ds), len(val_ds),
                     steps_per_epoch=math.ceil(len(loader_train) / max(1, args.grad_accum_steps)))


def create_optimizer(args, model: nn.Module, world_size: int = 1) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2``; ``--layer-decay`` groups parameters by the model's ``group_matcher``."""
    from timm.optim import create_optimizer_v2
    if args.lr is None:
        args.lr = args.lr_base * args.batch_size * world_size * args.grad_accum_steps / args.lr_base_size
    opt_kwargs = {}
    if args.opt_eps is not None:
        opt_kwargs['eps'] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs['betas'] = tuple(args.opt_betas)
    return create_optimizer_v2(
        model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
        layer_decay=args.layer_decay, **opt_kwargs)


def _amp_context(args, device: torch.device):
    if not args.amp:
        return nullcontext, None
    dtype_name = args.amp_dtype or ('float16' if device.type == 'cuda' else 'bfloat16')
    dtype = {'float16': torch.float16, 'bfloat16': torch.bfloat16}[dtype_name]
    scaler = None
    if dtype == torch.float16 and device.type == 'cuda':
        from timm.utils import NativeScaler
        scaler = NativeScaler(device=device.type)
    return (lambda: torch.autocast(device_type=device.type, dtype=dtype)), scaler


def create_loss(args, num_classes: int):
    """``(mixup_fn or None, training loss)``: timm's ``Mixup`` with soft targets, label smoothing, or plain CE."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=num_classes)
        return mixup_fn, SoftTargetCrossEntropy()
    if args.smoothing:
        return None, LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return None, nn.CrossEntropyLoss()


def _resolve_resume(args, output_dir: Path) -> str:
    if args.resume == 'auto':
        last = output_dir / CHECKPOINT_LAST
        return str(last) if last.is_file() else ''
    if args.resume and not Path(args.resume).is_file():
        raise FileNotFoundError(f'--resume {args.resume!r}: no such checkpoint')
    return args.resume


@dataclass
class TrainComponents:
    """Everything one epoch needs besides the data: model (DDP-wrapped when distributed), EMA, optimizer, AMP, loss,
    lr and temperature schedules, and where the run starts (``start_epoch`` > 0 after a resume)."""
    model: nn.Module
    model_plain: nn.Module
    model_ema: Optional[nn.Module]
    optimizer: torch.optim.Optimizer
    amp_autocast: Any
    loss_scaler: Any
    mixup_fn: Any
    loss_fn: nn.Module
    lr_scheduler: Any
    num_epochs: int
    schedules: List[TemperatureSchedule]
    start_epoch: int
    resume_path: str


def create_components(args, model: nn.Module, data: TrainData, device: torch.device, output_dir: Path,
                      schedules: Sequence[TemperatureSchedule]) -> TrainComponents:
    """Optimizer, AMP, resume (weights, optimizer, scaler), EMA, DDP wrapping, loss and lr schedule, in the order
    that makes ``--resume`` exact."""
    from timm.models import load_checkpoint, resume_checkpoint
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3
    primary = args.rank == 0
    optimizer = create_optimizer(args, model, args.world_size)
    amp_autocast, loss_scaler = _amp_context(args, device)
    resume_path = _resolve_resume(args, output_dir)
    start_epoch = 0
    if resume_path:
        epoch = resume_checkpoint(model, resume_path, optimizer=None if args.no_resume_opt else optimizer,
                                  loss_scaler=None if args.no_resume_opt else loss_scaler, log_info=primary)
        start_epoch = epoch or 0
        if primary:
            print(f'resumed from {resume_path}: continuing at epoch {start_epoch}', flush=True)
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
        if resume_path:
            load_checkpoint(model_ema.module, resume_path, use_ema=True)
    model_plain = model
    if args.distributed:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None)
    mixup_fn, loss_fn = create_loss(args, model_plain.num_classes)
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_milestones=args.decay_milestones, decay_rate=args.decay_rate, min_lr=args.min_lr,
        warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, cooldown_epochs=args.cooldown_epochs,
        step_on_epochs=not args.sched_on_updates, updates_per_epoch=data.steps_per_epoch)
    if start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * data.steps_per_epoch)
        else:
            lr_scheduler.step(start_epoch)
    return TrainComponents(model, model_plain, model_ema, optimizer, amp_autocast, loss_scaler, mixup_fn, loss_fn,
                           lr_scheduler, num_epochs, list(schedules), start_epoch, resume_path)


# --------------------------------------------------------------------------------------------------------------
# one epoch, evaluation


def train_one_epoch(args, c: TrainComponents, data: TrainData, epoch: int, num_updates: int,
                    device: torch.device) -> Tuple[float, int, Dict[str, float]]:
    """One epoch of optimizer updates of ``args.grad_accum_steps`` micro-batches each; returns the mean micro-batch
    loss, the number of updates done so far and the temperatures set during the epoch."""
    from timm.utils import random_seed
    random_seed(args.seed + epoch, args.rank)  # per-epoch reseed: resume reproduces the uninterrupted run
    loader, model, optimizer, loss_scaler = data.loader_train, c.model, c.optimizer, c.loss_scaler
    if args.distributed and hasattr(loader.sampler, 'set_epoch'):
        loader.sampler.set_epoch(epoch)
    primary, steps = args.rank == 0, data.steps_per_epoch
    temps = apply_temperatures(c.model_plain, c.schedules, epoch * steps, steps, per_step=False)
    model.train()
    accum = max(1, args.grad_accum_steps)
    loss_sum, loss_count = 0.0, 0
    it = _progress(loader, primary and not args.no_progress, f'epoch {epoch}/{c.num_epochs - 1}')
    last_micro = len(loader) - 1
    optimizer.zero_grad(set_to_none=True)
    for micro, (x, y) in enumerate(it):
        step = micro // accum
        update = (micro + 1) % accum == 0 or micro == last_micro
        if micro % accum == 0:
            temps.update(apply_temperatures(c.model_plain, c.schedules, epoch * steps + step, steps, per_step=True))
        x, y = x.to(device), y.to(device)
        if c.mixup_fn is not None:
            x, y = c.mixup_fn(x, y)
        sync = model.no_sync if args.distributed and not update else nullcontext
        with sync():
            with c.amp_autocast():
                loss = c.loss_fn(model(x), y)
            if loss_scaler is not None:
                loss_scaler(loss / accum, optimizer, clip_grad=args.clip_grad, parameters=model.parameters(),
                            need_update=update)
            else:
                (loss / accum).backward()
        loss_sum += loss.item()
        loss_count += 1
        if not update:
            continue
        if loss_scaler is None:
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        num_updates += 1
        if c.model_ema is not None:
            c.model_ema.update(c.model_plain, step=num_updates)
        c.lr_scheduler.step_update(num_updates=num_updates)
        if hasattr(it, 'set_postfix'):
            it.set_postfix(loss=f'{loss_sum / loss_count:.4f}', lr=f'{optimizer.param_groups[0]["lr"]:.2e}')
        elif primary and args.log_interval and (step % args.log_interval == 0 or step == steps - 1):
            _logger.info(f'epoch {epoch} step {step}/{steps} loss {loss_sum / loss_count:.4f}')
    return loss_sum / max(loss_count, 1), num_updates, temps


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_autocast=nullcontext, distributed: bool = False,
             progress: bool = False, desc: str = 'eval') -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over ``loader``, as sums across ranks (timm's distributed
    eval sampler pads the last shard with repeats, so a multi-process count can include a few duplicates)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, top1 count, top5 count, samples
    it = _progress(loader, progress, desc)
    for x, y in it:
        x, y = x.to(device), y.to(device)
        with amp_autocast():
            out = model(x)
        out = out.float()
        k = min(5, out.shape[1])
        top = out.topk(k, dim=1).indices
        hit = top.eq(y[:, None])
        sums += torch.tensor([F.cross_entropy(out, y, reduction='sum').item(), hit[:, 0].sum().item(),
                              hit.any(dim=1).sum().item(), y.numel()], dtype=torch.float64)
    if distributed:
        sums = sums.to(device)
        torch.distributed.all_reduce(sums)
        sums = sums.cpu()
    n = max(sums[3].item(), 1.0)
    return {'loss': sums[0].item() / n, 'top1': 100.0 * sums[1].item() / n, 'top5': 100.0 * sums[2].item() / n,
            'samples': int(sums[3].item())}


def evaluate_epoch(args, c: TrainComponents, data: TrainData, device: torch.device) -> Dict[str, Dict[str, float]]:
    """``{'eval': ...}`` of the model and, with EMA, ``'eval_ema'``; BatchNorm statistics are synchronised across
    ranks first (``--dist-bn``)."""
    from timm.utils import distribute_bn
    dist_bn = args.distributed and args.dist_bn
    if dist_bn:
        distribute_bn(c.model, args.world_size, args.dist_bn == 'reduce')
    out = {'eval': evaluate(c.model, data.loader_eval, device, c.amp_autocast, args.distributed)}
    if c.model_ema is not None:
        if dist_bn:
            distribute_bn(c.model_ema, args.world_size, args.dist_bn == 'reduce')
        out['eval_ema'] = evaluate(c.model_ema.module, data.loader_eval, device, c.amp_autocast, args.distributed)
    return out


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


# --------------------------------------------------------------------------------------------------------------
# checkpoints and results


def create_saver(args, c: TrainComponents, output_dir: Path):
    """timm's ``CheckpointSaver`` (rank 0 only) and the epochs of ``results.json`` before a resume."""
    from timm.utils import CheckpointSaver
    output_dir.mkdir(parents=True, exist_ok=True)
    saver = CheckpointSaver(
        model=c.model, optimizer=c.optimizer, args=args, model_ema=c.model_ema, amp_scaler=c.loss_scaler,
        checkpoint_dir=str(output_dir), recovery_dir=str(output_dir), decreasing=args.eval_metric == 'loss',
        max_history=args.checkpoint_hist)
    history: List[Dict[str, Any]] = []
    if c.resume_path:
        saver.load_state_dict_from_checkpoint(c.resume_path)
        results_path = output_dir / RESULTS_FILE
        if results_path.is_file():  # keep the history of the epochs before the resume
            history = [h for h in json.loads(results_path.read_text()).get('history', [])
                       if h['epoch'] < c.start_epoch]
    return saver, history


def _versions() -> Dict[str, str]:
    import timm
    import dynzoo
    return {'dynzoo': dynzoo.__version__, 'timm': timm.__version__, 'torch': torch.__version__,
            'python': platform.python_version()}


def write_results(path: Path, args, history: List[Dict[str, Any]], saver, weights_kind: str, data: TrainData,
                  wall_time: float) -> None:
    """``results.json``: the best epoch, its metrics with the evaluation protocol, the recipe and the history."""
    best_epoch = saver.best_epoch if saver.best_epoch is not None else history[-1]['epoch']
    best = next(h for h in history if h['epoch'] == best_epoch)
    best_eval = best['eval_ema' if weights_kind == 'ema' else 'eval']
    data_config = data.data_config
    size = data_config['input_size']
    protocol = (f'{data.description}; single {size[1]}x{size[2]} view ({data_config["interpolation"]} resize, '
                f'crop_pct {data_config["crop_pct"]}), accuracy over all {best_eval["samples"]} validation images')
    results = {
        'model': args.model, 'tag': args.tag, 'num_classes': args.num_classes,
        'model_kwargs': dict(args.model_kwargs or {}),
        'dataset': {'name': args.dataset, 'split': 'validation', 'description': data.description,
                    'train_images': data.num_train, 'val_images': data.num_val, 'split_seed': args.split_seed},
        'protocol': protocol,
        'weights': weights_kind,
        'checkpoint': CHECKPOINT_BEST if saver.best_epoch is not None else CHECKPOINT_LAST,
        'best_epoch': best_epoch, 'best': best_eval,
        'data_config': {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()},
        'recipe': {'path': args.recipe_path, 'name': Path(args.recipe_path).stem if args.recipe_path else '',
                   'sha256': args.recipe_sha256},
        'temperature': args.temperature,
        'epochs': args.epochs, 'seed': args.seed, 'world_size': args.world_size,
        'wall_time_s': wall_time,
        'cpu_time_s': time.process_time(),
        'threads': torch.get_num_threads(),
        'versions': _versions(),
        'history': history,
    }
    tmp = path.with_suffix('.tmp')
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)


def _epoch_line(record: Dict[str, Any]) -> str:
    m = record['eval']
    return (f'epoch {record["epoch"]}: train loss {record["train_loss"]:.4f} | val top1 {m["top1"]:.2f} '
            f'top5 {m["top5"]:.2f} loss {m["loss"]:.4f}'
            + (f' | ema top1 {record["eval_ema"]["top1"]:.2f}' if 'eval_ema' in record else '')
            + f' | {record["train_time_s"]:.1f}s' + (f' | T {record["temperature"]}' if record['temperature'] else ''))


# --------------------------------------------------------------------------------------------------------------
# the run


@dataclass
class TrainResult:
    model: nn.Module
    model_ema: Optional[nn.Module]
    output_dir: Path
    best_metric: Optional[float]
    best_epoch: Optional[int]
    history: List[Dict[str, Any]] = field(default_factory=list)
    results: Dict[str, Any] = field(default_factory=dict)


def train(args: argparse.Namespace) -> TrainResult:
    """Run the training described by ``args`` (see :func:`parse_args`); DDP when launched by torchrun."""
    t_start = time.perf_counter()
    device = init_devices(args)
    primary = args.rank == 0

    schedules = [TemperatureSchedule.from_dict(t) for t in args.temperature]
    model = setup_model(args, schedules, device)
    data = create_data(args, model, device)
    output_dir = Path(args.output or Path('output') / 'train' / (f'{args.model}.{args.tag}' if args.tag
                                                                   else args.model))
    c = create_components(args, model, data, device, output_dir, schedules)

    saver, history = create_saver(args, c, output_dir) if primary else (None, [])
    results_path = output_dir / RESULTS_FILE
    if primary:
        print(f'{args.model}: {sum(p.numel() for p in c.model_plain.parameters()):,} params, '
              f'{data.num_train} train / {data.num_val} val images, {data.steps_per_epoch} steps/epoch x '
              f'{args.world_size} process(es), epochs {c.start_epoch}..{c.num_epochs - 1}, output {output_dir}',
              flush=True)
    weights_kind = 'ema' if c.model_ema is not None else 'model'
    num_updates = c.start_epoch * data.steps_per_epoch
    for epoch in range(c.start_epoch, c.num_epochs):
        t_epoch = time.perf_counter()
        train_loss, num_updates, temps = train_one_epoch(args, c, data, epoch, num_updates, device)
        record = {'epoch': epoch, 'train_loss': train_loss, 'train_time_s': time.perf_counter() - t_epoch,
                  'lr': c.optimizer.param_groups[0]['lr'], 'temperature': temps}
        record.update(evaluate_epoch(args, c, data, device))
        ranked = record['eval_ema' if c.model_ema is not None else 'eval'][args.eval_metric]
        c.lr_scheduler.step(epoch + 1, ranked)
        history.append(record)
        if saver is not None:
            saver.save_checkpoint(epoch, metric=ranked)
            write_results(results_path, args, history, saver, weights_kind, data, time.perf_counter() - t_start)
            print(_epoch_line(record), flush=True)

    results = json.loads(results_path.read_text()) if primary and results_path.is_file() else {}
    if args.distributed:
        torch.distributed.barrier()
    return TrainResult(
        model=c.model_plain, model_ema=c.model_ema.module if c.model_ema is not None else None,
        output_dir=output_dir, best_metric=saver.best_metric if saver else None,
        best_epoch=saver.best_epoch if saver else None, history=history, results=results)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``dynzoo train`` (``torchrun ... -m dynzoo train`` for DDP)."""
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = parse_args(argv)
    result = train(args)
    if result.results:
        r = result.results
        print(f'best epoch {r["best_epoch"]}: val top1 {r["best"]["top1"]:.2f} ({r["weights"]} weights), '
              f'wall time {r["wall_time_s"]:.1f}s -> {result.output_dir}', flush=True)
    if getattr(args, 'distributed', False) and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(main())
