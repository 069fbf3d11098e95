"""`vitserve score --ray`: the same scoring as service/scoring/offline.py, on a Ray cluster with Ray Data.

Ray does the scheduling; nothing here schedules work itself:

    read_binary_files(paths) / from_items(archive members)      reading, in parallel tasks
      -> map_batches(decode_batch)                                 decode + pre-process, parallel tasks
      -> map_batches(Scorer, concurrency=A, num_gpus=g)           one ONNX Runtime engine per actor:
                                                                  one actor per GPU, or per CPU slot
      -> iter_batches on the driver -> ResultWriter               the same .jsonl/.csv/.parquet file

Inputs, outputs, --resume and the result rows are exactly those of `vitserve score`; the model
file and the inputs must be readable at the same path on every node (a shared filesystem), and
vitserve must be installed on every node. Ray is imported lazily: it is the optional extra `ray`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TextIO

import numpy as np

from service.core.metadata import ModelMetadata, Preprocessing
from service.core.onnx_facts import CPU_PROVIDER
from service.core.spec import graph_io_from_session, resolve_spec
from service.scoring.offline import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_PIXELS,
    Progress,
    ResultWriter,
    ScoringError,
    Summary,
    iter_sources,
    model_identity,
    resolve_inputs,
)
from service.scoring.rows import error_row, prediction_row

_ARCHIVE_ITEMS_PER_BLOCK = 256


def decode_batch(
    batch: dict[str, np.ndarray], preprocessing: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict[str, np.ndarray]:
    """Ray Data task: {"path", "bytes"} -> {"path", "pixels" (N, 3, S, S), "error_code", "error"}.

    A stateless function, so Ray runs it as tasks fused with the read (and shares CPU slots with
    them); images that fail get blank pixels and their error, and the scorer skips them.
    """
    from service.scoring.offline import decode_one

    size = preprocessing.image_size
    pixels, codes, messages = [], [], []
    for path, data in zip(batch["path"], batch["bytes"], strict=True):
        _, outcome = decode_one(str(path), bytes(data), preprocessing, max_pixels, DEFAULT_MAX_FILE_BYTES)
        if isinstance(outcome, np.ndarray):
            pixels.append(outcome)
            codes.append("")
            messages.append("")
        else:
            pixels.append(np.zeros((3, size, size), dtype=np.float32))
            codes.append(outcome[0])
            messages.append(outcome[1])
    return {
        "path": np.asarray(batch["path"], dtype=object),
        "pixels": np.stack(pixels),
        "error_code": np.asarray(codes, dtype=object),
        "error": np.asarray(messages, dtype=object),
    }


class Scorer:
    """Ray Data callable class: one ONNX Runtime engine per actor; decoded batches -> JSON result rows.

    Args:
        model: the exported .onnx file (same path on every node).
        top_k: classes per image.
        providers: ONNX Runtime provider order ("cuda,cpu"); None = automatic.
        intra_op_threads: ONNX Runtime threads (match the CPUs the actor reserved).
    """

    def __init__(self, model: str, top_k: int, providers: str | None = None, intra_op_threads: int = 0) -> None:
        from service.runtime.engine import Engine

        self.engine = Engine(model, providers=providers, intra_op_threads=intra_op_threads, log_placement=False)
        self.labels = self.engine.metadata.labels
        self.top_k = top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray([code == "" for code in batch["error_code"]], dtype=bool)
        logits = self.engine.run(batch["pixels"][ok]) if ok.any() else np.empty((0, 0), np.float32)  # (n_ok, K)
        rows, scored = [], iter(logits)
        for path, good, code, message in zip(batch["path"], ok, batch["error_code"], batch["error"], strict=True):
            row = (
                prediction_row(str(path), next(scored), self.labels, self.top_k)
                if good
                else error_row(str(path), str(code), str(message))
            )
            rows.append(json.dumps(row, ensure_ascii=False))
        return {"row": np.asarray(rows, dtype=object)}


def read_metadata(model: Path) -> ModelMetadata:
    """The model's metadata, read on the driver (a CPU session without graph optimisation: quick)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(model), sess_options=options, providers=[CPU_PROVIDER])
    # Our metadata, or a foreign file's <model>.json sidecar: what each actor's Engine resolves too.
    return resolve_spec(model, graph_io_from_session(session)).metadata


def score_with_ray(
    spec: str,
    output: Path,
    *,
    model: Path,
    address: str | None = None,
    batch_size: int = 8,
    top_k: int = 5,
    resume: bool = False,
    gpus_per_actor: float = 0.0,
    actors: int | None = None,
    providers: str | None = None,
    progress_stream: TextIO | None = sys.stderr,
) -> Summary:
    """Score ``spec`` into ``output`` on Ray; same arguments and results as ``service.scoring.offline.score``.

    Args:
        address: Ray cluster address ("auto", "ray://head:10001"); None = RAY_ADDRESS or a new local instance.
            An already initialised Ray (ray.init in the caller) is used as it is.
        gpus_per_actor: GPUs each scoring actor reserves (0 = CPU actors, 1 = one actor per GPU).
        actors: scoring actors (one CPU slot each); default one per GPU, or half the CPU slots (the
            other half runs the read + decode tasks).
    """
    try:
        import ray
    except ModuleNotFoundError:
        raise ScoringError("--ray needs Ray: pip install 'vitserve[ray]'") from None
    if batch_size < 1 or top_k < 1:
        raise ScoringError("--batch-size and --top-k must be >= 1")
    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours below counts images, like `vitserve score`

    inputs = resolve_inputs(spec)
    meta = read_metadata(model)
    k = min(top_k, meta.num_classes)
    resources = ray.cluster_resources()
    cpus = int(resources.get("CPU", 1))
    if gpus_per_actor > 0:
        gpus = resources.get("GPU", 0)
        if gpus < gpus_per_actor:
            raise ScoringError(f"the Ray cluster has {gpus:g} GPUs; --gpus-per-actor {gpus_per_actor:g} needs more")
        actors = actors or max(1, int(gpus // gpus_per_actor))
    else:
        actors = actors or max(1, cpus // 2)  # one actor per CPU slot, half the slots; the others decode

    identity = model_identity(meta, model)
    with ResultWriter(output, k, model=identity, resume=resume) as writer:
        todo = [name for name in inputs.names if name not in writer.done]
        skipped = len(inputs.names) - len(todo)
        progress = Progress(len(todo), progress_stream)
        started = time.perf_counter()
        scored = failed = 0
        if todo:
            if inputs.archive is None:
                # Ray reports absolute paths; map them back to the names the results use.
                name_of = {os.path.abspath(file): name for name, file in zip(inputs.names, inputs.files, strict=True)}
                files = [
                    os.path.abspath(file)
                    for name, file in zip(inputs.names, inputs.files, strict=True)
                    if name not in writer.done
                ]
                dataset = ray.data.read_binary_files(files, include_paths=True)
            else:
                # Archive members are read once, in order, by the driver; Ray takes it from there.
                name_of = None
                items = [{"path": name, "bytes": data} for name, data in iter_sources(inputs, set(todo))]
                dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items) // _ARCHIVE_ITEMS_PER_BLOCK))
            decoded = dataset.map_batches(
                decode_batch,
                fn_kwargs={"preprocessing": meta.preprocessing},
                batch_size=batch_size,
                batch_format="numpy",
            )
            rows = decoded.map_batches(
                Scorer,
                fn_constructor_kwargs={"model": str(model), "top_k": k, "providers": providers, "intra_op_threads": 1},
                batch_size=batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=1,
                num_gpus=gpus_per_actor or None,
            )
            for batch in rows.iter_batches(batch_size=None, batch_format="numpy"):
                out = []
                for text in batch["row"]:
                    row = json.loads(text)
                    if name_of is not None:
                        row["path"] = name_of.get(row["path"], row["path"])
                    out.append(row)
                writer.write(out)
                errors = sum("error" in row for row in out)
                failed += errors
                scored += len(out) - errors
                progress.update(len(out))
        progress.close()
        return Summary(len(inputs.names), skipped, scored, failed, time.perf_counter() - started, model=identity)
