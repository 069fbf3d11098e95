"""GPU options of the engine: batch buckets, CUDA graphs, pinned uploads, TensorRT's engine cache.

The options themselves (``GpuOptions``, parsed and validated with the settings) live in
``service.core.gpu_config``; this module is how they run: the chunk plan, provider options and
pinned buffers that ``service.runtime.engine.Engine`` applies. Every option is off by default and
stays behind a setting (``service.core.settings``) until bench/engine.py on a GPU shows it pays;
bench/README.md says how to run that benchmark.

- Batch buckets: a batch is padded up to the smallest warmed size that holds it (a batch larger
  than the largest bucket is split), so the GPU only ever sees a few shapes: no allocation or
  kernel selection for a new shape in the request path, and the device buffers stay bounded.
- CUDA graphs (ONNX Runtime's ``enable_cuda_graph``): a captured graph replays every kernel
  launch of one run at fixed addresses and shapes. ORT cannot capture a graph with any node off
  the GPU, and a dynamic batch axis leaves Shape/Gather/Concat arithmetic on the CPU; so each
  bucket gets its own session whose batch dimension is fixed (``add_free_dimension_override``),
  which lets ORT fold that arithmetic into constants. Cost: one copy of the weights per bucket
  (ViT-B/16 fp16: 172 MB each).
- Pinned host memory: uploads from page-locked memory run at the bus's DMA rate and skip the
  driver's staging copy. Taken from ORT's own host-accessible allocator of the CUDA device where
  ORT offers one, else from ``cudaHostAlloc`` of the CUDA runtime ORT loaded.
- TensorRT: an engine cache and a timing cache in a directory (building an engine for ViT-B
  takes minutes; the cache makes the second start instant), fp16 kernels, and one explicit
  optimisation profile over the batch sizes served.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from service.core.gpu_config import GpuOptions
from service.core.onnx_facts import CUDA_PROVIDER

log = logging.getLogger("vitserve.engine")

# Without buckets, TensorRT still needs one optimisation profile: batches up to this size, larger
# ones are split (a profile for 1024 images would make TensorRT reserve memory for them).
DEFAULT_TRT_MAX_BATCH = 256
DEFAULT_TRT_OPT_BATCH = 64


def plan_chunks(n: int, buckets: Sequence[int], max_chunk: int | None = None) -> list[tuple[int, int, int]]:
    """How ``n`` images run: ``(start, stop, run_size)`` per engine run, covering 0..n in order.

    With buckets, each run is padded to ``run_size`` (a bucket >= stop - start): full runs of
    the largest bucket, then the rest in the smallest bucket that holds it. Without buckets, runs
    of at most ``max_chunk`` images at their own size (None = one run).
    """
    if n < 1:
        raise ValueError(f"a batch has at least one image, got {n}")
    if buckets:
        largest = buckets[-1]
        chunks = [(start, start + largest, largest) for start in range(0, n - n % largest, largest)]
        rest = n % largest
        if rest:
            start = n - rest
            chunks.append((start, n, next(b for b in buckets if b >= rest)))
        return chunks
    if max_chunk is None or n <= max_chunk:
        return [(0, n, n)]
    return [(start, min(start + max_chunk, n), min(max_chunk, n - start)) for start in range(0, n, max_chunk)]


def cuda_provider_options(*, cuda_graph: bool = False, device_id: int = 0) -> dict[str, str]:
    """CUDA provider options: ORT's defaults but for the graph flag (what the service always ran with)."""
    options = {"device_id": str(device_id)}
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    return options


def tensorrt_provider_options(
    options: GpuOptions, *, input_name: str, image_shape: Sequence[int], device_id: int = 0
) -> dict[str, str]:
    """TensorRT provider options: caches, precision, and one profile spanning the served batch sizes.

    ``image_shape`` is one input's shape without the batch axis, in the graph's layout: (3, H, W).
    """
    max_batch = options.batch_buckets[-1] if options.batch_buckets else DEFAULT_TRT_MAX_BATCH
    opt_batch = min(max_batch, DEFAULT_TRT_OPT_BATCH)

    def shape(batch: int) -> str:
        return f"{input_name}:" + "x".join(str(d) for d in (batch, *image_shape))

    trt = {
        "device_id": str(device_id),
        "trt_fp16_enable": "True" if options.trt_fp16 else "False",
        "trt_profile_min_shapes": shape(1),
        "trt_profile_opt_shapes": shape(opt_batch),
        "trt_profile_max_shapes": shape(max_batch),
    }
    if options.trt_cache_dir is not None:
        cache = str(Path(options.trt_cache_dir).expanduser())
        trt.update(
            {
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": cache,
            }
        )
    return trt


def trt_max_batch(options: GpuOptions) -> int:
    """The largest batch one TensorRT run takes (its profile's max); larger batches are split."""
    return options.batch_buckets[-1] if options.batch_buckets else DEFAULT_TRT_MAX_BATCH


# -- pinned host memory ------------------------------------------------------------------------------
class _CudaHostAllocation:
    """Owns one cudaHostAlloc block; freed when the last numpy view of it is gone."""

    def __init__(self, runtime: ctypes.CDLL, nbytes: int) -> None:
        self._runtime = runtime
        self.pointer = ctypes.c_void_p()
        status = runtime.cudaHostAlloc(ctypes.byref(self.pointer), ctypes.c_size_t(nbytes), ctypes.c_uint(0))
        address = self.pointer.value
        if status != 0 or not address:
            raise OSError(f"cudaHostAlloc({nbytes}) failed with CUDA error {status}")
        self.address: int = address

    def __del__(self) -> None:
        if getattr(self, "pointer", None) is not None and self.pointer.value:
            self._runtime.cudaFreeHost(self.pointer)
            self.pointer = ctypes.c_void_p()


def _cuda_runtime() -> ctypes.CDLL:
    # onnxruntime.preload_dlls() already loaded ORT's libcudart; dlopen by soname returns that copy.
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so", "cudart64_13.dll", "cudart64_12.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("no CUDA runtime library (libcudart) could be loaded")


def pinned_array(shape: Sequence[int], dtype: npt.DTypeLike) -> tuple[np.ndarray, str]:
    """A zero-filled page-locked host array and where it came from ("onnxruntime" or "cudaHostAlloc").

    Pinned memory is usable with any device of the process, so the first CUDA device ORT lists will do.

    Raises OSError when neither source can give pinned memory (no CUDA device or runtime).
    """
    import onnxruntime as ort

    dtype = np.dtype(dtype)
    get_devices = getattr(ort, "get_ep_devices", None)
    memory_type = getattr(ort, "OrtDeviceMemoryType", None)
    if get_devices is not None and memory_type is not None:
        for device in get_devices():
            if device.ep_name != CUDA_PROVIDER:
                continue
            try:
                info = device.memory_info(memory_type.HOST_ACCESSIBLE)
                if info is None:
                    continue
                value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, memory_info=info)
                array = value.numpy()  # a view of ORT's pinned block, not a copy
            except Exception as exc:  # noqa: BLE001 - this ORT build offers no such allocator: use CUDA's
                log.debug("onnxruntime host-accessible memory unavailable (%s)", exc)
                break
            if array.ctypes.data == value.data_ptr():
                array.fill(0)
                return _keep_alive(array, value), "onnxruntime"
    runtime = _cuda_runtime()
    nbytes = int(np.prod(shape)) * dtype.itemsize
    block = _CudaHostAllocation(runtime, max(nbytes, 1))
    raw = (ctypes.c_byte * max(nbytes, 1)).from_address(block.address)
    array = np.frombuffer(memoryview(raw), dtype=np.uint8, count=nbytes).view(dtype).reshape(shape)
    array.fill(0)
    return _keep_alive(array, block), "cudaHostAlloc"


class _PinnedView(np.ndarray):
    """An ndarray subclass only so that the view can carry a reference to its memory's owner."""

    _owner: object = None


def _keep_alive(array: np.ndarray, owner: object) -> np.ndarray:
    view = array.view(_PinnedView)
    view._owner = owner
    return view


def is_pinned(array: np.ndarray) -> bool:
    """Whether CUDA reports ``array``'s memory as page-locked host memory (False without CUDA)."""

    class PointerAttributes(ctypes.Structure):
        _fields_ = [
            ("type", ctypes.c_int),
            ("device", ctypes.c_int),
            ("devicePointer", ctypes.c_void_p),
            ("hostPointer", ctypes.c_void_p),
        ]

    try:
        runtime = _cuda_runtime()
    except OSError:
        return False
    attributes = PointerAttributes()
    status = runtime.cudaPointerGetAttributes(ctypes.byref(attributes), ctypes.c_void_p(array.ctypes.data))
    if status != 0:
        runtime.cudaGetLastError()  # an unregistered pointer is an error in old runtimes; clear it
        return False
    return bool(attributes.type == 1)  # cudaMemoryTypeHost: registered / page-locked
