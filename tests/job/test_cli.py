"""The job as users start it: `spark-submit emr_job/main.py` against S3 (a moto server), and `python -m emr_job`."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import boto3

from emr_job.package import build
from tests.job.images import encoded, make_tree, rgb

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


def job_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSPARK")}
    env.update(PYSPARK_PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL="2", **extra)
    return env


def submit(dist: list, args: list, cwd, env) -> subprocess.CompletedProcess:
    cmd = [f"{BIN}/spark-submit", "--master", "local[2]", "--py-files", dist[0], dist[1], *args]
    return subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True)


def test_spark_submit_reads_and_writes_s3_and_converges_on_what_the_bucket_holds(moto_server, tmp_path, weights_file):
    # Given a versioned bucket with images (one broken) and weights, as the stack has
    s3 = boto3.client("s3", endpoint_url=moto_server)
    s3.create_bucket(Bucket="photos", CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
    s3.put_bucket_versioning(Bucket="photos", VersioningConfiguration={"Status": "Enabled"})
    keys = []
    for path in make_tree(str(tmp_path / "src"), labels=("Apple Braeburn", "Kiwi"), per_label=3):
        key = "images/" + os.path.relpath(path, tmp_path / "src")
        s3.upload_file(path, "photos", key)
        keys.append(key)
    s3.put_object(Bucket="photos", Key="images/Kiwi/broken.jpg", Body=encoded(rgb(1), "JPEG")[:200])
    s3.upload_file(weights_file, "photos", "artifacts/model/weights.weights.h5")
    dist = build(str(tmp_path / "dist"))[:2]
    args = ["--input", "s3://photos/images/", "--output", "s3://photos/results/",
            "--weights", "s3://photos/artifacts/model/weights.weights.h5", "--k", "2"]  # fmt: skip
    env = job_env(AWS_ENDPOINT_URL=moto_server)

    # When the packaged entry file is submitted as EMR does
    proc = submit(dist, args, tmp_path, env)

    # Then executors read every image from S3 and the results are committed to S3
    assert proc.returncode == 0, proc.stderr[-3000:]
    rpt = json.loads(s3.get_object(Bucket="photos", Key="results/report.json")["Body"].read())
    assert (rpt["images_ok"], rpt["images_failed"]) == (6, 1)
    assert rpt["weights"].startswith("s3://photos/artifacts/model/weights.weights.h5")
    assert "images: 7 total, 6 ok, 1 failed" in proc.stdout
    os.environ["AWS_ENDPOINT_URL"] = moto_server
    try:
        from tests.job.results import rows

        features = rows("s3://photos/results", "features")
        assert sorted(features) == sorted(f"s3://photos/{k}" for k in keys)
        assert {r["label"] for r in features.values()} == {"Apple Braeburn", "Kiwi"}
        assert all(len(r["version"]) == 32 for r in features.values())  # S3 ETags, for the next run
        assert list(rows("s3://photos/results", "failures")) == ["s3://photos/images/Kiwi/broken.jpg"]

        # When an old version of an image is deleted (ObjectRemoved, but the image is still there), one image
        # is erased, and the job runs again
        s3.put_object(Bucket="photos", Key=keys[0], Body=(tmp_path / "src" / keys[0][7:]).read_bytes())
        versions = s3.list_object_versions(Bucket="photos", Prefix=keys[0])["Versions"]
        old = [v["VersionId"] for v in versions if not v["IsLatest"]][0]
        s3.delete_object(Bucket="photos", Key=keys[0], VersionId=old)
        s3.delete_object(Bucket="photos", Key=keys[1])
        again = submit(dist, args, tmp_path, env)

        # Then the live image keeps its row (same content, same ETag) and the erased one is gone
        assert again.returncode == 0, again.stderr[-3000:]
        features = rows("s3://photos/results", "features")
        assert f"s3://photos/{keys[0]}" in features and f"s3://photos/{keys[1]}" not in features
        assert len(features) == 5 and len(rows("s3://photos/results", "pca")) == 5

        # And the results answer a similarity query and SQL straight from S3
        from emr_job import query, sql

        [answer] = query.query("s3://photos/results/", [str(tmp_path / "src" / keys[2][7:])], top=2)
        nearest = answer.neighbours[0]
        assert nearest["path"] == f"s3://photos/{keys[2]}"
        assert nearest["distance"] <= 1e-4 * max(map(abs, answer.coords))
        counts = sql.query("s3://photos/results", "SELECT label, count(*) AS n FROM pca GROUP BY label ORDER BY label")
        assert counts.to_pylist() == [{"label": "Apple Braeburn", "n": 2}, {"label": "Kiwi", "n": 3}]
    finally:
        del os.environ["AWS_ENDPOINT_URL"]


def test_unchanged_input_loads_no_tensorflow(tmp_path):
    # Given published results
    src, out = str(tmp_path / "in"), str(tmp_path / "out")
    make_tree(src, labels=("a", "b"), per_label=2)
    cmd = [sys.executable, "-m", "emr_job", "--input", src, "--output", out, "--k", "2"]
    assert subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True).returncode == 0

    # When the job runs again with nothing changed, and TensorFlow (and Spark) cannot even be imported
    blocker = tmp_path / "blocked"
    for name in ("tensorflow", "pyspark"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(f"raise ImportError('{name} must not load')")
    env = job_env(PYTHONPATH=f"{blocker}{os.pathsep}{ROOT}")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)

    # Then it succeeds at once, says nothing changed, and publishes nothing new
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nothing changed under the input" in proc.stdout


def test_under_spark_submit_every_run_creates_the_spark_context(tmp_path, monkeypatch, weights_file):
    from emr_job import main, session

    # Given published results of a small tree, made in the driver alone
    src, out = str(tmp_path / "in"), str(tmp_path / "out")
    make_tree(src, labels=("a", "b"), per_label=2)
    args = ["--input", src, "--output", out, "--k", "2", "--weights", weights_file]
    made, stopped = [], []
    context = SimpleNamespace(master="local[2]", defaultParallelism=2, getConf=lambda: SimpleNamespace(get=dict().get))
    fake = SimpleNamespace(sparkContext=context, stop=lambda: stopped.append(1))  # what the run reads of a session
    monkeypatch.setattr(session, "spark_session", lambda: made.append(1) or fake)
    assert main.main(args) == 0 and not made

    # When spark-submit starts a run with nothing to do
    monkeypatch.setenv("PYSPARK_GATEWAY_PORT", "0")
    assert main.main(args) == 0

    # Then it still made its SparkContext, once, and stopped it: YARN's cluster mode fails a run without one
    assert (len(made), len(stopped)) == (1, 1)


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
