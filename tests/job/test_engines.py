"""The network without TensorFlow: network.json is what Keras builds, weights files are read and checked with
h5py, and the ONNX Runtime engine needs no TensorFlow anywhere."""

import os
import subprocess
import sys

import numpy as np
import pytest

from emr_job import network
from emr_job.model import WeightsError, load_arrays, resolve_weights
from tests.job.images import make_tree

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_network_json_is_what_keras_builds():
    from emr_job.model import build_network

    assert network.spec_from_keras(build_network()) == network.spec(), "run `python -m emr_job.network`"


def test_weights_files_of_both_keras_formats_read_as_keras_loads_them(tmp_path, weights_file):
    import warnings

    from emr_job.model import build_network

    net = build_network()
    net.load_weights(weights_file)
    for got, want in zip(network.read_weights(weights_file), net.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    legacy = str(tmp_path / "legacy.h5")  # Keras 2's HDF5 layout, as the keras-applications ImageNet files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net.save(legacy)
    for got, want in zip(network.read_weights(legacy), net.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("case", ["not hdf5", "other network", "other width"])
def test_a_wrong_weights_file_is_refused_with_what_does_not_fit(tmp_path, case):
    import tensorflow as tf

    path = str(tmp_path / "w.weights.h5")
    if case == "not hdf5":
        (tmp_path / "w.weights.h5").write_bytes(b"just text")
        expected = "not an HDF5 file"
    elif case == "other network":
        tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(2)]).save_weights(path)
        expected = r"no weights for layer Conv1 \(layers/conv2d/vars\)"
    else:
        tf.keras.applications.MobileNetV2(input_shape=(224, 224, 3), alpha=0.5, include_top=False,
                                          weights=None).save_weights(path)  # fmt: skip
        expected = r"layer Conv1 has weights of shapes \[\[3, 3, 3, 16\]\], the network needs \[\[3, 3, 3, 32\]\]"
    with pytest.raises(WeightsError, match=rf"^{path} is not a weights file for MobileNetV2.*: {expected}"):
        load_arrays(resolve_weights(path, str(tmp_path)))


def test_the_onnx_engine_runs_the_whole_job_without_tensorflow(tmp_path, weights_file):
    # Given images and a weights file, and TensorFlow made unimportable in the driver and the Python workers
    src, out = str(tmp_path / "in"), str(tmp_path / "out")
    make_tree(src, labels=("a", "b"), per_label=3)
    blocker = tmp_path / "blocked" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('tensorflow must not load')")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSPARK")}
    env.update(PYSPARK_PYTHON=sys.executable, PYTHONPATH=f"{blocker.parent}{os.pathsep}{ROOT}")

    # When the job runs with the default engine
    cmd = [sys.executable, "-m", "emr_job", "--input", src, "--output", out, "--weights", weights_file, "--k", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)

    # Then every image is featurized, by ONNX Runtime
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "images: 6 total, 6 ok, 0 failed" in proc.stdout
    from emr_job.store import Results

    assert Results(out).report["engine"].startswith("onnxruntime ")
