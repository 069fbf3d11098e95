"""Offline batch scoring, no HTTP: inputs -> parallel decoding -> engine batches -> result file.

The shared core of `vitserve score` (and of the Ray path's input listing and output files):

- ``resolve_inputs`` turns a folder, a glob, a zip/tar archive or a JSON-lines manifest into an
  ordered list of named images;
- ``ResultWriter`` writes rows (service/scoring/rows.py), each stamped with the model that made it,
  as .jsonl, .csv or .parquet and, with ``resume``, first reads what the file already holds so
  those images are skipped (a line cut short by a crash is dropped and scored again); a file
  another model wrote is refused, never appended to;
- ``score`` decodes in worker processes (or threads) a bounded window ahead of the engine, so
  the engine never waits for pixels, runs the same ``Engine`` and pre-processing as the service,
  and lists unreadable images with their error instead of dropping them.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from service.core.errors import ServiceError
from service.core.host import cpu_cores
from service.core.image_files import describe_suffixes, is_image_name
from service.core.limits import DEFAULT_MAX_IMAGE_PIXELS
from service.core.metadata import ModelMetadata, Preprocessing
from service.runtime.preprocess import load_pixels
from service.scoring.rows import (
    ModelIdentity,
    csv_fields,
    csv_header,
    error_row,
    prediction_row,
    row_from_csv,
    stamped,
)
from service.scoring.sources import (
    ArchiveLimits,
    archive_kind,
    iter_archive,
    list_archive,
    manifest_paths,
    read_limited,
)

OUTPUT_SUFFIXES = (".jsonl", ".csv", ".parquet")
MANIFEST_SUFFIXES = (".jsonl", ".ndjson", ".json", ".txt")
DEFAULT_MAX_PIXELS = DEFAULT_MAX_IMAGE_PIXELS
DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024
# The user's own archive: no ratio, total or entry bounds (those protect the server from its clients).
OWN_FILE_LIMITS = ArchiveLimits(max_ratio=float("inf"), max_total_bytes=sys.maxsize, max_entries=sys.maxsize)


class ScoringError(Exception):
    """A problem with the command's inputs or output (the message is meant for the user)."""


# -- inputs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Inputs:
    """Named images to score, in order: files on disk, or members of one archive.

    ``names`` are what the results report; ``files`` (same length) are paths on this host, or
    empty when the images are members of ``archive``.
    """

    kind: str  # folder, glob, manifest, archive
    names: list[str]
    files: list[str] = field(default_factory=list)
    archive: Path | None = None


def resolve_inputs(spec: str) -> Inputs:
    """A folder, a glob pattern, a zip/tar archive or a JSON-lines manifest -> Inputs.

    Folders are walked recursively for image files (sorted; names relative to the folder); a glob
    takes every file it matches (names as matched); manifest paths are relative to the manifest's
    folder (names as written); archive members keep their names. Finding no image is an error.
    """
    inputs = _find_inputs(spec)
    if not inputs.names:
        if inputs.kind == "glob":
            raise ScoringError(f"{spec}: no file matches this pattern")
        hint = f" (image files end in {describe_suffixes()})" if inputs.kind != "manifest" else ""
        raise ScoringError(f"{spec}: no images in this {inputs.kind}{hint}")
    return inputs


def _find_inputs(spec: str) -> Inputs:
    path = Path(spec).expanduser()
    if path.is_dir():
        names, files = [], []
        for root, dirs, filenames in os.walk(path):
            dirs.sort()
            for filename in sorted(filenames):
                full = Path(root) / filename
                name = full.relative_to(path).as_posix()
                if is_image_name(name):
                    names.append(name)
                    files.append(str(full))
        return Inputs("folder", names, files)
    if path.is_file():
        if path.suffix.lower() in MANIFEST_SUFFIXES:
            with open(path, encoding="utf-8") as f:
                try:
                    listed = manifest_paths(f)
                except ServiceError as exc:
                    raise ScoringError(f"{path}: {exc.message}") from None
            return Inputs("manifest", listed, [str(path.parent / p) for p in listed])
        if archive_kind(path) is not None:
            try:
                names = list_archive(path, OWN_FILE_LIMITS)
            except ServiceError as exc:
                raise ScoringError(f"{path}: {exc.message}") from None
            return Inputs("archive", names, archive=path)
        raise ScoringError(f"{path}: not a folder, a zip/tar archive or a manifest (.jsonl/.txt of paths)")
    if glob.has_magic(spec):
        matched = sorted(p for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p))
        return Inputs("glob", matched, matched)
    raise ScoringError(f"{spec}: no such file or folder (and not a glob pattern)")


# -- outputs -----------------------------------------------------------------------------------
class ResultWriter:
    """Appends result rows to .jsonl / .csv / .parquet; with ``resume`` keeps what is already there.

    Args:
        path: the output file; its suffix picks the format.
        top_k: classes per row (CSV columns).
        model: the model whose answers are written; every row records it.
        resume: read the existing file first: ``done`` then holds the paths already in it. A file
            that another model (name or weights) wrote is refused with ScoringError.
    """

    def __init__(self, path: Path, top_k: int, *, model: ModelIdentity, resume: bool = False) -> None:
        self.path = Path(path)
        self.top_k = top_k
        self.model = model
        self.format = self.path.suffix.lower()
        if self.format not in OUTPUT_SUFFIXES:
            raise ScoringError(f"{self.path}: output must end in {', '.join(OUTPUT_SUFFIXES)}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = set()
        self._file: TextIO | None = None
        self._csv = None
        self._parquet = None
        self._pending: list[dict] = []
        existing = resume and self.path.exists() and self.path.stat().st_size > 0
        if self.format == ".parquet":
            self._open_parquet(existing)
        else:
            self._open_text(existing)

    def _open_text(self, existing: bool) -> None:
        if existing:
            self._keep_whole_lines()
            with open(self.path, encoding="utf-8", newline="") as f:
                if self.format == ".jsonl":
                    rows = [json.loads(line) for line in f if line.strip()]
                else:
                    reader = csv.DictReader(f)
                    if reader.fieldnames == csv_header(self.top_k):  # written before rows named their model
                        raise self._other_model(None)
                    if reader.fieldnames != csv_header(self.top_k, identity=True):
                        raise ScoringError(
                            f"{self.path}: its columns {reader.fieldnames} do not match --top-k "
                            f"{self.top_k}; resume with the same --top-k"
                        )
                    rows = [row_from_csv(row) for row in reader]
            self._check_same_model(rows)
            self.done.update(row["path"] for row in rows)
        self._file = open(self.path, "a" if existing else "w", encoding="utf-8", newline="")
        if self.format == ".csv":
            self._csv = csv.writer(self._file, lineterminator="\n")
            if not existing:
                self._csv.writerow(csv_header(self.top_k, identity=True))

    def _check_same_model(self, rows: Sequence[dict]) -> None:
        for row in rows:
            identity = ModelIdentity.of_row(row)
            if identity != self.model:
                raise self._other_model(identity)

    def _other_model(self, found: ModelIdentity | None) -> ScoringError:
        holds = f"results of model {found.describe()}" if found else "results that do not name their model"
        return ScoringError(
            f"{self.path} holds {holds}; this run scores with {self.model.describe()}: "
            "resume with the same --model, or write to another file"
        )

    def _keep_whole_lines(self) -> None:
        """Cut a last line left unfinished by a crash (it is scored again)."""
        with open(self.path, "rb+") as f:
            data = f.read()
            end = data.rfind(b"\n") + 1
            if self.format == ".jsonl":
                # also drop a complete-looking last line that does not parse (torn write)
                lines = data[:end].splitlines(keepends=True)
                while lines:
                    try:
                        json.loads(lines[-1])
                        break
                    except ValueError:
                        end -= len(lines.pop())
            if end != len(data):
                f.truncate(end)

    def _open_parquet(self, existing: bool) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ModuleNotFoundError:
            raise ScoringError("parquet output needs pyarrow: pip install 'vitserve[ray]'") from None
        self._pa, self._pq = pa, pq
        self._schema = pa.schema(
            [
                ("path", pa.string()),
                ("model", pa.string()),
                ("weights_sha256", pa.string()),
                ("labels", pa.list_(pa.string())),
                ("scores", pa.list_(pa.float64())),
                ("error_code", pa.string()),
                ("error", pa.string()),
            ]
        )
        # Parquet files cannot be appended to: write a new file (old rows first) and swap it in at close.
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._parquet = pq.ParquetWriter(self._partial, self._schema)
        if existing:
            table = pq.read_table(self.path)
            if table.schema.names != self._schema.names:
                raise self._other_model(None)
            table = table.cast(self._schema)
            self._check_same_model(table.select(["path", "model", "weights_sha256"]).to_pylist())
            self.done.update(table.column("path").to_pylist())
            self._parquet.write_table(table)

    def write(self, rows: Sequence[dict]) -> None:
        identity = self.model.fields()
        rows = [stamped(row, identity) for row in rows]
        if self._parquet is not None:
            self._pending.extend(rows)
            if len(self._pending) >= 4096:
                self._flush_parquet()
        elif self._csv is not None:
            self._csv.writerows(csv_fields(row, self.top_k, identity=True) for row in rows)
        else:
            assert self._file is not None
            self._file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if self._file is not None:
            self._file.flush()  # a crash loses at most the batch being written
        self.done.update(row["path"] for row in rows)

    def _flush_parquet(self) -> None:
        if not self._pending:
            return
        rows = self._pending
        self._pending = []
        columns = {
            "path": [r["path"] for r in rows],
            "model": [r["model"] for r in rows],
            "weights_sha256": [r["weights_sha256"] for r in rows],
            "labels": [r.get("labels") if "error" not in r else None for r in rows],
            "scores": [r.get("scores") if "error" not in r else None for r in rows],
            "error_code": [r["error"]["code"] if "error" in r else None for r in rows],
            "error": [r["error"]["message"] if "error" in r else None for r in rows],
        }
        self._parquet.write_table(self._pa.Table.from_pydict(columns, schema=self._schema))

    def close(self) -> None:
        if self._parquet is not None:
            self._flush_parquet()
            self._parquet.close()
            os.replace(self._partial, self.path)
            self._parquet = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_results(path: Path) -> list[dict]:
    """Every row of a result file (any of the three formats), as row dicts."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            return [row_from_csv(row) for row in csv.DictReader(f)]
    import pyarrow.parquet as pq

    rows = []
    for r in pq.read_table(path).to_pylist():
        identity = {"model": r["model"], "weights_sha256": r["weights_sha256"]}
        if r["error_code"] is not None:
            rows.append(stamped(error_row(r["path"], r["error_code"], r["error"] or ""), identity))
        else:
            rows.append(stamped({"path": r["path"], "labels": r["labels"], "scores": r["scores"]}, identity))
    return rows


def model_identity(metadata: ModelMetadata, model_path: Path) -> ModelIdentity:
    """The served name and weights hash that result rows record.

    Our exports carry the hash of their source weights; a file from elsewhere is hashed here (with
    its external-data file), so two different files never share an identity.
    """
    if metadata.weights_sha256:
        return ModelIdentity(metadata.served_name, metadata.weights_sha256)
    digest = hashlib.sha256()
    for part in (Path(model_path), Path(f"{model_path}.data")):
        if part.is_file():
            with open(part, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
    return ModelIdentity(metadata.served_name, digest.hexdigest())


# -- decoding (runs in worker processes: module-level, picklable) ------------------------------
def decode_one(
    name: str, source: str | bytes, preprocessing: Preprocessing, max_pixels: int, max_file_bytes: int
) -> tuple[str, np.ndarray | tuple[str, str]]:
    """(name, pixels (3, S, S) float32) or (name, (error code, message)); never raises for bad images."""
    try:
        data = source if isinstance(source, bytes) else read_limited(Path(source), max_file_bytes)
        return name, load_pixels(data, preprocessing, max_pixels=max_pixels)
    except ServiceError as exc:
        return name, (exc.code, exc.message)
    except OSError as exc:
        return name, ("unreadable", f"cannot read {name}: {exc.strerror or exc}")


def _worker_ready() -> int:
    return os.getpid()


def make_decode_pool(workers: int) -> Executor:
    """``workers`` processes (threads when 0: one per core). Started at once, before any engine threads exist."""
    if workers <= 0:
        return ThreadPoolExecutor(max_workers=cpu_cores(), thread_name_prefix="vitserve-decode")
    # fork is cheapest; it is safe here because the pool starts before ONNX Runtime creates threads.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))
    for f in [pool.submit(_worker_ready) for _ in range(workers)]:
        f.result()
    return pool


def iter_sources(inputs: Inputs, wanted: set[str] | None) -> Iterator[tuple[str, str | bytes]]:
    """(name, file path or bytes) of every input in ``wanted`` (None: all), in input order."""
    if inputs.archive is None:
        for name, file in zip(inputs.names, inputs.files, strict=True):
            if wanted is None or name in wanted:
                yield name, file
        return
    for name, data in iter_archive(inputs.archive, OWN_FILE_LIMITS):
        if wanted is None or name in wanted:
            yield name, data


# -- progress ----------------------------------------------------------------------------------
class Progress:
    """A one-line progress bar on stderr: done/total, images/s, ETA (a line every few s when not a TTY).

    Args:
        total: images to score in this run.
        stream: where to draw; None draws nothing.
    """

    def __init__(self, total: int, stream: TextIO | None = sys.stderr) -> None:
        self.total = total
        self.stream = stream
        self.done = 0
        self.started = time.perf_counter()
        self._tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self._last_draw = self.started

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.stream is not None and now - self._last_draw >= (0.2 if self._tty else 5.0):
            self._last_draw = now
            self._draw(final=False)

    def _draw(self, final: bool) -> None:
        assert self.stream is not None
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        width = 30
        filled = int(width * self.done / self.total) if self.total else width
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "--:--:--"
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {rate:7.1f} img/s  ETA {eta_text}"
        self.stream.write(("\r" + line + ("\n" if final else "")) if self._tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None:
            self._draw(final=True)


# -- the scoring loop --------------------------------------------------------------------------
@dataclass
class Summary:
    total: int  # inputs found
    skipped: int  # already in the output (--resume)
    scored: int
    failed: int
    seconds: float
    cpu_seconds: float = 0.0  # this process and its decode workers while scoring (0: not measured)
    model: ModelIdentity | None = None  # the model that scored them

    @property
    def images_per_second(self) -> float:
        return (self.scored + self.failed) / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_ms_per_image(self) -> float:
        """CPU cost per image: unlike images/s, it hardly moves with other load on a shared machine."""
        done = self.scored + self.failed
        return 1000.0 * self.cpu_seconds / done if done else 0.0


def cpu_seconds_so_far() -> float:
    """User + system CPU of this process (all threads) and of its children that have exited."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def score(
    spec: str,
    output: Path,
    *,
    model: Path,
    batch_size: int = 8,
    workers: int = 0,
    top_k: int = 5,
    resume: bool = False,
    providers: str | None = None,
    intra_op_threads: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress_stream: TextIO | None = sys.stderr,
    engine_factory: Callable | None = None,
    spec_options=None,
) -> Summary:
    """Score every image of ``spec`` into ``output``; see the module docstring.

    Args:
        spec: folder, glob, archive or manifest.
        output: .jsonl, .csv or .parquet file.
        model: the exported .onnx file (the same file the service serves).
        batch_size: images per engine run.
        workers: decoding processes; 0 = threads in this process.
        top_k: classes per image.
        resume: skip images the output already holds and append the rest.
        providers, intra_op_threads: as for the service's engine.
        max_pixels: largest decoded image (width x height).
        progress_stream: where the progress bar goes (None: silent).
        engine_factory: builds the engine from ``model`` (tests); default ``service.runtime.engine.Engine``.
        spec_options: model description flags (service.core.spec.SpecOptions) for ONNX files
            without vitserve metadata; None = the file's metadata or its sidecar.
    """
    if batch_size < 1 or top_k < 1:
        raise ScoringError("--batch-size and --top-k must be >= 1")
    inputs = resolve_inputs(spec)
    pool = make_decode_pool(workers)  # before the engine: forked workers must not inherit its threads
    try:
        if engine_factory is None:
            from service.runtime.engine import Engine

            engine = Engine(
                model,
                spec_options=spec_options,
                providers=providers or None,
                intra_op_threads=intra_op_threads,
                log_placement=False,
            )
        else:
            engine = engine_factory(model)
        meta = engine.metadata
        k = min(top_k, meta.num_classes)
        identity = model_identity(meta, model)
        with ResultWriter(output, k, model=identity, resume=resume) as writer:
            wanted = {name for name in inputs.names if name not in writer.done}
            skipped = len(inputs.names) - len(wanted)
            progress = Progress(len(wanted), progress_stream)
            started = time.perf_counter()
            cpu_started = cpu_seconds_so_far()
            scored = failed = 0
            window = max(4 * batch_size, 4 * max(workers, 1))
            in_flight: deque[Future] = deque()
            # Decoded images and error rows in input order; the batch runs once it holds batch_size images.
            pending: list[tuple[str, np.ndarray | dict]] = []
            batch_pixels: list[np.ndarray] = []

            def run_batch() -> None:
                nonlocal scored, failed
                logits = iter(engine.run(np.stack(batch_pixels)) if batch_pixels else ())  # (N, K)
                rows = [
                    prediction_row(name, next(logits), meta.labels, k) if isinstance(item, np.ndarray) else item
                    for name, item in pending
                ]
                writer.write(rows)
                scored += len(batch_pixels)
                failed += len(rows) - len(batch_pixels)
                progress.update(len(rows))
                pending.clear()
                batch_pixels.clear()

            def collect(future: Future) -> None:
                name, outcome = future.result()
                if isinstance(outcome, np.ndarray):
                    pending.append((name, outcome))
                    batch_pixels.append(outcome)
                else:
                    pending.append((name, error_row(name, *outcome)))
                if len(batch_pixels) >= batch_size:
                    run_batch()

            try:
                for name, source in iter_sources(inputs, wanted):
                    in_flight.append(
                        pool.submit(decode_one, name, source, meta.preprocessing, max_pixels, DEFAULT_MAX_FILE_BYTES)
                    )
                    while len(in_flight) >= window:
                        collect(in_flight.popleft())
                while in_flight:
                    collect(in_flight.popleft())
                if pending:
                    run_batch()
            except ServiceError as exc:
                raise ScoringError(f"{spec}: {exc.message}") from None
            finally:
                for future in in_flight:
                    future.cancel()
            progress.close()
            summary = Summary(len(inputs.names), skipped, scored, failed, time.perf_counter() - started, model=identity)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # worker processes' CPU is counted once they exit
    summary.cpu_seconds = cpu_seconds_so_far() - cpu_started
    return summary
