"""The fitted model saved with each run, in open formats: what projects a new image exactly as the stored rows
were projected.

  runs/<run_id>/model.json      k, n, explained variance, the weights' fingerprint and the feature spec
  runs/<run_id>/pca_model.npz   mean (1280,), components (k, 1280), explained_variance_ratio (k,), float64

report.json names model.json ("model"), so the model is published by the same swap as the tables.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from emr_job import storage
from emr_job.model import FEATURE_SPEC
from emr_job.pca import project

FORMAT = 1
MODEL_JSON, MODEL_NPZ = "model.json", "pca_model.npz"


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

    @property
    def k(self) -> int:
        return len(self.components)

    def project(self, features: np.ndarray) -> np.ndarray:
        """The job's projection of the stored rows."""
        return project(features, self.mean, self.components)


def files(pca, weights, run_id: str) -> dict:
    """name -> bytes of the two model files of a run."""
    buf = io.BytesIO()
    np.savez(buf, mean=pca.mean, components=pca.components, explained_variance_ratio=pca.explained_variance_ratio)
    meta = {
        "format": FORMAT,
        "run_id": run_id,
        "pca": {
            "file": MODEL_NPZ,
            "k": pca.k,
            "n": pca.n,
            "explained_variance_ratio": [float(x) for x in pca.explained_variance_ratio],
            "projection": "pca = (features - mean) @ components.T in float64, stored as float32",
        },
        "weights": {"spec": weights.spec, "fingerprint": weights.fingerprint, "description": weights.description},
        "features": FEATURE_SPEC,
    }
    return {MODEL_JSON: json.dumps(meta, indent=2).encode(), MODEL_NPZ: buf.getvalue()}


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
    if meta.get("format") != FORMAT:
        raise ModelError(f"{meta_uri}: model format {meta.get('format')!r}, this code reads {FORMAT}")
    npz_uri = storage.join(meta_uri.rsplit("/", 1)[0], meta["pca"]["file"])
    arrays = np.load(io.BytesIO(_read(npz_uri)))
    return Fitted(
        mean=arrays["mean"],
        components=arrays["components"],
        explained_variance_ratio=arrays["explained_variance_ratio"],
        weights_spec=meta["weights"]["spec"],
        weights_fingerprint=meta["weights"]["fingerprint"],
        weights_description=meta["weights"]["description"],
        run_id=meta["run_id"],
    )


def _read(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)[0]
    except FileNotFoundError:
        raise ModelError(f"model file missing: {uri}") from None
