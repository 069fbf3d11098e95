"""`vitserve export --from-onnx`: copy an ONNX file from elsewhere with our metadata embedded.

The model description is resolved exactly as `vitserve serve` would (flags > the file's own
vitserve metadata > its ``<file>.json`` sidecar > the graph > defaults, service/core/spec/),
then written into the copy's metadata_props, so the copy is served with no flags at all. The
graph and its weights are copied unchanged; metadata keys from other tools are kept.

Needs the ``onnx`` package only (no torch).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

from model.onnx_io import DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES, save_onnx
from service.core.metadata import PREFIX
from service.core.spec import IO_METADATA_KEYS, ModelSpec, SpecOptions, graph_io_from_onnx, resolve_spec


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def embed_metadata(
    source: str | os.PathLike,
    output: str | os.PathLike,
    options: SpecOptions | None = None,
    *,
    verify: bool = True,
    external_data_threshold_bytes: int = DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES,
) -> ModelSpec:
    """Write ``output``: ``source`` with the effective model description as vitserve metadata.

    Args:
        source: the ONNX file from elsewhere (its ``<source>.json`` sidecar is read when present).
        output: the copy to write (may not be ``source``).
        options: explicit values, as `vitserve serve` flags give them.
        verify: load the copy with the service's engine, with no flags, to prove it is servable.
        external_data_threshold_bytes: weights above this size go to ``<output>.data`` (model/onnx_io.py).
    Returns the spec the copy now carries. Raises ModelSpecError naming what is missing or wrong.
    """
    import onnx

    from service.core.onnx_summary import initializer_elements, precision_from_elements

    source, output = Path(source), Path(output)
    if source.resolve() == output.resolve():
        raise ValueError(f"--from-onnx {source} and -o {output} are the same file; write a copy")
    try:
        model = onnx.load(str(source))  # weights included, also from external data, so the copy stands alone
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError, onnx its own errors: both mean "not ONNX"
        raise ValueError(f"{source}: not an ONNX model (cannot parse it: {type(exc).__name__}: {exc})") from None
    spec = resolve_spec(source, graph_io_from_onnx(model), options)
    metadata = spec.metadata
    ours = {p.key[len(PREFIX) :]: p.value for p in model.metadata_props if p.key.startswith(PREFIX)}
    if "precision" not in ours:
        # A quantized graph still takes float pixels: its weights tell the precision, not its input.
        weights = precision_from_elements(initializer_elements(model))
        if weights in ("fp32", "fp16", "int8"):
            metadata = replace(metadata, precision=weights)
    io = {"input_name": spec.input_name, "output_name": spec.output_name, "input_layout": spec.input_layout}
    metadata = replace(
        metadata,
        source=metadata.source or f"onnx:{source.name}",
        weights_sha256=metadata.weights_sha256 or file_sha256(source),
        extra={**metadata.extra, **{k: io[k] for k in IO_METADATA_KEYS}},
    )
    others = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {**dict(others), **metadata.to_props()})
    save_onnx(model, output, external_data_threshold_bytes=external_data_threshold_bytes)
    if verify:
        from service.runtime.engine import Engine

        # No options: the copy alone must be enough. A sidecar next to the copy would hide a gap.
        Engine(output, providers="cpu", intra_op_threads=1, log_placement=False)
    return replace(spec, metadata=metadata)


def check_export_mode(args) -> str | None:
    """`vitserve export` takes SOURCE or --from-onnx; the description flags belong to --from-onnx only."""
    from service.core.spec import SPEC_FIELDS, flag_name

    if args.source and args.from_onnx:
        return "give either SOURCE (a checkpoint) or --from-onnx (an ONNX file), not both"
    if not args.source and not args.from_onnx:
        return "give SOURCE (a checkpoint) or --from-onnx ONNX"
    if not args.from_onnx:
        given = [
            flag_name(name) for name in SPEC_FIELDS if name != "image_size" and getattr(args, name, None) is not None
        ]
        if given:
            return f"{', '.join(given)} only apply with --from-onnx (a checkpoint export writes its own description)"
    return None


def run_from_onnx(args, *, external_data_threshold_bytes: int = DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES) -> int:
    """The `vitserve export --from-onnx SOURCE -o OUTPUT [flags]` handler."""
    import sys

    from service.core.spec import ModelSpecError, options_from_values
    from service.runtime.engine import EngineError

    try:
        spec = embed_metadata(
            args.from_onnx,
            args.output,
            options_from_values(vars(args), where="flags"),
            verify=args.verify,
            external_data_threshold_bytes=external_data_threshold_bytes,
        )
    except (ModelSpecError, EngineError, ValueError, FileNotFoundError) as exc:
        print(f"vitserve export: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.output}: {spec.metadata.served_name}, {spec.metadata.num_classes} classes, "
        f"{spec.metadata.precision}; `vitserve serve --model {args.output}` needs no flags now"
    )
    for name, item in spec.effective().items():
        print(f"  {name:14} {item['value']!s:24} (from {item['source']})")
    return 0
