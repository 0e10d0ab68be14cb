"""MobileNetV2 feature extractor: weights resolved and checked once on the driver, the network run in each Python
worker by ONNX Runtime (the default engine) or TensorFlow (the reference)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

FEATURE_DIM = 1280
RANDOM_SEED = 0
# What a feature is, saved with each run's fitted model: a new image must go through exactly this.
FEATURE_SPEC = {
    "network": "MobileNetV2 (tf.keras.applications), include_top=False, pooling='avg'",
    "input": [224, 224, 3],
    "decode": "emr_job/images.py: decode_image, step by step in model.json's decode (DECODE_RECIPE)",
    "preprocess": "uint8 pixels / 127.5 - 1 (mobilenet_v2.preprocess_input)",
    "features": FEATURE_DIM,
    "dtype": "float32",
}


class WeightsError(RuntimeError):
    """The requested weights could not be loaded; never replaced by other weights."""


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


def build_network():
    tf = _tf()
    return tf.keras.applications.MobileNetV2(input_shape=(224, 224, 3), include_top=False, pooling="avg", weights=None)


@dataclass(frozen=True)
class Weights:
    spec: str  # as given on the command line
    local_path: Optional[str]  # the file to load, for PATH and s3:// specs
    fingerprint: str  # identifies the weights; features computed with other weights are recomputed
    description: str  # for the report


def resolve_weights(spec: str, workdir: str) -> Weights:
    """Cheap, TensorFlow-free part of --weights: find the file and fingerprint it."""
    if spec == "random":
        return Weights(spec, None, f"random-seed{RANDOM_SEED}", f"random (seed {RANDOM_SEED}, not ImageNet)")
    if spec == "imagenet":
        return Weights(spec, None, "imagenet", "imagenet (keras download)")
    local = spec
    if spec.startswith("s3://"):
        from emr_job.storage import s3_client, split_s3_uri

        local = os.path.join(workdir, os.path.basename(spec) or "weights.h5")
        try:
            bucket, key = split_s3_uri(spec)
            s3_client().download_file(bucket, key, local)
        except Exception as exc:
            raise WeightsError(f"could not download weights {spec}: {exc}") from None
    elif not os.path.isfile(spec):
        raise WeightsError(f"weights file not found: {spec} (expected random, imagenet, a path or s3://...)")
    with open(local, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()[:16]
    return Weights(spec, local, f"sha256:{digest}", f"{spec} (sha256 {digest})")


def load_arrays(weights: Weights) -> list:
    """The network's arrays in get_weights() order. A weights file is read and checked with h5py, without
    TensorFlow; random and imagenet need Keras. Raises WeightsError; never substitutes other weights."""
    if weights.local_path:
        from emr_job.network import WeightsFileError, read_weights

        try:
            return read_weights(weights.local_path)
        except WeightsFileError as exc:
            raise WeightsError(
                f"{weights.spec} is not a weights file for MobileNetV2(include_top=False, pooling='avg'): {exc}"
            ) from None
    tf = _tf()
    if weights.spec == "random":
        tf.keras.utils.set_random_seed(RANDOM_SEED)
        return build_network().get_weights()
    try:
        net = tf.keras.applications.MobileNetV2(
            input_shape=(224, 224, 3), include_top=False, pooling="avg", weights="imagenet"
        )
    except Exception as exc:
        raise WeightsError(
            f"could not download the ImageNet weights ({type(exc).__name__}: {exc}); without internet "
            "access pass --weights PATH or s3://... to a MobileNetV2 weights file"
        ) from None
    return net.get_weights()


# --- engines: the same network and weights, executed by ONNX Runtime (default) or TensorFlow (reference) ----
ENGINES = ("onnx", "tensorflow")


def describe(engine: str) -> str:
    """The engine and its version, for the report."""
    from importlib.metadata import version

    package = {"onnx": "onnxruntime", "tensorflow": "tensorflow-cpu"}[engine]  # only the one in use is installed
    return f"{package.split('-')[0]} {version(package)}"


def payload(weights: Weights, engine: str):
    """What the driver broadcasts: the ONNX model (bytes) or the arrays for TensorFlow."""
    arrays = load_arrays(weights)
    if engine == "tensorflow":
        return arrays
    from emr_job.network import onnx_model

    return onnx_model(arrays)


_COMPILED: dict = {}  # batch size -> (network, compiled call); one per Python worker process
_LOADED: dict = {}  # batch size -> fingerprint of the weights now in that TensorFlow network
_SESSIONS: dict = {}  # fingerprint -> ONNX Runtime session


def compiled(batch_size: int, threads: int):
    """Per Python worker, once: TensorFlow threads, the network, its call traced for a fixed batch shape."""
    if batch_size not in _COMPILED:
        tf = _tf()
        try:  # only possible before TF's runtime starts; the first build in a worker wins
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass
        net = build_network()

        # Fixed batch shape: one trace, no retracing on the last, shorter batch (it is padded).
        @tf.function(input_signature=[tf.TensorSpec([batch_size, 224, 224, 3], tf.uint8)])
        def run(images):
            x = tf.cast(images, tf.float32) / 127.5 - 1.0  # mobilenet_v2.preprocess_input
            return net(x, training=False)

        run(np.zeros((batch_size, 224, 224, 3), np.uint8))  # trace now, not on the first real batch
        _COMPILED[batch_size] = (net, run)
    return _COMPILED[batch_size]


def featurizer(payload_broadcast, fingerprint: str, engine: str, batch_size: int, threads: int):
    """images (n <= batch_size, 224, 224, 3) uint8 -> features (n, 1280) float32, with the broadcast weights
    in place (loaded once per worker and weights)."""
    if engine == "onnx":
        if fingerprint not in _SESSIONS:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads  # 1 per Spark task: ONNX Runtime then runs in the caller
            options.inter_op_num_threads = 1
            # Its threads would otherwise spin between batches, taking the cores from the decoding threads (and
            # from numpy's eigh on the driver after it): 11 s instead of 1.5 s for one eigh here.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            _SESSIONS.clear()
            _SESSIONS[fingerprint] = ort.InferenceSession(payload_broadcast.value, options, ["CPUExecutionProvider"])
        session = _SESSIONS[fingerprint]
        return lambda images: session.run(None, {"images": images})[0]
    net, run = compiled(batch_size, threads)
    if _LOADED.get(batch_size) != fingerprint:
        net.set_weights(payload_broadcast.value)  # variables are captured by reference: no retrace
        _LOADED[batch_size] = fingerprint
    return lambda images: _padded(run, images, batch_size)


def _padded(run, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Apply the traced call to n <= batch_size images, padding to the compiled shape."""
    n = len(images)
    if n < batch_size:
        pad = np.zeros((batch_size - n, 224, 224, 3), dtype=np.uint8)
        images = np.concatenate([images, pad]) if n else pad
    return run(images).numpy()[:n]
