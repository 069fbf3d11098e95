"""`vitserve export` and `vitserve verify`: checkpoint -> verified ONNX file, and re-checking one.

Cheap to import (the CLI builds its parser from every command module): torch, onnx and
onnxruntime are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_VERIFICATION_FAILED = 1
EXIT_BAD_INPUT = 2


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export",
        help="export a checkpoint to one ONNX file with fused attention, then verify it",
        description="Import a checkpoint (timm file, Hugging Face dir, .npz, native dir, or random:NAME), export it "
        "to ONNX with one fused Attention node per block and the serving metadata inside, and verify "
        "it against PyTorch.",
    )
    export.add_argument(
        "source",
        metavar="SOURCE",
        nargs="?",
        default=None,
        help="checkpoint to export, e.g. random:vit_tiny_patch16_224 (or give --from-onnx)",
    )
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    export.add_argument(
        "--from-onnx",
        default=None,
        metavar="ONNX",
        help="instead of SOURCE: copy an ONNX file from elsewhere with vitserve metadata embedded "
        "(from the flags below and its ONNX.json sidecar), so serving it needs no flags",
    )
    export.add_argument(
        "--precision",
        choices=("fp32", "fp16", "int8"),
        default=None,
        help="fp32 (exact), fp16 (GPU), int8 (dynamic quantization, CPU); default from --target, else fp32",
    )
    export.add_argument(
        "--target",
        choices=("gpu", "cpu"),
        default=None,
        help="only picks the default precision: gpu -> fp16, cpu -> fp32",
    )
    export.add_argument(
        "--opset", type=int, default=23, help="ONNX opset, 23 (default) to 25: the fused Attention op needs >= 23"
    )
    export.add_argument(
        "--name",
        default=None,
        help="the name the service serves the model under (default: its architecture), e.g. for a fine-tune",
    )
    export.add_argument("--no-verify", dest="verify", action="store_false", help="skip the parity checks")
    export.add_argument(
        "--golden",
        nargs="+",
        type=Path,
        default=[],
        metavar="IMAGE",
        help="images whose top-1 (from the exported file) a server checks before a new version takes traffic",
    )
    export.add_argument(
        "--external-data-threshold-mb",
        type=float,
        default=None,
        help="weights above this many MiB go to <output>.data (default 2000; protobuf's limit is 2 GiB)",
    )
    _add_checkpoint_options(export)
    _add_description_options(export)
    export.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    export.set_defaults(func=run_export)

    verify = subparsers.add_parser(
        "verify",
        help="check an exported ONNX file against its source checkpoint",
        description="Check that an ONNX file is a vitserve export, that its attention is fused (one node per "
        "block, no Softmax), and that ONNX Runtime matches PyTorch on random inputs and real photos.",
    )
    verify.add_argument("model", metavar="MODEL", help="the .onnx file")
    verify.add_argument("--against", required=True, metavar="SOURCE", help="the checkpoint it was exported from")
    _add_checkpoint_options(verify)
    verify.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    verify.set_defaults(func=run_verify)


def _add_description_options(parser: argparse.ArgumentParser) -> None:
    """--mean, --labels ... for --from-onnx, the fields `vitserve serve` takes (--image-size is shared above)."""
    from service.core.spec import SPEC_FIELDS, flag_name

    group = parser.add_argument_group("model description for --from-onnx (as for `vitserve serve`)")
    for name, help_text in SPEC_FIELDS.items():
        if name != "image_size":
            group.add_argument(flag_name(name), dest=name, default=None, help=help_text)


def _add_checkpoint_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-name", default=None, help="variant name when the checkpoint does not say it")
    parser.add_argument("--num-classes", type=int, default=None, help="replace the head with this many classes")
    parser.add_argument(
        "--image-size", type=int, default=None, help="input resolution (position embeddings are interpolated)"
    )


def run_export(args: argparse.Namespace) -> int:
    from model.embed_metadata import check_export_mode, run_from_onnx

    problem = check_export_mode(args)
    if problem:
        print(f"vitserve export: error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.from_onnx:
        code = run_from_onnx(args, external_data_threshold_bytes=external_data_threshold_bytes(args))
        return code if code else _write_golden(args)
    from model.export import ExportError, export_checkpoint
    from model.verify import ExportFileError, VerificationFailed, format_summary, inspect_export

    try:
        result, report = export_checkpoint(
            args.source,
            args.output,
            precision=args.precision,
            target=args.target,
            model_name=args.model_name,
            num_classes=args.num_classes,
            image_size=args.image_size,
            opset=args.opset,
            external_data_threshold_bytes=external_data_threshold_bytes(args),
            verify=args.verify,
            progress=args.progress,
            name=args.name or "",
        )
    except VerificationFailed as exc:
        print(format_summary(exc.report.info, exc.report))
        print(
            f"vitserve export: wrote {args.output} but it FAILED verification: {'; '.join(exc.failures)}",
            file=sys.stderr,
        )
        return EXIT_VERIFICATION_FAILED
    except (ExportError, ExportFileError, ValueError, KeyError, OSError) as exc:
        print(f"vitserve export: error: {_message(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_summary(report.info if report else inspect_export(result.path), report))
    return _write_golden(args)


def _write_golden(args: argparse.Namespace) -> int:
    if not args.golden:
        return 0
    from model.golden import GoldenError, add_golden_images

    try:
        entries = add_golden_images(args.output, args.golden)
    except GoldenError as exc:
        print(f"vitserve export: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print("golden images: " + ", ".join(f"{e['name']} -> class {e['top1']}" for e in entries))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from model.verify import ExportFileError, format_summary, verify_against_source

    try:
        report = verify_against_source(
            args.model,
            args.against,
            model_name=args.model_name,
            num_classes=args.num_classes,
            image_size=args.image_size,
            progress=args.progress,
        )
    except ExportFileError as exc:
        print(f"vitserve verify: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, KeyError, OSError) as exc:
        print(f"vitserve verify: error: cannot load {args.against}: {_message(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_summary(report.info, report))
    return 0 if report.passed else EXIT_VERIFICATION_FAILED


def external_data_threshold_bytes(args: argparse.Namespace) -> int:
    """--external-data-threshold-mb in bytes; model/onnx_io.py's default when not given."""
    from model.onnx_io import DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES

    if args.external_data_threshold_mb is None:
        return DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES
    return int(args.external_data_threshold_mb * 1024**2)


def _message(exc: BaseException) -> str:
    # KeyError's str() is the repr of its argument, quotes included.
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
