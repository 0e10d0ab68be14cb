import os
import socket

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# No test may reach real AWS, whatever the developer's shell holds.
for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
    os.environ.pop(name, None)
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="eu-west-3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lambda_context():
    class Context:
        function_name = "test-fn"
        memory_limit_in_mb = 256
        invoked_function_arn = "arn:aws:lambda:eu-west-3:123456789012:function:test-fn"
        aws_request_id = "req-0001"

        @staticmethod
        def get_remaining_time_in_millis():
            return 30000

    return Context()


@pytest.fixture
def moto_server():
    """A moto server on loopback, for code in other processes (spark-submit, Python workers)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    import requests

    requests.post(f"http://127.0.0.1:{port}/moto-api/reset", timeout=10)  # in-process: backends are shared
    server.stop()


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory):
    """A real Keras weights file for the model (seeded; ImageNet cannot be downloaded offline). Each batch-norm
    layer's statistics are set from its input on fixture images, as training leaves them, with random scale
    and shift: activations keep a trained network's range, so features differ from image to image."""
    import numpy as np
    import tensorflow as tf

    from emr_job.model import build_network
    from tests.job.images import rgb

    tf.keras.utils.set_random_seed(7)
    net = build_network()
    rng = np.random.default_rng(7)
    images = np.stack([np.asarray(rgb(i, size=(224, 224)), np.float32) / 127.5 - 1.0 for i in range(16)])
    norms = [layer for layer in net.layers if isinstance(layer, tf.keras.layers.BatchNormalization)]
    for layer in norms:
        n = layer.get_weights()[0].shape[0]
        layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n), np.zeros(n), np.ones(n)])
    # One pass in training mode normalizes every layer by its batch statistics: keeping them as the moving
    # statistics makes inference reproduce that pass.
    seen = tf.keras.Model(net.inputs, [layer.input for layer in norms])([images], training=True)
    for layer, x in zip(norms, seen):
        gamma, beta, _, _ = layer.get_weights()
        layer.set_weights([gamma, beta, x.numpy().mean(axis=(0, 1, 2)), x.numpy().var(axis=(0, 1, 2))])
    path = str(tmp_path_factory.mktemp("weights") / "mobilenet_v2_test.weights.h5")
    net.save_weights(path)
    return path


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAM = os.path.join(ROOT, ".venv-sam", "bin", "sam")


@pytest.fixture(scope="session")
def sam_build(tmp_path_factory):
    """`sam build` of template.yaml, as a deployer runs it (no Docker): the functions, both runtime layers and
    the template they leave. Built once per session; the template tests and the rollout rehearsal share it."""
    import subprocess
    from pathlib import Path

    if not os.path.exists(SAM):
        pytest.fail("SAM CLI missing: `make test` installs it into .venv-sam (make sam-setup)")
    work = tmp_path_factory.mktemp("sam")
    build = work / "build"
    env = {**os.environ, "SAM_CLI_TELEMETRY": "0", "AWS_DEFAULT_REGION": "eu-west-3"}
    # SAM's cache (keyed by the sources' hash) outlives the session: an unchanged layer is not built again
    cache = os.path.join(ROOT, ".aws-sam", "test-cache")
    cmd = [SAM, "build", "--build-dir", str(build), "--cached", "--cache-dir", cache]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return Path(build)
