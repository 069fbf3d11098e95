"""The comparison server of bench/serve.py: a plain FastAPI app calling ONNX Runtime per request.

    .venv/bin/python bench/plain_server.py MODEL.onnx PORT [INTRA_OP_THREADS]

What anyone would write first: one uvicorn process, the request's work in FastAPI's thread pool
(so requests overlap), the same pre-processing as vitserve (service.runtime.preprocess) and
``session.run`` on one image per request. No batching, no limits, no metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402

from service.core.metadata import ModelMetadata  # noqa: E402
from service.runtime.preprocess import load_pixels  # noqa: E402


def build_app(model: Path, intra_op_threads: int) -> FastAPI:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    metadata = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
    input_name = session.get_inputs()[0].name
    app = FastAPI()

    @app.get("/readyz")
    def readyz() -> dict:
        return {"status": "ready"}

    def infer(data: bytes) -> list[dict]:
        pixels = load_pixels(data, metadata.preprocessing, max_pixels=10**8, jpeg_draft=True)
        (logits,) = session.run(None, {input_name: pixels[None]})
        row = logits[0].astype(np.float64)
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        top = np.argsort(-probs)[:5]
        return [{"index": int(i), "label": metadata.labels[i], "probability": float(probs[i])} for i in top]

    @app.post("/v1/classify")
    async def classify(request: Request) -> JSONResponse:
        data = await request.body()
        return JSONResponse({"predictions": await run_in_threadpool(infer, data)})

    return app


if __name__ == "__main__":
    model, port = Path(sys.argv[1]), int(sys.argv[2])
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    uvicorn.run(build_app(model, threads), host="127.0.0.1", port=port, log_level="warning", access_log=False)
