"""Batches padded to a few warmed sizes ("buckets"), each with fixed input and output buffers.

``service.runtime.engine.Engine`` hands its runs here when ``GpuOptions.batch_buckets`` is set. Per
bucket: one host buffer (page-locked with ``pinned_host_memory``), and with IO binding one
device input and one device output bound once, refilled in place; so the device sees a handful
of shapes at fixed addresses, which is what a CUDA graph needs and what keeps memory flat. With
``cuda_graphs`` or ``static_shapes`` each bucket also gets its own session whose batch dimension
is fixed (see service/runtime/gpu_options.py for why). Padding rows hold whatever images the buffer held
before (zeros at first): ViT computes every image independently, so they cannot change the real
rows, and not clearing them saves a pass over the buffer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from service.core.gpu_config import GpuOptions
from service.core.onnx_facts import CUDA_PROVIDER as CUDA
from service.runtime.gpu_options import pinned_array, plan_chunks

log = logging.getLogger("vitserve.engine")


@dataclass
class _Bucket:
    size: int
    session: ort.InferenceSession
    host: np.ndarray  # (size, 3, H, W) in the model's input dtype
    binding: ort.IOBinding | None = None
    device_input: ort.OrtValue | None = None
    device_output: ort.OrtValue | None = None
    cuda_graph: bool = False


class BucketRunner:
    """Runs any batch as padded runs of a few fixed sizes.

    Args:
        model_path: the .onnx file (for the per-bucket sessions).
        session: the engine's session with a dynamic batch axis (used unless per-bucket sessions).
        options: the GPU options; ``options.batch_buckets`` must not be empty.
        session_options: builds fresh ``SessionOptions`` like the engine's own.
        providers: the providers the engine's session actually got, in order.
        provider_options: ``(provider, cuda_graph) -> options dict`` for one provider.
        input_name, output_name: the graph's pixel input and logits output.
        input_shape: (3, H, W); input_dtype: what the graph's input takes.
        io_binding: bind device buffers (CUDA) instead of feeding host arrays.
        device: "cuda" or "cpu", where the bound buffers live.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        session: ort.InferenceSession,
        options: GpuOptions,
        *,
        session_options: Callable[[], ort.SessionOptions],
        providers: Sequence[str],
        provider_options: Callable[[str, bool], dict[str, str]],
        input_name: str,
        output_name: str,
        input_shape: tuple[int, int, int],
        input_dtype: np.dtype,
        io_binding: bool,
        device: str,
    ) -> None:
        if not options.batch_buckets:
            raise ValueError("BucketRunner needs at least one batch bucket")
        self.sizes = options.batch_buckets
        self._model_path = str(model_path)
        self._options = options
        self._session_options = session_options
        self._providers = list(providers)
        self._provider_options = provider_options
        self._input_name, self._output_name = input_name, output_name
        self._input_shape, self._input_dtype = input_shape, np.dtype(input_dtype)
        self._device = device
        output = session.get_outputs()[0]
        self._output_dtype = np.dtype({"tensor(float16)": np.float16}.get(output.type, np.float32))
        self._num_classes = output.shape[-1]
        self.pinned_source: str | None = None
        self._dynamic_session, self._io_binding = session, io_binding
        self._buckets = {size: self._make_bucket(size) for size in self.sizes}

    @property
    def cuda_graph_sizes(self) -> list[int]:
        return [size for size, bucket in self._buckets.items() if bucket.cuda_graph]

    # -- building --------------------------------------------------------------------------------
    def _make_bucket(self, size: int, allow_graph: bool = True, host: np.ndarray | None = None) -> _Bucket:
        session, cuda_graph = self._dynamic_session, False
        if self._options.per_bucket_sessions:
            session, cuda_graph = self._fixed_batch_session(size, allow_graph)
        bucket = _Bucket(
            size=size, session=session, host=self._host_buffer(size) if host is None else host, cuda_graph=cuda_graph
        )
        if self._io_binding:
            bucket.device_input = ort.OrtValue.ortvalue_from_shape_and_type(
                bucket.host.shape, self._input_dtype, self._device, 0
            )
            num_classes = self._num_classes if isinstance(self._num_classes, int) else None
            if num_classes is not None:
                bucket.device_output = ort.OrtValue.ortvalue_from_shape_and_type(
                    (size, num_classes), self._output_dtype, self._device, 0
                )
            bucket.binding = session.io_binding()
            bucket.binding.bind_ortvalue_input(self._input_name, bucket.device_input)
            if bucket.device_output is not None:
                bucket.binding.bind_ortvalue_output(self._output_name, bucket.device_output)
            else:  # a symbolic class axis: let ORT allocate (never the case for our exports)
                bucket.binding.bind_output(self._output_name, self._device, 0)
        return bucket

    def _fixed_batch_session(self, size: int, allow_graph: bool) -> tuple[ort.InferenceSession, bool]:
        batch_dim = self._dynamic_session.get_inputs()[0].shape[0]
        want_graph = allow_graph and self._options.cuda_graphs and self._providers[0] == CUDA
        if allow_graph and self._options.cuda_graphs and self._providers[0] != CUDA:
            log.warning("cuda_graphs is set but the session runs on %s: no graphs", self._providers[0])
        attempts = [True, False] if want_graph else [False]
        for cuda_graph in attempts:
            opts = self._session_options()
            if isinstance(batch_dim, str):
                opts.add_free_dimension_override_by_name(batch_dim, size)
            elif batch_dim != size:
                raise ValueError(f"the model's batch size is fixed at {batch_dim}; bucket {size} cannot run")
            try:
                session = ort.InferenceSession(
                    self._model_path,
                    sess_options=opts,
                    providers=self._providers,
                    provider_options=[self._provider_options(p, cuda_graph) for p in self._providers],
                )
                return session, cuda_graph
            except Exception as exc:  # noqa: BLE001 - ORT raises plain RuntimeError/Fail
                if not cuda_graph:
                    raise
                # ORT refuses a graph when any node sits outside the CUDA provider.
                log.warning(
                    "no CUDA graph for batch bucket %d (%s); that bucket runs without one",
                    size,
                    str(exc).splitlines()[0][:300],
                )
        raise AssertionError("unreachable")

    def _host_buffer(self, size: int) -> np.ndarray:
        shape = (size, *self._input_shape)
        if self._options.pinned_host_memory and self._device == "cuda":
            try:
                array, self.pinned_source = pinned_array(shape, self._input_dtype)
                return array
            except OSError as exc:
                log.warning("pinned host memory unavailable (%s); uploads use pageable memory", exc)
        return np.zeros(shape, dtype=self._input_dtype)

    # -- running ---------------------------------------------------------------------------------
    def bucket_for(self, n: int) -> int | None:
        """The bucket a batch of ``n`` runs in whole, or None when it is split."""
        return next((size for size in self.sizes if size >= n), None)

    def input_buffer(self, n: int) -> np.ndarray:
        """A (n, 3, H, W) array to write the next batch into: for n up to the largest bucket it is
        that bucket's own (possibly pinned) host buffer, so ``run`` of it copies nothing on the host.
        Valid until the next ``run``."""
        size = self.bucket_for(n)
        if size is None:
            return np.empty((n, *self._input_shape), dtype=self._input_dtype)
        return self._buckets[size].host[:n]

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) -> (N, K) float32 logits, as padded runs of the bucket sizes."""
        outputs = [
            self._run_bucket(self._buckets[size], batch[start:stop])
            for start, stop, size in plan_chunks(len(batch), self.sizes)
        ]
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def _run_bucket(self, bucket: _Bucket, part: np.ndarray) -> np.ndarray:
        n = len(part)
        if part.ctypes.data != bucket.host.ctypes.data or part.dtype != bucket.host.dtype:
            bucket.host[:n] = part  # casts to the input dtype in the same pass
        try:
            return self._execute(bucket, n)
        except Exception as exc:  # noqa: BLE001 - ORT raises plain RuntimeError/Fail
            if not bucket.cuda_graph:
                raise
            # Capture happens on an early run, not at session creation: a failure there (an
            # allocation or a CPU node during capture) costs this bucket its graph, not the service.
            log.warning(
                "CUDA graph of batch bucket %d failed (%s); that bucket runs without one",
                bucket.size,
                str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
            )
            bucket = self._buckets[bucket.size] = self._make_bucket(bucket.size, allow_graph=False, host=bucket.host)
            return self._execute(bucket, n)

    def _execute(self, bucket: _Bucket, n: int) -> np.ndarray:
        if bucket.binding is None or bucket.device_input is None:
            (logits,) = bucket.session.run([self._output_name], {self._input_name: np.asarray(bucket.host)})
        else:
            bucket.device_input.update_inplace(np.asarray(bucket.host))  # a plain ndarray view for pybind
            bucket.session.run_with_iobinding(bucket.binding)
            (logits,) = bucket.binding.copy_outputs_to_cpu()  # (size, K)
        return np.asarray(logits[:n], dtype=np.float32)
