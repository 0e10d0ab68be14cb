"""The whole cloud flow on one machine (tests/localstack): uploads become results through the deployed code
paths, an erasure takes effect, a failed run is retried as the template configures, a lost event is repaired."""

import json
import logging
import os

import pytest

from tests.job.images import encoded, make_tree, rgb


@pytest.fixture
def stack(tmp_path, weights_file, monkeypatch):
    from tests.localstack.__main__ import Watcher
    from tests.localstack.stack import LocalStack

    for name in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID"):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # restored afterwards; the stack sets them
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    lines = []
    local = LocalStack("local", log=lines.append, workdir=str(tmp_path / "stack"), overrides={"RetryBaseSeconds": "1"},
                       weights=weights_file)  # fmt: skip
    local.start()
    local.lines = lines
    local.serve(timers=False)  # the test fires the schedules itself, at the moments it checks
    local.watcher = Watcher(local)
    yield local
    import requests

    requests.post(f"{local.endpoint}/moto-api/reset", timeout=10)  # in-process: backends are shared
    local.stop()


def results(stack, name):
    from emr_job.store import Results

    return {r["path"]: r for r in Results(f"s3://{stack.bucket}/results").read(name).to_pylist()}


def report(stack) -> dict:
    return json.loads(stack.client("s3").get_object(Bucket=stack.bucket, Key="results/report.json")["Body"].read())


def test_uploads_become_results_erasures_take_effect_failures_retry_and_lost_events_are_repaired(
    stack, tmp_path, capsys
):
    s3, bucket = stack.client("s3"), stack.bucket
    key = lambda p: "images/" + os.path.relpath(p, tmp_path / "src")  # noqa: E731

    # Uploads -> S3 notifications -> SQS -> trigger -> StartJobRun -> the packaged job -> state event -> settled
    paths = make_tree(str(tmp_path / "src"), labels=("Apple", "Kiwi"), per_label=2)
    for path in paths:
        s3.upload_file(path, bucket, key(path))
    s3.put_object(Bucket=bucket, Key="images/Kiwi/broken.jpg", Body=b"not a jpeg")
    first = stack.watcher.wait_for_settled(None)
    assert first["state"] == "SUCCESS"
    assert (report(stack)["images_ok"], report(stack)["images_failed"]) == (4, 1)
    assert sorted(results(stack, "features")) == sorted(f"s3://{bucket}/{key(p)}" for p in paths)
    shown = status(stack, capsys)
    assert (shown["pipeline"]["state"], shown["last_run"]["outcome"], shown["errors"]) == ("idle", "SUCCESS", [])
    assert shown["last_run"]["results"]["images"]["ok"] == 4 and shown["last_run"]["results"]["of_last_run"]

    # Two images erased, three added; the end event of that run is lost: the schedule's reconciliation settles it
    stack.drop_end_event_of.update({"*"})
    for path in paths[:2]:
        s3.delete_object(Bucket=bucket, Key=key(path))
    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"images/Kiwi/new-{i}.jpg", Body=encoded(rgb(40 + i), "JPEG"))
    wait_for_job_end(stack)
    assert stack.watcher.poll().get("run"), "the run stays active until someone asks EMR"
    stack.drop_end_event_of.clear()
    stack.fire_schedule("Reconcile")
    second = stack.watcher.wait_for_settled(first["run_id"], timeout=60)
    features = results(stack, "features")
    assert len(features) == 5 and not {f"s3://{bucket}/{key(p)}" for p in paths[:2]} & set(features)
    assert report(stack)["images_removed"] == 2

    # A run that fails (unusable weights) -> FAILED event -> alert, its driver log kept -> retried after the backoff
    weights_key = stack.outputs["WeightsUri"].split("/", 3)[3]
    good = s3.get_object(Bucket=bucket, Key=weights_key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=weights_key, Body=b"not weights")
    s3.put_object(Bucket=bucket, Key="images/Apple/late.jpg", Body=encoded(rgb(50), "JPEG"))
    failed = stack.watcher.wait_for_settled(second["run_id"])
    s3.put_object(Bucket=bucket, Key=weights_key, Body=good)  # fixed before the retry
    assert failed["state"] == "FAILED" and "ExitCode: 1" in failed["detail"]
    from tests.localstack.__main__ import alerts

    assert any("ended FAILED" in a["subject"] for a in alerts(stack))
    logs = s3.list_objects_v2(Bucket=bucket, Prefix="logs/emr-serverless/")["Contents"]
    assert any(o["Key"].endswith("SPARK_DRIVER/stderr.gz") for o in logs)
    assert stack.watcher.poll()["failures"] == "1" and not stack.watcher.poll().get("run")  # backing off
    import time

    time.sleep(1.5)  # RetryBaseSeconds=1
    stack.fire_schedule("Reconcile")
    retried = stack.watcher.wait_for_settled(failed["run_id"])
    assert retried["state"] == "SUCCESS" and retried["attempt"] == "2"
    assert f"s3://{bucket}/images/Apple/late.jpg" in results(stack, "features")

    # The template's Glue database holds the tables of the published run, for Athena
    glue = stack.client("glue")
    database = stack.template.values["ResultsDatabase"]
    tables = {
        t["Name"]: t["Parameters"]["metadata_location"] for t in glue.get_tables(DatabaseName=database)["TableList"]
    }
    assert tables == report(stack)["commit"]["tables"]

    # A state event no rule of the template matches never reaches the function
    from tests.localstack.stack import JobRun, job_state_event

    other = job_state_event("another-application", JobRun("j-1", "x", {}, 5, ""), "FAILED", "RUNNING", "")
    assert stack.emit(other) == 0


def status(stack, capsys) -> dict:
    """`image-features status --config-env local --json`, as an operator runs it against the local stack."""
    from ops.cli import main

    capsys.readouterr()
    with stack._lock:  # no function runs meanwhile: an invocation redirects stdout to the functions' log
        assert main(["status", "--config-env", "local", "--json"]) == 0
        return json.loads(capsys.readouterr().out)


def wait_for_job_end(stack, timeout=300):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        job = stack.watcher.poll().get("run", {}).get("job_id")
        if job and stack.jobs.get(job) and stack.jobs[job].state in ("SUCCESS", "FAILED"):
            return
        time.sleep(1)
    raise TimeoutError("the job did not end")
