"""Fine-tune a ViT on a labelled image dataset, as the paper does it (Dosovitskiy et al., 2021, Sec. 3.2, B.1.1).

Three modes:
- ``linear``: frozen backbone; the head is the closed-form ridge regression on the class-token
  features (the paper's linear few-shot evaluation, model/probe.py). Seconds on a CPU.
- ``head``: frozen backbone, a fresh zero-initialised D x K head trained by gradient descent.
- ``full``: every weight trained, starting from a fresh zero-initialised head (the paper's
  recipe), optionally at another resolution (position embeddings resampled in 2-D by the importer).

Training is deterministic in the seed: shuffling and augmentation draw from a generator
seeded per epoch, so a run resumed from its last saved epoch gives the same weights as one
that never stopped. The state needed to resume (weights, optimizer, epoch, history) is written
to ``train_state.pt`` after every epoch and removed once the final checkpoint is written.
The result is a native checkpoint (model/native.py) that the importer and the exporter read.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from model.checkpoint import LoadedCheckpoint, import_checkpoint
from model.datasets import DatasetError, LabeledFiles, load_images, scan_dataset, stratified_split
from model.native import save_native
from model.probe import extract_features, fit_ridge, install_head
from model.vit import VisionTransformer
from service.core.metadata import Preprocessing

Mode = Literal["linear", "head", "full"]
MODES: tuple[str, ...] = ("linear", "head", "full")
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
STATE_NAME = "train_state.pt"
STATE_VERSION = 1

# Default learning rates when none is given: AdamW's usual fine-tuning rates, and for SGD the
# middle of the paper's fine-tuning grid {0.001, 0.003, 0.01, 0.03} (Table 4).
DEFAULT_LR = {("adamw", "head"): 1e-3, ("adamw", "full"): 1e-4, ("sgd", "head"): 0.03, ("sgd", "full"): 0.01}

# Augmentation defaults: a small random affine map per image (rotation, scale, shift), borders
# replicated. Mild on purpose: it must not change what the image shows (no flips: digits and text
# have a side).
AUG_MAX_ROTATION_DEG = 12.0
AUG_SCALE_RANGE = (0.85, 1.15)
AUG_MAX_SHIFT = 0.12  # fraction of the image side


class FinetuneError(ValueError):
    """Fine-tuning cannot start or resume as asked; the message says why."""


@dataclass(frozen=True)
class FinetuneOptions:
    """How to train. Everything here is recorded with the checkpoint and must match on --resume.

    Args:
        mode: "linear", "head" or "full" (see the module docstring).
        epochs: passes over the training split (ignored by "linear").
        batch_size: images per step (and per feature-extraction batch).
        lr: peak learning rate; None picks DEFAULT_LR for the optimizer and mode.
        weight_decay: decoupled weight decay (AdamW) or L2 (SGD), not applied to biases, norms,
            position embeddings or the class token. The paper fine-tunes without it.
        optimizer: "adamw", or "sgd" with momentum 0.9 as the paper fine-tunes.
        warmup_fraction: share of the steps with a linear warm-up before the cosine decay.
        grad_clip_norm: clip the global gradient norm (the paper clips at 1); 0 disables.
        label_smoothing: cross-entropy label smoothing.
        augment: random small rotations, scalings and shifts of the training images.
        aug_rotation_deg: largest rotation, degrees either way.
        aug_scale: (smallest, largest) zoom of the content; below 1 shrinks it inside the frame.
        aug_shift: largest shift, as a fraction of the image side, either way on each axis.
        val_split: fraction of every class held out for validation (0 disables).
        seed: fixes the split, the shuffling, the augmentation and the ridge cross-validation.
    """

    mode: Mode = "full"
    epochs: int = 10
    batch_size: int = 64
    lr: float | None = None
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    warmup_fraction: float = 0.05
    grad_clip_norm: float = 1.0
    label_smoothing: float = 0.0
    augment: bool = True
    aug_rotation_deg: float = AUG_MAX_ROTATION_DEG
    aug_scale: tuple[float, float] = AUG_SCALE_RANGE
    aug_shift: float = AUG_MAX_SHIFT
    val_split: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise FinetuneError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.optimizer not in OPTIMIZERS:
            raise FinetuneError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise FinetuneError(f"need epochs >= 1 and batch_size >= 1, got {self.epochs} and {self.batch_size}")
        if not 0 <= self.val_split < 1:
            raise FinetuneError(f"val_split must be in [0, 1), got {self.val_split}")
        if not 0 <= self.warmup_fraction < 1:
            raise FinetuneError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if len(self.aug_scale) != 2 or not 0 < self.aug_scale[0] <= self.aug_scale[1]:
            raise FinetuneError(f"aug_scale must be (min, max) with 0 < min <= max, got {self.aug_scale}")
        object.__setattr__(self, "aug_scale", tuple(float(v) for v in self.aug_scale))

    @property
    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR[(self.optimizer, "head" if self.mode == "linear" else self.mode)]


@dataclass
class EpochRecord:
    """One epoch's figures, as logged and kept in the checkpoint's history.

    Args:
        epoch: 1-based epoch number.
        train_loss, train_accuracy: over the epoch's (augmented) training batches.
        val_loss, val_accuracy: on the validation split after the epoch; None without one.
        images_per_s: training throughput.
        seconds: wall time of the epoch, validation included.
    """

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    images_per_s: float
    seconds: float


@dataclass
class FinetuneResult:
    """Where the checkpoint went and how training went.

    Args:
        checkpoint_dir: the native checkpoint directory written.
        classes: the class names, in head order.
        history: one dict per epoch (EpochRecord fields; the ridge fit for "linear").
        val_accuracy: final validation accuracy, None without a validation split.
        num_train, num_val: images in each split (unreadable ones excluded).
        skipped: (path, reason) of every image that could not be read.
    """

    checkpoint_dir: Path
    classes: tuple[str, ...]
    history: list[dict[str, Any]]
    val_accuracy: float | None
    num_train: int
    num_val: int
    skipped: list[tuple[str, str]] = field(default_factory=list)


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto" -> CUDA when present, else CPU; "cuda" without a GPU is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FinetuneError("--device cuda asked, but torch sees no CUDA device")
    return torch.device(name)


def augment_batch(
    pixels: torch.Tensor,
    generator: torch.Generator,
    *,
    rotation_deg: float = AUG_MAX_ROTATION_DEG,
    scale: tuple[float, float] = AUG_SCALE_RANGE,
    shift: float = AUG_MAX_SHIFT,
) -> torch.Tensor:
    """Apply one random affine map per image to (B, C, H, W); borders are replicated, not blacked out."""
    b = pixels.shape[0]
    rand = torch.rand(b, 4, generator=generator).to(pixels.device)  # (B, 4) uniform in [0, 1)
    angle = (2 * rand[:, 0] - 1) * math.radians(rotation_deg)
    low, high = scale
    zoom = 1.0 / (low + (high - low) * rand[:, 1])  # the grid maps output to input: inverse scale
    offset = (2 * rand[:, 2:] - 1) * 2 * shift  # (B, 2); affine_grid coordinates span [-1, 1]: 2 per side
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(pixels.dtype), list(pixels.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _param_groups(model: VisionTransformer, options: FinetuneOptions) -> list[dict]:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # Biases, LayerNorm gains, position embeddings and the class token are not decayed (common ViT practice).
    no_decay = [p for n, p in trainable if p.ndim <= 1 or n in ("pos_embed", "cls_token")]
    decay = [p for n, p in trainable if not (p.ndim <= 1 or n in ("pos_embed", "cls_token"))]
    return [{"params": decay, "weight_decay": options.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: VisionTransformer, options: FinetuneOptions, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer over the trainable parameters, and a linear warm-up + cosine decay per step."""
    groups = _param_groups(model, options)
    if options.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=options.peak_lr, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(groups, lr=options.peak_lr)
    warmup = int(options.warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _logits(model: VisionTransformer, pixels: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "head":
        with torch.no_grad():  # frozen backbone: no activations kept for backward
            features = model.pool(model.forward_features(pixels))  # (B, D)
        return model.head(features)
    return model(pixels)


@torch.no_grad()
def evaluate(model: VisionTransformer, loader, device: torch.device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over a loader."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for pixels, targets in loader:
        pixels, targets = pixels.to(device), targets.to(device)
        logits = model(pixels)
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(dim=1) == targets).sum().item()
        count += len(targets)
    return loss_sum / count, correct / count


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Shuffling and augmentation of one epoch depend on (seed, epoch) only: resumes replay exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def train_one_epoch(
    model: VisionTransformer,
    loader,
    optimizer,
    scheduler,
    options: FinetuneOptions,
    device: torch.device,
    generator: torch.Generator,
    desc: str,
) -> tuple[float, float, float]:
    """One pass over the loader; returns (mean loss, accuracy, images/s)."""
    from tqdm.auto import tqdm

    model.train()
    if options.mode == "head":
        model.eval()  # the frozen backbone stays in eval mode; only the head learns
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum, correct, count = 0.0, 0, 0
    start = time.perf_counter()
    with tqdm(
        loader, desc=desc, unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True, disable=None
    ) as bar:  # None: a bar on a terminal, none in logs
        for pixels, targets in bar:
            pixels, targets = pixels.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if options.augment:
                pixels = augment_batch(
                    pixels,
                    generator,
                    rotation_deg=options.aug_rotation_deg,
                    scale=options.aug_scale,
                    shift=options.aug_shift,
                )
            logits = _logits(model, pixels, options.mode)
            loss = F.cross_entropy(logits, targets, label_smoothing=options.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if options.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, options.grad_clip_norm)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(targets)
            correct += (logits.detach().argmax(dim=1) == targets).sum().item()
            count += len(targets)
            rate = count / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.0f}")
    return loss_sum / count, correct / count, count / max(time.perf_counter() - start, 1e-9)


def _loader(
    dataset,
    indices: list[int],
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None,
    num_workers: int,
    device: torch.device,
) -> torch.utils.data.DataLoader:
    subset = torch.utils.data.Subset(dataset, indices)
    return torch.utils.data.DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )


def _load_base(base: LoadedCheckpoint | str, image_size: int | None) -> LoadedCheckpoint:
    if isinstance(base, LoadedCheckpoint):
        if image_size is not None and image_size != base.config.image_size:
            raise FinetuneError("image_size needs a checkpoint source to resample from, not a loaded model")
        return base
    return import_checkpoint(base, image_size=image_size)


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write leaves the previous epoch's state intact


def finetune(
    base: LoadedCheckpoint | str,
    data: str | os.PathLike | LabeledFiles,
    output_dir: str | os.PathLike,
    options: FinetuneOptions = FinetuneOptions(),
    *,
    num_classes: int | None = None,
    image_size: int | None = None,
    preprocessing: Preprocessing | None = None,
    resume: bool = False,
    device: str = "auto",
    num_workers: int = 0,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    on_epoch_end: Callable[[EpochRecord], None] | None = None,
    extra: dict[str, Any] | None = None,
) -> FinetuneResult:
    """Fine-tune ``base`` on ``data`` and write a native checkpoint to ``output_dir``.

    Args:
        base: a checkpoint source the importer reads (``random:...``, a native directory, timm,
            Hugging Face...) or an already loaded checkpoint (e.g. a fresh config for from-scratch training).
        data: an image folder (one sub-folder per class), a CSV of path,label, or a scanned dataset.
        output_dir: where vitserve.json + model.safetensors (and, while training, train_state.pt) go.
        options: the training recipe.
        num_classes: the number of classes the caller expects; an error when the data has another.
        image_size: train at this resolution (position embeddings resampled); None keeps the base's.
        preprocessing: how files become pixels; None takes the base checkpoint's.
        resume: continue from ``output_dir/train_state.pt`` (same options and data required).
        device: "auto", "cpu", "cuda" or "cuda:N".
        num_workers: DataLoader workers for datasets decoded per item (too large to preload).
        log: receives one line per event (dataset summary, skipped images, one line per epoch).
        on_epoch_end: called after each epoch's state is saved.
        extra: further JSON-serialisable provenance recorded under "finetune" in vitserve.json.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FinetuneError(f"{output_dir} is a file; the checkpoint goes into a directory")
    state_path = output_dir / STATE_NAME
    files = data if isinstance(data, LabeledFiles) else scan_dataset(data)
    if num_classes is not None and num_classes != len(files.classes):
        raise DatasetError(
            f"--num-classes is {num_classes} but the dataset has {len(files.classes)} classes: "
            f"{', '.join(files.classes)}"
        )
    state = None
    if resume:
        if not state_path.is_file():
            raise FinetuneError(
                f"nothing to resume in {output_dir}: no {STATE_NAME} (the run finished, or never completed an epoch)"
            )
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        _check_resumable(state, options, files)

    torch.manual_seed(options.seed)
    dev = resolve_device(device)
    loaded = _load_base(base, image_size)
    model, config = loaded.model, loaded.config
    preprocessing = preprocessing or loaded.preprocessing
    if preprocessing.image_size != config.image_size:
        raise FinetuneError(
            f"preprocessing gives {preprocessing.image_size}px images, the model takes {config.image_size}px"
        )

    from tqdm.auto import tqdm

    def decode_progress(items):
        return tqdm(items, desc="decode", unit="img", leave=False, file=sys.stderr, disable=None)

    dataset, files_kept, report = load_images(files, preprocessing, progress=decode_progress)
    if report.skipped:
        log(report.describe())
    missing = sorted(set(range(len(files.classes))) - set(files_kept.targets))
    if missing:
        raise DatasetError("no readable images left for class(es): " + ", ".join(files.classes[i] for i in missing))
    train_idx, val_idx = stratified_split(files_kept.targets, options.val_split, options.seed)
    log(
        f"dataset: {len(files_kept)} images, {len(files.classes)} classes; train {len(train_idx)}, "
        f"val {len(val_idx)}; mode {options.mode} on {dev}"
    )

    classes = files.classes
    model.reset_head(len(classes))  # the paper: drop the pre-trained head, fresh zero-initialised D x K
    config = model.config
    model.to(dev)
    history: list[dict[str, Any]] = []
    val_accuracy: float | None = None

    if options.mode == "linear":
        val_accuracy, history = _fit_linear(model, dataset, train_idx, val_idx, options, dev, num_workers, log)
    else:
        history, val_accuracy = _train(
            model,
            dataset,
            train_idx,
            val_idx,
            options,
            dev,
            num_workers,
            state,
            state_path,
            output_dir,
            files,
            log,
            on_epoch_end,
        )

    model.to("cpu").eval()
    source = loaded.source if isinstance(base, str) else (loaded.origin or loaded.source)
    provenance = {
        "finetune": {
            **dataclasses.asdict(options),
            "lr": options.peak_lr,
            "image_size": config.image_size,
            "dataset": str(data) if not isinstance(data, LabeledFiles) else "",
            "num_train": len(train_idx),
            "num_val": len(val_idx),
            "skipped_images": len(report.skipped),
            "val_accuracy": val_accuracy,
            "history": history,
            "torch": torch.__version__,
            **(extra or {}),
        }
    }
    save_native(output_dir, model, config, classes, preprocessing, source=source, extra=provenance)
    state_path.unlink(missing_ok=True)
    return FinetuneResult(
        output_dir,
        classes,
        history,
        val_accuracy,
        len(train_idx),
        len(val_idx),
        [(str(p), r) for p, r in report.skipped],
    )


def _fit_linear(model, dataset, train_idx, val_idx, options, dev, num_workers, log):
    """Mode "linear": ridge head on frozen features; returns (val accuracy, one history record)."""
    from tqdm.auto import tqdm

    def features(indices: list[int], desc: str) -> tuple[np.ndarray, np.ndarray]:
        loader = _loader(
            dataset, indices, options.batch_size, shuffle=False, generator=None, num_workers=num_workers, device=dev
        )
        return extract_features(
            model,
            loader,
            dev,
            progress=lambda xs: tqdm(xs, desc=desc, unit="batch", leave=False, file=sys.stderr, disable=None),
        )

    start = time.perf_counter()
    train_x, train_y = features(train_idx, "features (train)")
    fit = fit_ridge(train_x, train_y, model.config.num_classes, seed=options.seed)
    install_head(model, fit)
    train_acc = float(np.mean((train_x @ fit.weight.T + fit.bias).argmax(axis=1) == train_y))
    val_acc = None
    if val_idx:
        val_x, val_y = features(val_idx, "features (val)")
        val_acc = float(np.mean((val_x @ fit.weight.T + fit.bias).argmax(axis=1) == val_y))
    seconds = time.perf_counter() - start
    val_text = f"{val_acc:.4f}" if val_acc is not None else "n/a"
    log(
        f"linear probe: lambda {fit.lam:.4g} (cv accuracy {fit.cv_accuracy:.4f}), train accuracy {train_acc:.4f}, "
        f"val accuracy {val_text}, {seconds:.1f}s"
    )
    record = {
        "epoch": 1,
        "train_accuracy": train_acc,
        "val_accuracy": val_acc,
        "ridge_lambda": fit.lam,
        "cv_accuracy": fit.cv_accuracy,
        "seconds": seconds,
    }
    return val_acc, [record]


def _check_resumable(state: dict, options: FinetuneOptions, files: LabeledFiles) -> None:
    if state.get("version") != STATE_VERSION:
        raise FinetuneError(f"train state version {state.get('version')!r} is not {STATE_VERSION}")
    saved = state["options"]
    now = dataclasses.asdict(options)
    changed = sorted(k for k in now if saved.get(k) != now[k])
    if changed:
        raise FinetuneError(
            "--resume needs the options of the interrupted run; changed: "
            + ", ".join(f"{k} ({saved.get(k)!r} -> {now[k]!r})" for k in changed)
        )
    if tuple(state["classes"]) != files.classes or state["num_files"] != len(files):
        raise FinetuneError(
            f"--resume needs the same dataset: it had {state['num_files']} images of classes "
            f"{list(state['classes'])}, now {len(files)} of {list(files.classes)}"
        )


def _train(
    model,
    dataset,
    train_idx,
    val_idx,
    options,
    dev,
    num_workers,
    state,
    state_path,
    output_dir,
    files,
    log,
    on_epoch_end,
):
    """Modes "head" and "full": the epoch loop, saving the resumable state after every epoch."""
    if options.mode == "head":
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith("head.")
    steps_per_epoch = math.ceil(len(train_idx) / options.batch_size)
    optimizer, scheduler = build_optimizer(model, options, options.epochs * steps_per_epoch)
    start_epoch = 0
    history: list[dict[str, Any]] = []
    if state is not None:
        if state["image_size"] != model.config.image_size:
            raise FinetuneError(
                f"--resume needs the interrupted run's --image-size {state['image_size']}, "
                f"got {model.config.image_size}"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"], list(state["history"])
        log(f"resumed from {state_path} after epoch {start_epoch}/{options.epochs}")
    val_loader = (
        _loader(
            dataset, val_idx, options.batch_size, shuffle=False, generator=None, num_workers=num_workers, device=dev
        )
        if val_idx
        else None
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    val_accuracy = history[-1]["val_accuracy"] if history else None
    for epoch in range(start_epoch + 1, options.epochs + 1):
        generator = _epoch_generator(options.seed, epoch)
        train_loader = _loader(
            dataset,
            train_idx,
            options.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=num_workers,
            device=dev,
        )
        start = time.perf_counter()
        train_loss, train_acc, rate = train_one_epoch(
            model, train_loader, optimizer, scheduler, options, dev, generator, desc=f"epoch {epoch}/{options.epochs}"
        )
        val_loss, val_accuracy = evaluate(model, val_loader, dev) if val_loader else (None, None)
        record = EpochRecord(epoch, train_loss, train_acc, val_loss, val_accuracy, rate, time.perf_counter() - start)
        history.append(dataclasses.asdict(record))
        val_text = f"val loss {val_loss:.4f} acc {val_accuracy:.4f}" if val_loader else "no val split"
        log(
            f"epoch {epoch}/{options.epochs}: train loss {train_loss:.4f} acc {train_acc:.4f}, {val_text}, "
            f"{rate:.0f} img/s, {record.seconds:.1f}s"
        )
        _save_state(
            state_path,
            {
                "version": STATE_VERSION,
                "epoch": epoch,
                "options": dataclasses.asdict(options),
                "classes": list(files.classes),
                "num_files": len(files),
                "image_size": model.config.image_size,
                "history": history,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
            },
        )
        if on_epoch_end is not None:
            on_epoch_end(record)
    for param in model.parameters():
        param.requires_grad = True
    return history, val_accuracy
