"""GDPR by construction, end to end on one moto server: upload, process, erase, and then look for the key
everywhere the stack keeps anything: every object and object version, the state table, every log line."""

import json
import os
import subprocess
import sys

import boto3

from tests.job.images import encoded, make_tree, rgb
from tests.job.results import holds, rows
from tests.lambdas.conftest import BUCKET, load, s3_record, serverless_state, sqs_event
from tests.lambdas.stack import create_stack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VICTIM = "images/Kiwi/Zoë Dupont+copy 1.jpg"  # a person's name, a '+', a space and an accent


def run_job(stack, job_id: str, env: dict, *extra: str) -> str:
    """What EMR Serverless would run for this job run: the job, with the arguments the launcher passed."""
    run = stack.emrs.get_job_run(applicationId=stack.app_id, jobRunId=job_id)["jobRun"]
    args = run["jobDriver"]["sparkSubmit"]["entryPointArguments"]
    proc = subprocess.run([sys.executable, "-m", "emr_job", *args, *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_an_erased_image_leaves_no_trace_outside_expiring_old_versions(moto_server, weights_file, tmp_path,
                                                                       monkeypatch, capfd, lambda_context):  # fmt: skip
    # Given the stack on a moto server, with versioning as template.yaml sets it, and images including the victim
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    stack = create_stack()
    stack.s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    for name, value in stack.env.items():
        monkeypatch.setenv(name, value)
    stack.s3.upload_file(weights_file, BUCKET, stack.env["WEIGHTS_URI"].split("/", 3)[3])  # as JobArtifacts does
    for path in make_tree(str(tmp_path / "src"), labels=("Kiwi", "Apple"), per_label=3):
        stack.s3.upload_file(path, BUCKET, "images/" + os.path.relpath(path, tmp_path / "src"))
    stack.s3.put_object(Bucket=BUCKET, Key=VICTIM, Body=encoded(rgb(9), "JPEG"))
    trigger, job_state = load("trigger.app"), load("job_state.app")
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "TF_CPP_MIN_LOG_LEVEL": "2"}
    logs = []

    def process(event: dict, *extra: str) -> None:
        trigger.lambda_handler(event, lambda_context) if "Records" in event else job_state.lambda_handler(
            event, lambda_context
        )
        run = job_state.PIPELINE.state.read().run
        logs.append(run_job(stack, run.job_id, env, *extra))
        job_state.lambda_handler(serverless_state(run.job_id, stack.app_id, "SUCCESS"), lambda_context)

    # When the uploads are processed
    process(sqs_event([{"Records": [s3_record(VICTIM)]}]))
    assert f"s3://{BUCKET}/{VICTIM}" in rows(f"s3://{BUCKET}/results", "features")

    # And the image is erased; its deletion processed; and a day later the daily reconciliation runs, by when
    # the compaction and snapshot windows have passed (the job's windows set to zero stand for that day)
    stack.s3.delete_object(Bucket=BUCKET, Key=VICTIM)
    process(sqs_event([{"Records": [s3_record(VICTIM, action="ObjectRemoved:DeleteMarkerCreated")]}]))
    assert f"s3://{BUCKET}/{VICTIM}" not in rows(f"s3://{BUCKET}/results", "features")
    process({"action": "daily"}, "--compact-after-hours", "0", "--keep-snapshots-hours", "0")

    # Then no current object, no state item and no log line holds the key in any encoding
    s3 = boto3.client("s3", endpoint_url=moto_server)
    holding = []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=BUCKET):
        for version in page.get("Versions", []):
            body = s3.get_object(Bucket=BUCKET, Key=version["Key"], VersionId=version["VersionId"])["Body"].read()
            if holds(_decoded(version["Key"], body), VICTIM):
                holding.append((version["Key"], version["IsLatest"]))
    assert holding, "the search must be able to find the key (it sat in the image and in the results)"
    assert [key for key, latest in holding if latest] == []
    # ... only old versions, which the bucket's NoncurrentVersionExpiration removes after the retention window
    for item in stack.ddb.scan(TableName="runs")["Items"]:
        assert not holds(json.dumps(item, ensure_ascii=False).encode(), VICTIM), item
    out, err = capfd.readouterr()
    for line in (out + err + "".join(logs)).splitlines():
        assert not holds(line.encode(), VICTIM), line


def _decoded(key: str, body: bytes) -> bytes:
    """Parquet compresses its pages: search its values, not its bytes."""
    if not key.endswith(".parquet"):
        return body
    import io

    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(body))
    return "\n".join(str(v) for column in table.columns for v in column.to_pylist()).encode()
