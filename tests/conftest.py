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
    """A real Keras weights file for the model (seeded; ImageNet cannot be downloaded offline)."""
    import tensorflow as tf

    from emr_job.model import build_network

    tf.keras.utils.set_random_seed(7)
    net = build_network()
    path = str(tmp_path_factory.mktemp("weights") / "mobilenet_v2_test.weights.h5")
    net.save_weights(path)
    return path
