"""`vitserve finetune`: base checkpoint + labelled images -> a native checkpoint that `vitserve export` reads.

Cheap to import (the CLI builds its parser from every command module): torch is imported in the handler.
"""

from __future__ import annotations

import argparse
import sys

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a checkpoint on your own classes (linear probe, head only, or full)",
        description="Fine-tune BASE (any checkpoint the importer reads: random:NAME, a native dir, timm, Hugging "
        "Face, .npz) on DATA, an image folder (one sub-folder per class) or a CSV of path,label. "
        "The pre-trained head is replaced by a fresh zero-initialised one for the dataset's classes. "
        "Writes a native checkpoint (vitserve.json + model.safetensors) to OUTDIR.",
    )
    parser.add_argument("base", metavar="BASE", help="the checkpoint to start from")
    parser.add_argument("data", metavar="DATA", help="image folder (DATA/<class>/<image>) or CSV of path,label")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="directory for the checkpoint")
    parser.add_argument(
        "--mode",
        choices=("linear", "head", "full"),
        default="full",
        help="linear: closed-form ridge head on frozen features (the paper's linear probe); "
        "head: train only the head; full: train everything (default)",
    )
    parser.add_argument(
        "--num-classes", type=int, default=None, help="the number of classes you expect; an error if DATA has another"
    )
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training split (default 10)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: AdamW 1e-3 head / 1e-4 full; SGD 0.03 / 0.01)",
    )
    parser.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (default 0, as the paper)")
    parser.add_argument(
        "--optimizer",
        choices=("adamw", "sgd"),
        default="adamw",
        help="adamw (default) or sgd with momentum 0.9 (the paper's fine-tuning)",
    )
    parser.add_argument("--warmup", type=float, default=0.05, help="fraction of steps warming up (default 0.05)")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing")
    parser.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="no random rotations/scalings/shifts of training images",
    )
    # The augmentation defaults mirror model.finetune.AUG_* (importing it here would pull in torch).
    parser.add_argument(
        "--aug-rotation",
        type=float,
        default=12.0,
        metavar="DEG",
        help="largest random rotation, degrees either way (default 12)",
    )
    parser.add_argument(
        "--aug-scale",
        type=float,
        nargs=2,
        default=(0.85, 1.15),
        metavar=("MIN", "MAX"),
        help="random zoom range of the content; below 1 shrinks it (default 0.85 1.15)",
    )
    parser.add_argument(
        "--aug-shift",
        type=float,
        default=0.12,
        metavar="FRACTION",
        help="largest random shift, fraction of the image side (default 0.12)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="fine-tune at this resolution (position embeddings are interpolated in 2-D)",
    )
    parser.add_argument(
        "--val-split",
        type=float,
        default=0.1,
        help="fraction of every class held out for validation (default 0.1; 0 = none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="fixes split, shuffling and augmentation (default 0)")
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from OUTDIR/train_state.pt (same options)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument(
        "--workers", type=int, default=0, help="DataLoader workers for datasets too large to hold in memory"
    )
    parser.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    from model.checkpoint import CheckpointError
    from model.datasets import DatasetError
    from model.finetune import FinetuneError, FinetuneOptions, finetune

    try:
        options = FinetuneOptions(
            mode=args.mode,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            optimizer=args.optimizer,
            warmup_fraction=args.warmup,
            label_smoothing=args.label_smoothing,
            augment=args.augment,
            aug_rotation_deg=args.aug_rotation,
            aug_scale=tuple(args.aug_scale),
            aug_shift=args.aug_shift,
            val_split=args.val_split,
            seed=args.seed,
        )
        result = finetune(
            args.base,
            args.data,
            args.output,
            options,
            num_classes=args.num_classes,
            image_size=args.image_size,
            resume=args.resume,
            device=args.device,
            num_workers=args.workers,
        )
    except (DatasetError, FinetuneError, CheckpointError) as exc:
        print(f"vitserve finetune: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(
            f"\nvitserve finetune: interrupted; the last finished epoch is saved in {args.output}: "
            "run the same command with --resume to continue",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    accuracy = f"{result.val_accuracy:.4f}" if result.val_accuracy is not None else "n/a (no val split)"
    print(
        f"wrote {result.checkpoint_dir} ({len(result.classes)} classes, {result.num_train} train / "
        f"{result.num_val} val images, val accuracy {accuracy})"
    )
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable image(s); see the list above", file=sys.stderr)
    print(f"next: vitserve export {result.checkpoint_dir} -o model.onnx")
    return 0
