"""Upcycling on real images: static timm networks trained on scikit-learn's digits, published in timm's format to
a Hugging Face cache on disk, upcycled to dynamic networks (:mod:`dynzoo.models._upcycle`), then fine-tuned.

For each dynamic model the run reports (a) the step-0 validation accuracy of the upcycled network next to its
static source's (equal: the upcycled network computes the static function) and (b) the accuracy after the same
fine-tuning steps from the upcycled start and from the model's random init (same seed, batches and optimizer).
``scripts/upcycle_digits.py`` is its command line; ``docs/upcycling.md`` gives the numbers of a run.
"""
import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.optim import create_optimizer_v2

from dynzoo.models._upcycle import static_source, upcycle_model
from .train import digits_datasets

__all__ = ['DEFAULT_MODELS', 'digits_tensors', 'fit', 'evaluate', 'publish_to_hf_cache', 'load_from_hf_cache',
           'UpcycleResult', 'run', 'format_table', 'build_parser', 'main']

DEFAULT_MODELS = ('fmdconv_resnet18', 'odconv_mobilenetv2_050')

Split = Tuple[torch.Tensor, torch.Tensor]


def digits_tensors(size: int = 32, val_fraction: float = 0.2, split_seed: int = 0) -> Tuple[Split, Split]:
    """``((x_train, y_train), (x_val, y_val))``: :func:`~dynzoo.tools.train.digits_datasets` as float tensors,
    upsampled (bilinear) to ``size`` px, 3 channels, normalised with timm's ImageNet mean and std."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).reshape(1, 3, 1, 1)

    def tensors(ds) -> Split:
        x = torch.from_numpy(ds.images).float().div_(255.0).unsqueeze(1)
        x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False).expand(-1, 3, -1, -1)
        return ((x - mean) / std).contiguous(), torch.from_numpy(ds.targets)

    train, val = digits_datasets(val_fraction, split_seed)
    return tensors(train), tensors(val)


def fit(model: nn.Module, data: Split, steps: int, *, batch_size: int = 64, lr: float = 1e-3,
        weight_decay: float = 0.05, seed: int = 0) -> None:
    """``steps`` AdamW steps (timm's ``create_optimizer_v2``) on batches drawn with replacement from ``data``;
    the batches and every random draw of the model (dropout, sampling) follow ``seed``."""
    x, y = data
    optimizer = create_optimizer_v2(model, 'adamw', lr=lr, weight_decay=weight_decay)
    batches = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=batches)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, batch_size: int = 256) -> Tuple[float, torch.Tensor]:
    """``(top-1 accuracy in %, logits)`` of ``model`` in eval mode on ``data``."""
    x, y = data
    model.eval()
    logits = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    return 100.0 * float((logits.argmax(1) == y).float().mean()), logits


def publish_to_hf_cache(model: nn.Module, cache_dir: Path, repo_id: str, revision: str = '0' * 40) -> Path:
    """Save ``model`` as timm's ``push_to_hub`` uploads it (:func:`timm.models.save_for_hf`: ``model.safetensors``
    + ``config.json``) into a Hugging Face cache on disk (``models--org--name/{blobs,refs,snapshots}``), as
    ``huggingface_hub`` would have downloaded it; returns the snapshot folder."""
    import hashlib
    from timm.models import save_for_hf
    repo = Path(cache_dir) / f'models--{repo_id.replace("/", "--")}'
    snapshot = repo / 'snapshots' / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / 'blobs').mkdir(exist_ok=True)
    (repo / 'refs').mkdir(exist_ok=True)
    (repo / 'refs' / 'main').write_text(revision)
    with tempfile.TemporaryDirectory() as tmp:
        save_for_hf(model, tmp, safe_serialization=True)
        for file in sorted(Path(tmp).iterdir()):
            data = file.read_bytes()
            blob = repo / 'blobs' / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = snapshot / file.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def load_from_hf_cache(cache_dir: Path, repo_id: str) -> Dict[str, torch.Tensor]:
    """The ``model.safetensors`` of ``repo_id`` from the cache on disk, through ``huggingface_hub`` (offline)."""
    from huggingface_hub import hf_hub_download
    from safetensors.torch import load_file
    return load_file(hf_hub_download(repo_id, 'model.safetensors', cache_dir=str(cache_dir), local_files_only=True))


@dataclass
class UpcycleResult:
    model: str
    source: str
    source_accuracy: float      # the trained static network, validation top-1 (%)
    step0_accuracy: float       # the upcycled network before any step
    step0_max_abs_diff: float   # max |logits - static logits| on the validation set
    upcycled_accuracy: float    # after the fine-tuning steps from the upcycled start
    scratch_accuracy: float     # after the same steps from the model's random init
    seconds: float


def run(
        models: Sequence[str] = DEFAULT_MODELS,
        *,
        static_steps: int = 300,
        finetune_steps: int = 100,
        batch_size: int = 64,
        lr: float = 1e-3,
        size: int = 32,
        seed: int = 0,
        cache_dir: Optional[Path] = None,
        log=print,
) -> List[UpcycleResult]:
    """Train each static source of ``models`` once (``static_steps``), publish it to ``cache_dir`` (a temporary
    folder by default) as ``local/<source>.digits``, and for each model compare the upcycled start with the random
    init over ``finetune_steps`` (same seed, batches, optimizer and learning rate)."""
    train, val = digits_tensors(size)
    results: List[UpcycleResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(cache_dir or tmp)
        sources: Dict[str, Tuple[float, torch.Tensor]] = {}
        for name in models:
            t0 = time.time()
            source = static_source(name)
            if source is None:
                raise ValueError(f'{name} has no static timm source to upcycle from')
            repo_id = f'local/{source}.digits'
            if source not in sources:
                torch.manual_seed(seed)
                static = timm.create_model(source, num_classes=10)
                fit(static, train, static_steps, batch_size=batch_size, lr=lr, seed=seed)
                sources[source] = evaluate(static, val)
                publish_to_hf_cache(static, cache, repo_id)
                log(f'{source}: {static_steps} steps, validation top-1 {sources[source][0]:.2f} % -> {repo_id}')
            source_acc, source_logits = sources[source]
            torch.manual_seed(seed)
            upcycled = upcycle_model(timm.create_model(name, num_classes=10), load_from_hf_cache(cache, repo_id),
                                     seed=seed)
            step0_acc, step0_logits = evaluate(upcycled, val)
            fit(upcycled, train, finetune_steps, batch_size=batch_size, lr=lr, seed=seed)
            torch.manual_seed(seed)
            scratch = timm.create_model(name, num_classes=10)
            fit(scratch, train, finetune_steps, batch_size=batch_size, lr=lr, seed=seed)
            result = UpcycleResult(
                name, source, source_acc, step0_acc, float((step0_logits - source_logits).abs().max()),
                evaluate(upcycled, val)[0], evaluate(scratch, val)[0], time.time() - t0)
            log(f'{name}: step 0 {result.step0_accuracy:.2f} % (static {source_acc:.2f} %), after {finetune_steps} '
                f'steps upcycled {result.upcycled_accuracy:.2f} % vs random init {result.scratch_accuracy:.2f} %')
            results.append(result)
    return results


def format_table(results: Sequence[UpcycleResult], finetune_steps: int) -> str:
    head = (f'| model | static source | static top-1 | upcycled step 0 | max abs logit diff | '
            f'upcycled + {finetune_steps} steps | random init + {finetune_steps} steps |')
    lines = [head, '|' + '---|' * 7]
    for r in results:
        lines.append(f'| {r.model} | {r.source} | {r.source_accuracy:.2f} | {r.step0_accuracy:.2f} | '
                     f'{r.step0_max_abs_diff:.1e} | {r.upcycled_accuracy:.2f} | {r.scratch_accuracy:.2f} |')
    return '\n'.join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS), help='dynamic models to upcycle')
    p.add_argument('--static-steps', type=int, default=300, help='training steps of each static source')
    p.add_argument('--finetune-steps', type=int, default=100, help='fine-tuning steps of each dynamic model')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--size', type=int, default=32, help='image size (px)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--cache-dir', type=Path, default=None,
                   help='Hugging Face cache to publish the static sources to (default: a temporary folder)')
    p.add_argument('--threads', type=int, default=None, help='torch intra-op threads')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args.models, static_steps=args.static_steps, finetune_steps=args.finetune_steps,
                  batch_size=args.batch_size, lr=args.lr, size=args.size, seed=args.seed, cache_dir=args.cache_dir)
    print(format_table(results, args.finetune_steps))
    return 0
