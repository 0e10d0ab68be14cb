"""The job as users start it: `spark-submit emr_job/main.py` against S3 (a moto server), and `python -m emr_job`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from emr_job.package import build
from tests.conftest import free_port
from tests.job.images import encoded, make_tree, rgb

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


@pytest.fixture
def s3_server():
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def job_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSPARK")}
    env.update(PYSPARK_PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL="2", **extra)
    return env


def test_spark_submit_reads_manifest_images_from_s3(s3_server, tmp_path, weights_file):
    # Given images and weights in a bucket, and a run manifest adding all but one and removing one
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="photos", CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
    local = make_tree(str(tmp_path / "src"), labels=("Apple Braeburn", "Kiwi"), per_label=3)
    uris = []
    for path in local:
        key = "images/" + os.path.relpath(path, tmp_path / "src")
        s3.upload_file(path, "photos", key)
        uris.append(f"s3://photos/{key}")
    s3.put_object(Bucket="photos", Key="images/Kiwi/broken.jpg", Body=encoded(rgb(1), "JPEG")[:200])
    s3.upload_file(weights_file, "photos", "artifacts/weights.weights.h5")
    manifest = {
        "run_id": "run-0001",
        "added": uris + ["s3://photos/images/Kiwi/broken.jpg", "s3://photos/images/Kiwi/gone.jpg"],
    }
    s3.put_object(Bucket="photos", Key="manifests/run-0001.json", Body=json.dumps(manifest))
    dist = build(str(tmp_path / "dist"))[:2]
    out = str(tmp_path / "out")

    # When the packaged entry file is submitted as EMR does
    cmd = [f"{BIN}/spark-submit", "--master", "local[2]", "--py-files", dist[0], dist[1]]
    args = ["--input", "s3://photos/images/", "--output", out, "--manifest", "s3://photos/manifests/run-0001.json"]
    args += ["--weights", "s3://photos/artifacts/weights.weights.h5", "--k", "2"]
    proc = subprocess.run(
        cmd + args, cwd=str(tmp_path), env=job_env(AWS_ENDPOINT_URL=s3_server), capture_output=True, text=True
    )

    # Then executors fetched every object by key; the broken one is a failure; the missing one is gone
    assert proc.returncode == 0, proc.stderr[-3000:]
    rpt = json.loads(Path(out, "report.json").read_text())
    assert (rpt["images_ok"], rpt["images_failed"], rpt["images_removed"]) == (6, 1, 1)
    assert rpt["run_id"] == "run-0001" and rpt["weights"].startswith("s3://photos/artifacts/weights.weights.h5")
    assert "images: 7 total, 6 ok, 1 failed" in proc.stdout
    import pyarrow.parquet as pq

    rows = pq.read_table(f"{out}/features").to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(uris)
    assert {r["label"] for r in rows} == {"Apple Braeburn", "Kiwi"}
    assert all(r["version"] and len(r["version"]) == 32 for r in rows)  # S3 ETags, for the next run
    assert pq.read_table(f"{out}/failures").to_pylist()[0]["path"] == "s3://photos/images/Kiwi/broken.jpg"


def test_cli_imagenet_without_network_fails_clearly(tmp_path):
    # Given a tree and no way to reach the ImageNet weights (a dead proxy, an empty Keras cache)
    src = str(tmp_path / "in")
    make_tree(src, labels=("a",), per_label=2)
    env = job_env(KERAS_HOME=str(tmp_path / "keras"), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")

    # When the job is asked for imagenet weights
    cmd = [sys.executable, "-m", "emr_job", "--input", src, "--output", str(tmp_path / "out"), "--weights", "imagenet"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)

    # Then it says so and exits non-zero, writing nothing rather than using other weights
    assert proc.returncode == 1
    assert "could not download the ImageNet weights" in proc.stderr
    assert not os.path.exists(tmp_path / "out" / "report.json")


def test_cli_rejects_bad_arguments(tmp_path):
    cmd = [sys.executable, "-m", "emr_job", "--input", "x", "--output", "y", "--variance", "1.5"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "--variance must be in (0, 1]" in proc.stderr
