"""Reproduce the bundled demo model, models/digits/: a tiny ViT trained from scratch on sklearn's digits.

    .venv/bin/python scripts/train_digits.py            # writes models/digits/ (checkpoint, model.onnx, README.md)

Recipe: scikit-learn's 1,797 handwritten digits (8x8, ink 0..16) rendered as 32x32 RGB PNG files,
dark ink on white (scripts/digits_data.py); 20% of every digit held out with a fixed seed and never
trained on; a ViT with patch 8 (16 tokens), D=96, depth 6, 4 heads, trained from random weights
by `model.finetune` (mode "full", AdamW, cosine schedule, small random rotations/scalings/shifts);
exported to fp32 ONNX by `model.export`; accuracy measured on the held-out images through that
ONNX file with the service's own preprocessing, exactly as `make run` serves it.

Deterministic on a given machine (fixed seeds, CPU); another CPU or thread count may change the
last bits of the weights and hence a held-out image or two.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's packages first

from model.checkpoint import LoadedCheckpoint, state_dict_sha256  # noqa: E402
from model.config import ViTConfig  # noqa: E402
from model.finetune import FinetuneOptions, finetune  # noqa: E402
from model.vit import VisionTransformer  # noqa: E402
from scripts.digits_data import (  # noqa: E402
    DIGITS_HELDOUT_FRACTION,
    DIGITS_SIZE,
    DIGITS_SPLIT_SEED,
    digits_split,
    heldout_digit_pixels,
    write_digits_folder,
)
from service.core.metadata import Preprocessing  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUTPUT = Path("models/digits")  # relative to the repository: it is the `source` recorded in the ONNX metadata
SEED = 0
# One thread: the float reductions then do not depend on the core count, so any CPU with this
# torch build reproduces the same weights; and with tiny matrices a second thread gains little.
NUM_THREADS = 1
LABELS = tuple(str(d) for d in range(10))
CONFIG = ViTConfig(
    image_size=DIGITS_SIZE,
    patch_size=8,
    embed_dim=96,
    depth=6,
    num_heads=4,
    mlp_dim=192,
    num_classes=10,
    name="vit_digits_patch8_32",
)
# Shortest-side resize to the model size and mean/std 0.5: any uploaded image (a photo, a drawing
# on a large canvas) is scaled down whole, and white paper maps to +1 as in training.
PREPROCESSING = Preprocessing(
    image_size=DIGITS_SIZE,
    resize_size=DIGITS_SIZE,
    resize_mode="shortest",
    interpolation="bicubic",
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
)
OPTIONS = FinetuneOptions(
    mode="full",
    epochs=50,
    batch_size=32,
    lr=1e-3,
    weight_decay=0.05,
    optimizer="adamw",
    warmup_fraction=0.1,
    grad_clip_norm=1.0,
    label_smoothing=0.1,
    augment=True,
    val_split=0.1,
    seed=SEED,
)


def fresh_model() -> LoadedCheckpoint:
    torch.manual_seed(SEED)
    model = VisionTransformer(CONFIG)
    return LoadedCheckpoint(
        model=model,
        config=CONFIG,
        labels=LABELS,
        preprocessing=PREPROCESSING,
        source=f"random:{CONFIG.name}",
        weights_sha256=state_dict_sha256(model.state_dict()),
    )


def heldout_accuracy(onnx_path: Path) -> tuple[float, int]:
    """Accuracy on the held-out digits through the ONNX file, preprocessed by the service's own code."""
    import onnx
    import onnxruntime as ort

    from service.core.metadata import ModelMetadata

    model = onnx.load(str(onnx_path))
    metadata = ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
    pixels, targets = heldout_digit_pixels(metadata.preprocessing)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: pixels})[0]
    predicted = [int(metadata.labels[k]) for k in logits.argmax(axis=1)]
    correct = int(np.sum(np.asarray(predicted) == targets))
    return correct / len(targets), len(targets)


def file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_readme(output: Path, accuracy: float, count: int, train_seconds: float, result) -> None:
    ckpt_kb = (output / "model.safetensors").stat().st_size / 1024
    onnx_kb = (output / "model.onnx").stat().st_size / 1024
    params = sum(p.numel() for p in VisionTransformer(CONFIG).parameters())
    val = result.val_accuracy
    sha = file_sha256(output / "model.safetensors")
    rows = [
        (
            "held-out accuracy",
            f"**{accuracy:.2%}** ({round(accuracy * count)}/{count} images never trained on), "
            "measured through `model.onnx` with the service's preprocessing",
        ),
        ("validation accuracy during training", f"{val:.2%} (10% of the training split)"),
        (
            "architecture",
            f"ViT, image {CONFIG.image_size}, patch {CONFIG.patch_size} ({CONFIG.num_patches} tokens + class token), "
            f"D={CONFIG.embed_dim}, depth {CONFIG.depth}, {CONFIG.num_heads} heads, MLP {CONFIG.mlp_dim}; "
            f"{params:,} parameters",
        ),
        ("labels", '"0" .. "9"'),
        (
            "preprocessing",
            f"shortest side to {PREPROCESSING.resize_size} ({PREPROCESSING.interpolation}), "
            f"centre crop {PREPROCESSING.image_size}, mean = std = 0.5",
        ),
        (
            "files",
            f"`model.safetensors` + `vitserve.json` (native checkpoint, {ckpt_kb:.0f} KiB), "
            f"`model.onnx` (fp32, {onnx_kb:.0f} KiB)",
        ),
        (
            "data",
            "`sklearn.datasets.load_digits`, rendered 32x32 RGB PNG, dark ink on white, bicubic upsampling; "
            f"held out: {DIGITS_HELDOUT_FRACTION:.0%} of every digit, seed {DIGITS_SPLIT_SEED}",
        ),
        (
            "recipe",
            f"mode full from random init, {OPTIONS.epochs} epochs, batch {OPTIONS.batch_size}, AdamW lr {OPTIONS.lr} "
            f"(warm-up {OPTIONS.warmup_fraction:.0%}, cosine), weight decay {OPTIONS.weight_decay}, "
            f"label smoothing {OPTIONS.label_smoothing}, random rotation/scale/shift, seed {SEED}",
        ),
        (
            "weights",
            f"sha256 of the safetensors file `{sha}` "
            "(a rerun of the command below on the same machine reproduces it bit for bit)",
        ),
        (
            "training time",
            f"{train_seconds / 60:.1f} min, {NUM_THREADS} CPU thread "
            f"({platform.machine()}, torch {torch.__version__}, shared with other jobs)",
        ),
    ]
    table = "\n".join(["| | |", "| --- | --- |", *(f"| {key} | {value} |" for key, value in rows)])
    text = f"""# The bundled demo model: a tiny ViT for handwritten digits

`make run` serves `model.onnx` from this folder: a Vision Transformer trained **from scratch** by
this repository's own code on scikit-learn's handwritten digits (1,797 images of 10 digits, 8x8
pixels, shipped inside the scikit-learn wheel, so everything works offline). It recognises one
digit, drawn dark on a light background; it is a demo, not an ImageNet classifier (see the
repository README for serving the real ViT-B/16).

{table}

Reproduce (from the repository root; it rewrites this folder, README included):

```bash
.venv/bin/python scripts/train_digits.py
```

`tests/model/test_demo_model.py` checks the held-out accuracy through `model.onnx` and that
re-exporting the checkpoint gives the committed `model.onnx` (so the two never drift apart).
"""
    (output / "README.md").write_text(text, encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help="checkpoint directory (default models/digits)")
    args = parser.parse_args()
    os.chdir(REPO)
    torch.set_num_threads(NUM_THREADS)
    from model.export import export_checkpoint

    _, _, train, held = digits_split()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_digits_folder(Path(tmp) / "train", train)
        assert len(files) == len(train) and not set(train) & set(held)
        start = time.perf_counter()
        result = finetune(
            fresh_model(),
            files,
            args.output,
            OPTIONS,
            num_classes=10,
            device="cpu",
            extra={"dataset": f"sklearn digits, train split ({len(train)} images), see scripts/{Path(__file__).name}"},
        )
        train_seconds = time.perf_counter() - start
    if result.classes != LABELS:
        raise SystemExit(f"classes came out as {result.classes}, expected {LABELS}")
    onnx_path = args.output / "model.onnx"
    export_checkpoint(str(args.output), onnx_path, precision="fp32", verify=True)
    accuracy, count = heldout_accuracy(onnx_path)
    write_readme(args.output, accuracy, count, train_seconds, result)
    print(f"held-out accuracy {accuracy:.4f} on {count} images; trained in {train_seconds:.0f}s; wrote {args.output}")
    return 0 if accuracy >= 0.97 else 1


if __name__ == "__main__":
    sys.exit(main())
