"""The ONNX Runtime session and nothing else: providers, threads, warm-up, ``run(batch) -> logits``.

No HTTP and no asyncio here; the batcher calls ``run`` from one worker thread.

Providers: TensorRT, then CUDA, then CPU, whichever actually load on this host (the GPU wheel
lists all three even where no GPU exists, so a GPU provider is only tried when the CUDA driver
library loads, and a session that silently fell back is detected through
``session.get_providers()``). ``VITSERVE_PROVIDERS`` / ``providers=`` override the order.

Node placement is read from one profiled warm-up run (ORT's profiler records the provider that
executed every node), logged per op type, with a loud warning when a GPU provider is active but
attention nodes ran on the CPU (onnxruntime issue 28025 saw exactly that).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.core.gpu_config import GpuOptions
from service.core.host import cpu_cores
from service.core.onnx_facts import CPU_PROVIDER, CUDA_PROVIDER, FUSED_ATTENTION_OP_TYPES, TENSORRT_PROVIDER
from service.core.spec import ModelSpecError, SpecOptions, check_label_count, graph_io_from_session, resolve_spec
from service.runtime.buckets import BucketRunner
from service.runtime.gpu_options import cuda_provider_options, tensorrt_provider_options, trt_max_batch

log = logging.getLogger("vitserve.engine")

TENSORRT, CUDA, CPU = TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER
GPU_PROVIDERS = (TENSORRT, CUDA)
_PROVIDER_ALIASES = {"tensorrt": TENSORRT, "trt": TENSORRT, "cuda": CUDA, "cpu": CPU}
_ALIAS_OF = {TENSORRT: "tensorrt", CUDA: "cuda", CPU: "cpu"}
# Device input buffers kept for batch sizes run without buckets, least recently used dropped first:
# one per size for ever would hold sum(1..max_batch_size) images of device memory.
_MAX_CACHED_DEVICE_INPUTS = 8


def node_placement(profile_events: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """node name -> (op type, provider that ran it), from the events of an ONNX Runtime profile."""
    placed = {}
    for event in profile_events:
        args = event.get("args") or {}
        if event.get("cat") == "Node" and "provider" in args and "op_name" in args:
            placed[event.get("name", "").removesuffix("_kernel_time")] = (args["op_name"], args["provider"])
    return placed


class EngineError(RuntimeError):
    """The model cannot be loaded or run as the service needs (message names the cause)."""


def _library_loads(*names: str) -> bool:
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def parse_providers(spec: str | Sequence[str] | None) -> list[str] | None:
    """``"cuda,cpu"`` or a list of names/aliases -> full provider names; None or empty -> automatic."""
    if spec is None:
        return None
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        return None
    known = set(ort.get_all_providers())
    out = []
    for item in items:
        name = _PROVIDER_ALIASES.get(item.lower(), item)
        if name not in known:
            raise EngineError(
                f"unknown ONNX Runtime provider {item!r}; known: tensorrt, cuda, cpu or one of {sorted(known)}"
            )
        out.append(name)
    return out


def automatic_providers() -> list[str]:
    """TensorRT > CUDA > CPU, keeping only those whose libraries can load on this host."""
    available = ort.get_available_providers()
    chosen = []
    # Trying CUDA where no driver exists costs an error log per session; check the driver first.
    if CUDA in available and _library_loads("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        if TENSORRT in available and _library_loads("libnvinfer.so.10", "libnvinfer.so"):
            chosen.append(TENSORRT)
        chosen.append(CUDA)
    chosen.append(CPU)
    return chosen


def fallback_problem(explicit: Sequence[str] | None, running: Sequence[str]) -> str | None:
    """Why a session may not run on ``running`` when ``explicit`` providers were asked for, or None.

    ``--providers cuda`` means "on the GPU": ONNX Runtime falling back to the CPU would serve
    quietly at a fraction of the speed. Only an explicit list that names cpu allows that.
    """
    if not explicit or CPU in explicit or not running or running[0] != CPU:
        return None
    asked = ",".join(_ALIAS_OF.get(p, p) for p in explicit)
    return (
        f"--providers {asked} was asked for but {', '.join(explicit)} cannot run on this host (the session fell "
        f"back to {CPU}); add cpu (--providers {asked},cpu) to allow that, or leave --providers unset"
    )


class Engine:
    """One ONNX Runtime inference session for one image classifier: a vitserve export or any ONNX file
    described by flags / a sidecar JSON (service/core/spec/).

    Args:
        model_path: the .onnx file (external-data files next to it are found by ORT).
        spec_options: explicit model description (flags / environment); None = only what the file's
            metadata and its ``<model>.json`` sidecar say.
        providers: provider names in priority order; None picks automatically
            (TensorRT > CUDA > CPU, those that load).
        intra_op_threads: threads for one operator; 0 = one per available core.
        allow_spinning: let idle ORT threads spin; off by default because on a small CPU host
            the spinning steals cores from the pre-processing threads.
        log_placement: profile one warm-up run and log which provider ran each op type.
        io_binding: bind a reused input buffer and the output on the session's device; None = only
            on CUDA (where it saves a host->device allocation per batch).
        gpu_options: batch buckets, CUDA graphs, pinned uploads, TensorRT caches
            (service/runtime/gpu_options.py); None = none of them.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        spec_options: SpecOptions | None = None,
        providers: Sequence[str] | str | None = None,
        intra_op_threads: int = 0,
        allow_spinning: bool = False,
        log_placement: bool = True,
        io_binding: bool | None = None,
        gpu_options: GpuOptions | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise EngineError(f"model file not found: {self.model_path}")
        explicit = parse_providers(providers)
        requested = explicit or automatic_providers()
        if any(p in GPU_PROVIDERS for p in requested) and hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* pip wheels, before the first session
            except Exception as exc:  # noqa: BLE001 - system-wide CUDA may still work
                log.warning("onnxruntime.preload_dlls failed (%s); relying on system CUDA libraries", exc)
        self.requested_providers = requested
        self.intra_op_threads = intra_op_threads or cpu_cores()
        self._allow_spinning = allow_spinning
        self._log_placement = log_placement
        self.gpu_options = gpu_options or GpuOptions()
        self._trt_input: tuple[str, tuple[int, ...]] | None = None  # (name, shape after batch) for TensorRT
        self.session = self._create_session(requested)
        self.providers: list[str] = self.session.get_providers()
        problem = fallback_problem(explicit, self.providers)
        if problem:
            raise EngineError(f"{self.model_path}: {problem}")
        self.placement: dict[str, dict[str, int]] = {}  # provider -> op type -> nodes it ran
        self.node_placement: dict[str, tuple[str, str]] = {}  # node name -> (op type, provider)
        try:
            self.spec = resolve_spec(self.model_path, graph_io_from_session(self.session), spec_options)
        except ModelSpecError as exc:
            raise EngineError(str(exc)) from exc
        self.metadata = self.spec.metadata
        self.input_name = self.spec.input_name
        self.output_name = self.spec.output_name
        self.input_dtype = np.dtype(self.spec.input_dtype)
        size = self.metadata.preprocessing.image_size
        self.input_shape = (3, size, size)  # what run() takes; channels-last graphs get it transposed
        self.channels_last = self.spec.input_layout == "nhwc"
        # A graph with a fixed batch axis takes exactly that many images per run: run() pads and
        # splits, and the app caps its batcher at max_batch_size (1 = batching off).
        self.max_static_batch = self.spec.batch_size
        self.max_batch_size = self.spec.batch_size
        self.on_gpu = self.providers[0] in GPU_PROVIDERS
        use_binding = self.providers[0] == CUDA if io_binding is None else io_binding
        self._device = "cuda" if self.providers[0] == CUDA else "cpu"
        self._io_binding = self.session.io_binding() if use_binding else None
        self._device_inputs: dict[int, ort.OrtValue] = {}  # batch size -> reused device buffer
        if self.on_gpu is False and any(p in GPU_PROVIDERS for p in requested):
            log.warning(
                "GPU providers %s were requested but the session runs on %s",
                [p for p in requested if p in GPU_PROVIDERS],
                self.providers,
            )
        if self.spec.num_classes is None:  # symbolic class axis: one probe run tells the real count
            (probe,) = self.session.run(
                [self.output_name],
                {
                    self.input_name: self._layout(
                        np.zeros((self.max_static_batch or 1, *self.input_shape), self.input_dtype)
                    )
                },
            )
            if probe.ndim != 2:
                raise EngineError(
                    f"{self.model_path}: output {self.output_name} gave shape {probe.shape}; vitserve "
                    "reads 2-D logits [N, num_classes]"
                )
            try:
                check_label_count(probe.shape[1], self.metadata.num_classes, self.model_path, self.output_name)
            except ModelSpecError as exc:
                raise EngineError(str(exc)) from exc
        log.info(
            "loaded %s (%s, %s, %d classes) on %s with %d intra-op threads",
            self.model_path,
            self.metadata.served_name,
            self.metadata.precision,
            self.metadata.num_classes,
            self.providers,
            self.intra_op_threads,
        )
        log.info("model spec, value (source): %s", self.spec.log_text())
        self._buckets = self._bucket_runner(use_binding) if self.gpu_options.batch_buckets else None
        # TensorRT builds for one profile of batch sizes; larger batches are split to fit it.
        self._max_chunk = trt_max_batch(self.gpu_options) if self.providers[0] == TENSORRT else None
        if self.max_static_batch == 1:
            log.warning(
                "%s: input %s has a fixed batch of 1: batching is turned off (max_batch_size 1); export it "
                "with a dynamic batch axis to batch requests",
                self.model_path,
                self.input_name,
            )

    def _session_options(self, profile_dir: str | None = None) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self._allow_spinning else "0")
        # Fatal only: every session error also comes back as an exception, which the engine reports
        # (placement goes through our own log). At 3, a file that fails to load adds ORT's "could not
        # write a profile" line next to that one-line error.
        opts.log_severity_level = 4
        if profile_dir is not None:
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(profile_dir, "vitserve_placement")
        return opts

    def _create_session(self, requested: list[str]) -> ort.InferenceSession:
        """Try the requested providers; if one fails to initialise, drop it and try the rest."""
        remaining = list(requested)
        errors = []
        self._profile_dir = tempfile.mkdtemp(prefix="vitserve-ort-") if self._log_placement else None
        while remaining:
            try:
                return ort.InferenceSession(
                    str(self.model_path),
                    sess_options=self._session_options(self._profile_dir),
                    providers=remaining,
                    provider_options=[self._provider_options(p) for p in remaining],
                )
            except Exception as exc:  # noqa: BLE001 - ORT raises plain RuntimeError/Fail for provider trouble
                errors.append(f"{remaining[0]}: {exc}")
                if remaining[0] == CPU or len(remaining) == 1:
                    break
                log.warning(
                    "provider %s failed to initialise (%s); trying %s",
                    remaining[0],
                    str(exc).splitlines()[0][:200],
                    remaining[1:],
                )
                remaining = remaining[1:]
        if self._profile_dir is not None:
            shutil.rmtree(self._profile_dir, ignore_errors=True)  # no session, no profile: leave no temp dir
            self._profile_dir = None
        raise EngineError(f"cannot create an ONNX Runtime session for {self.model_path}: " + " | ".join(errors))

    def _provider_options(self, provider: str, cuda_graph: bool = False) -> dict[str, str]:
        if provider == CUDA:
            return cuda_provider_options(cuda_graph=cuda_graph)
        if provider == TENSORRT:
            if self._trt_input is None:
                # The profile names the input and its size before the real session exists: ask a CPU one.
                probe = ort.InferenceSession(str(self.model_path), providers=[CPU]).get_inputs()[0]
                self._trt_input = (probe.name, tuple(int(d) for d in probe.shape[1:]))
            name, image_shape = self._trt_input
            return tensorrt_provider_options(self.gpu_options, input_name=name, image_shape=image_shape)
        return {}

    def _bucket_runner(self, use_binding: bool) -> BucketRunner:
        if self.channels_last or self.max_static_batch is not None:
            raise EngineError(
                f"{self.model_path}: batch_buckets need a channels-first graph with a dynamic batch "
                "axis (this one pads to its fixed batch already)"
            )
        return BucketRunner(
            self.model_path,
            self.session,
            self.gpu_options,
            session_options=self._session_options,
            providers=self.providers,
            provider_options=self._provider_options,
            input_name=self.input_name,
            output_name=self.output_name,
            input_shape=self.input_shape,
            input_dtype=self.input_dtype,
            io_binding=use_binding,
            device=self._device,
        )

    @property
    def cuda_graph_buckets(self) -> list[int]:
        return self._buckets.cuda_graph_sizes if self._buckets is not None else []

    def input_buffer(self, n: int) -> np.ndarray:
        """A (n, 3, H, W) array to fill with the next batch: with buckets it is the bucket's own
        (pinned, if set) host buffer, so ``run`` of it skips a host copy. Valid until the next ``run``."""
        if self._buckets is not None:
            return self._buckets.input_buffer(n)
        return np.empty((n, *self.input_shape), dtype=self.input_dtype)

    # -- running --------------------------------------------------------------------------------
    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) pixels -> (N, K) float32 logits. Not thread-safe by design: one caller."""
        if batch.ndim != 4 or batch.shape[1:] != self.input_shape:
            raise ValueError(
                f"expected a batch of shape (N, {', '.join(map(str, self.input_shape))}), got {batch.shape}"
            )
        if self._buckets is not None:
            if self._profile_dir is not None:  # placement is read from one run of the dynamic session
                self.session.run([self.output_name], {self.input_name: np.asarray(batch, dtype=self.input_dtype)})
                self._read_placement()
            return self._buckets.run(batch)
        if self._max_chunk is not None and batch.shape[0] > self._max_chunk:
            step = self._max_chunk
            return np.concatenate([self.run(batch[i : i + step]) for i in range(0, len(batch), step)])
        fixed = self.max_static_batch
        if fixed is not None and batch.shape[0] != fixed:
            return np.concatenate([self._run_padded(batch[i : i + fixed], fixed) for i in range(0, len(batch), fixed)])
        feed = self._layout(np.asarray(batch, dtype=self.input_dtype))
        if self._io_binding is not None:
            logits = self._run_bound(feed, self._io_binding)
        else:
            (logits, *_) = self.session.run([self.output_name], {self.input_name: feed})
        if self._profile_dir is not None:
            self._read_placement()  # one profiled run is enough; profiling every run costs time
        return np.asarray(logits, dtype=np.float32)

    def _layout(self, batch: np.ndarray) -> np.ndarray:
        # (N, 3, H, W) -> (N, H, W, 3) for channels-last graphs; contiguous either way for ORT.
        return np.ascontiguousarray(batch.transpose(0, 2, 3, 1) if self.channels_last else batch)

    def _run_padded(self, chunk: np.ndarray, fixed: int) -> np.ndarray:
        """Run at most ``fixed`` images through a fixed-batch graph, zero-padding up to ``fixed``."""
        n = chunk.shape[0]
        if n < fixed:
            chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), chunk.dtype)])
        return self.run(chunk)[:n]

    def _run_bound(self, feed: np.ndarray, binding: ort.IOBinding) -> np.ndarray:
        # One device buffer per batch size, refilled in place: on CUDA no cudaMalloc per request.
        n = feed.shape[0]
        device_input = self._device_inputs.pop(n, None)
        if device_input is None:
            device_input = ort.OrtValue.ortvalue_from_shape_and_type(feed.shape, feed.dtype, self._device, 0)
            if len(self._device_inputs) >= _MAX_CACHED_DEVICE_INPUTS:
                self._device_inputs.pop(next(iter(self._device_inputs)))  # the least recently used
        self._device_inputs[n] = device_input  # (re)inserted last: the dict runs least to most recently used
        device_input.update_inplace(feed)
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_ortvalue_input(self.input_name, device_input)
        binding.bind_output(self.output_name, self._device, 0)
        self.session.run_with_iobinding(binding)
        (logits,) = binding.copy_outputs_to_cpu()
        return np.asarray(logits, dtype=np.float32)

    def warmup(self, batch_sizes: Iterable[int], repeats: int = 1) -> dict[int, float]:
        """Run every batch size once (kernels, arenas, TensorRT engines); returns seconds per size.

        The engine's first run (here, or the first ``run`` if warm-up is skipped) is profiled to
        record node placement (see ``placement``).
        """
        timings: dict[int, float] = {}
        rng = np.random.default_rng(0)
        if self.cuda_graph_buckets:
            repeats = max(repeats, 3)  # ORT runs a graph session normally before it captures, then replays
        buckets = self.gpu_options.batch_buckets if self._buckets is not None else ()
        for n in sorted(set(int(b) for b in batch_sizes) | set(buckets)):
            batch = rng.standard_normal((n, *self.input_shape), dtype=np.float32)
            for _ in range(max(1, repeats)):
                started = time.perf_counter()
                self.run(batch)
                timings[n] = time.perf_counter() - started
        return timings

    def _read_placement(self) -> None:
        """End profiling (it costs time on every run) and log which provider ran which op type."""
        profile_path = self.session.end_profiling()
        try:
            with open(profile_path) as f:
                events = json.load(f)
        except (OSError, ValueError) as exc:
            log.warning("could not read the ORT profile for node placement: %s", exc)
            events = []
        finally:
            try:
                os.remove(profile_path)
                if self._profile_dir is not None:
                    os.rmdir(self._profile_dir)
            except OSError:
                pass
            self._profile_dir = None
        self.node_placement = node_placement(events)
        placement: dict[str, Counter[str]] = defaultdict(Counter)
        for op_type, provider in self.node_placement.values():
            placement[provider][op_type] += 1
        self.placement = {provider: dict(sorted(ops.items())) for provider, ops in placement.items()}
        for provider, ops in self.placement.items():
            log.info("node placement: %s ran %s", provider, ", ".join(f"{op} x{n}" for op, n in ops.items()))
        attention_on_cpu = sum(self.placement.get(CPU, {}).get(op, 0) for op in FUSED_ATTENTION_OP_TYPES)
        if self.on_gpu and attention_on_cpu:
            log.warning(
                "!!! %d attention node(s) ran on the CPU although the session uses %s: expect a large "
                "slowdown (check the opset, the dtype and onnxruntime's CUDA support for Attention) !!!",
                attention_on_cpu,
                self.providers[0],
            )

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly view for /v1/models and logs."""
        return {
            "providers": self.providers,
            "requested_providers": self.requested_providers,
            "intra_op_threads": self.intra_op_threads,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "input_dtype": str(self.input_dtype),
            "input_layout": self.spec.input_layout,
            "placement": self.placement,
            "batch_buckets": list(self.gpu_options.batch_buckets) if self._buckets is not None else [],
            "cuda_graph_buckets": self.cuda_graph_buckets,
            "pinned_host_memory": self._buckets.pinned_source if self._buckets is not None else None,
            "spec": self.spec.effective(),
        }
