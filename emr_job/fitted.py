"""The fitted model saved with each run, in open formats: what turns a new image into features and PCA coordinates
exactly as the stored rows were made.

  runs/<run_id>/model.onnx      the whole model as one ONNX graph: uint8 images (N, 224, 224, 3) in, "features"
                                (N, 1280) and "pca" (N, k) float32 out; runs with ONNX Runtime alone
  runs/<run_id>/model.json      how to decode an image to the graph's input, k, n, explained variance, the
                                weights' fingerprint and the feature spec
  runs/<run_id>/pca_model.npz   mean (1280,), components (k, 1280), explained_variance_ratio (k,), float64

report.json names model.json ("model") and model.onnx ("model_onnx"), so the model is published by the same swap
as the tables, and leaves with its run's folder. None of them holds an object key.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from emr_job import storage
from emr_job.images import DECODE_RECIPE
from emr_job.model import FEATURE_DIM, FEATURE_SPEC
from emr_job.network import OPSET, with_projection
from emr_job.pca import project

FORMAT = 2  # 2: model.onnx and the decoding recipe
MODEL_JSON, MODEL_NPZ, MODEL_ONNX = "model.json", "pca_model.npz", "model.onnx"
MODEL_FILES = (MODEL_JSON, MODEL_NPZ, MODEL_ONNX)


class ModelError(ValueError):
    """Results without a usable fitted model, or a query the model cannot answer."""


@dataclass
class Fitted:
    mean: np.ndarray
    components: np.ndarray
    explained_variance_ratio: np.ndarray
    weights_spec: str
    weights_fingerprint: str
    weights_description: str
    run_id: str
    onnx_uri: str

    @property
    def k(self) -> int:
        return len(self.components)

    def project(self, features: np.ndarray) -> np.ndarray:
        """The job's projection of the stored rows."""
        return project(features, self.mean, self.components)


def files(pca, weights, run_id: str, network_onnx: bytes) -> dict:
    """name -> bytes of the model files of a run. network_onnx: the features-only graph of these weights
    (emr_job.network.onnx_model)."""
    buf = io.BytesIO()
    np.savez(buf, mean=pca.mean, components=pca.components, explained_variance_ratio=pca.explained_variance_ratio)
    graph = {
        "file": MODEL_ONNX,
        "opset": OPSET,
        "inputs": {"images": {"dtype": "uint8", "shape": ["N", 224, 224, 3], "layout": "NHWC, RGB (decode)"}},
        "outputs": {
            "features": {"dtype": "float32", "shape": ["N", FEATURE_DIM]},
            "pca": {"dtype": "float32", "shape": ["N", pca.k], "what": "(features - mean) @ components.T"},
        },
    }
    meta = {
        "format": FORMAT,
        "run_id": run_id,
        "onnx": graph,
        "decode": DECODE_RECIPE,
        "pca": {
            "file": MODEL_NPZ,
            "k": pca.k,
            "n": pca.n,
            "explained_variance_ratio": [float(x) for x in pca.explained_variance_ratio],
            "projection": "pca = (features - mean) @ components.T in float64, stored as float32; model.onnx "
            "computes it in float32",
        },
        "weights": {"spec": weights.spec, "fingerprint": weights.fingerprint, "description": weights.description},
        "features": FEATURE_SPEC,
    }
    props = {"run_id": run_id, "weights_fingerprint": weights.fingerprint, "k": pca.k,
             "decode": json.dumps(DECODE_RECIPE), "features": json.dumps(FEATURE_SPEC)}  # fmt: skip
    return {
        MODEL_JSON: json.dumps(meta, indent=2).encode(),
        MODEL_NPZ: buf.getvalue(),
        MODEL_ONNX: with_projection(network_onnx, pca.mean, pca.components, props),
    }


def load(results) -> Fitted:
    """The fitted model of the published run of an emr_job.store.Results."""
    report = results.report
    if report is None:
        raise ModelError(f"no results at {results.root} (report.json not found)")
    if not report.get("model"):
        why = report.get("pca_skipped") or "they were written before models were saved; run the job again"
        raise ModelError(f"the results at {results.root} have no fitted model: {why}")
    meta_uri = storage.join(results.root, report["model"])
    meta = json.loads(_read(meta_uri))
    if meta.get("format") == 1:
        raise ModelError(f"the results at {results.root} were published before runs saved model.onnx; the next "
                         "run adds it, changes or not")  # fmt: skip
    if meta.get("format") != FORMAT:
        raise ModelError(f"{meta_uri}: model format {meta.get('format')!r}, this code reads {FORMAT}")
    folder = meta_uri.rsplit("/", 1)[0]
    npz_uri = storage.join(folder, meta["pca"]["file"])
    arrays = np.load(io.BytesIO(_read(npz_uri)))
    return Fitted(
        mean=arrays["mean"],
        components=arrays["components"],
        explained_variance_ratio=arrays["explained_variance_ratio"],
        weights_spec=meta["weights"]["spec"],
        weights_fingerprint=meta["weights"]["fingerprint"],
        weights_description=meta["weights"]["description"],
        run_id=meta["run_id"],
        onnx_uri=storage.join(folder, meta["onnx"]["file"]),
    )


def onnx_bytes(fit: Fitted) -> bytes:
    return _read(fit.onnx_uri)


def _read(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)[0]
    except FileNotFoundError:
        raise ModelError(f"model file missing: {uri}") from None
