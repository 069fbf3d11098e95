"""What the service will feed a model and how to read its answer, for our exports and any other ONNX classifier.

A file exported by vitserve carries everything in its metadata (service/core/metadata.py). A file from
elsewhere (Hugging Face Optimum, timm, a plain ``torch.onnx.export``, another framework) carries
none of it, so the same fields can come from three more places. Each effective value is taken
from the first of these that gives it:

    1. flag      an explicit setting: a ``vitserve serve`` flag (``--mean``) or its environment
                 variable (``VITSERVE_MEAN``); the flag wins over the variable (service/core/settings.py)
    2. metadata  the ``vitserve.*`` keys inside the ONNX file
    3. sidecar   a JSON object next to the model, ``<model file>.json`` (``other.onnx.json``), with
                 the same field names as the flags (``image_size``, ``mean``, ``labels`` ...)
    4. graph     what the ONNX graph itself says (a fixed H = W gives ``image_size``; a single
                 input or output gives its name; the input's element type gives ``input_dtype``)
    5. default   ``resize`` = ``image_size`` with ``resize_mode`` "squash" (the whole image, no
                 crop) when neither ``resize`` nor ``crop`` is given, "shortest" when one is;
                 ``interpolation`` "bilinear"; ``name`` = the architecture our export
                 recorded, else the file's stem (so a sidecar or flag can name a fine-tune)

So our own metadata wins over a sidecar, and only an explicit flag overrides it. ``image_size``,
``mean``, ``std`` and ``labels`` have no default: guessing them would serve wrong answers quietly,
so a missing one is a start-up error that names it and says how to give it.

``crop`` is timm's ``crop_pct``: ``resize`` = floor(image_size / crop) on the shorter side, then
a centre crop of ``image_size`` (``--crop 0.875`` for a timm model at 224 gives ``resize`` 256).

One module per job: ``options`` (what a user may give, validated), ``labels`` (class-name files),
``sources`` (the file's metadata and the sidecar), ``graph`` (reading inputs/outputs and checking
them), ``resolve`` (precedence and the resolved ``ModelSpec``). The command-line flags live in
service/cli/spec_flags.py. Pure Python (numpy-free): it never imports onnxruntime, onnx or torch.
"""

from service.core.spec.graph import GraphIO, TensorInfo, check_label_count, graph_io_from_onnx, graph_io_from_session
from service.core.spec.labels import load_labels
from service.core.spec.options import SPEC_FIELDS, ModelSpecError, SpecOptions, flag_name, options_from_values
from service.core.spec.resolve import REQUIRED, ModelSpec, missing_fields, resolve_spec
from service.core.spec.sources import IO_METADATA_KEYS, load_sidecar, options_from_metadata, sidecar_path

__all__ = [
    "IO_METADATA_KEYS",
    "REQUIRED",
    "SPEC_FIELDS",
    "GraphIO",
    "ModelSpec",
    "ModelSpecError",
    "SpecOptions",
    "TensorInfo",
    "check_label_count",
    "flag_name",
    "graph_io_from_onnx",
    "graph_io_from_session",
    "load_labels",
    "load_sidecar",
    "missing_fields",
    "options_from_metadata",
    "options_from_values",
    "resolve_spec",
    "sidecar_path",
]
