"""GDPR by construction, end to end on one moto server: upload, process, erase, and then look for the key
everywhere the stack keeps anything: every object and object version, the state table, every log line. Right after
the run that sees the deletion, only files of superseded snapshots (kept for readers in mid-query) may hold it;
the cleanup run the pipeline starts at the time the report gives, under an hour later, removes those."""

import json
import math
import os
from datetime import datetime

import boto3
import pytest
from botocore.exceptions import ClientError

from emr_job import job as job_module
from emr_job.store import Results, referenced_files
from tests.job.images import encoded, make_tree, rgb
from tests.job.results import holds, rows
from tests.lambdas.conftest import BUCKET, load, s3_record, serverless_state, sqs_event
from tests.lambdas.stack import create_stack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VICTIM = "images/Kiwi/Zoë Dupont+copy 1.jpg"  # a person's name, a '+', a space and an accent
RESULTS = f"s3://{BUCKET}/results"


def run_job(stack, job_id: str, exit_status: int = 0) -> None:
    """What EMR Serverless would run for this job run: the job, with the arguments the launcher passed (in this
    process, so that the clock the test moves is the job's too)."""
    from emr_job.main import main

    run = stack.emrs.get_job_run(applicationId=stack.app_id, jobRunId=job_id)["jobRun"]
    assert main(run["jobDriver"]["sparkSubmit"]["entryPointArguments"]) == exit_status


def latest_holding(s3) -> set:
    """Keys of the current object versions whose content holds the victim's key."""
    found = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            if holds(_decoded(obj["Key"], s3.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()), VICTIM):
                found.add(f"s3://{BUCKET}/{obj['Key']}")
    return found


def superseded_files() -> set:
    """Files only superseded snapshots reach (what a reader that loaded them before the erasing run may read)."""
    results = Results(RESULTS)
    reached, current = set(), set()
    for name in ("features", "pca", "failures"):
        table = results.table(name)
        if table is None:
            continue
        reached |= referenced_files(table)
        snapshot = table.current_snapshot()
        if snapshot is not None:
            current.add(snapshot.manifest_list)
            for manifest in snapshot.manifests(table.io):
                current.add(manifest.manifest_path)
                current |= {e.data_file.file_path for e in manifest.fetch_manifest_entry(table.io)}
    return reached - current


def deployed_with_the_victim(moto_server, weights_file, tmp_path, monkeypatch) -> tuple:
    """(stack, trigger, job-state, [now]): the stack on a moto server, versioned as template.yaml makes it, with
    images including the victim, and one clock for both functions and the job."""
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
    now = [job_state.PIPELINE.state.clock()]
    job_state.PIPELINE.state.clock = trigger.PIPELINE.state.clock = lambda: now[0]
    monkeypatch.setattr(job_module, "CLOCK", lambda: now[0])
    return stack, trigger, job_state, now


def test_an_erased_image_leaves_every_current_file_at_once_and_the_superseded_ones_within_the_hour(
    moto_server, weights_file, tmp_path, monkeypatch, capfd, lambda_context
):
    # Given the stack on a moto server, with versioning as template.yaml sets it, and images including the victim
    stack, trigger, job_state, now = deployed_with_the_victim(moto_server, weights_file, tmp_path, monkeypatch)

    def process(event: dict) -> None:
        trigger.lambda_handler(event, lambda_context) if "Records" in event else job_state.lambda_handler(
            event, lambda_context
        )
        run = job_state.PIPELINE.state.read().run
        assert run is not None, f"no run started by {event}"
        run_job(stack, run.job_id)
        job_state.lambda_handler(serverless_state(run.job_id, stack.app_id, "SUCCESS"), lambda_context)

    # When the uploads are processed
    process(sqs_event([{"Records": [s3_record(VICTIM)]}]))
    assert f"s3://{BUCKET}/{VICTIM}" in rows(RESULTS, "features")

    # And the image is erased, and its deletion processed
    stack.s3.delete_object(Bucket=BUCKET, Key=VICTIM)
    process(sqs_event([{"Records": [s3_record(VICTIM, action="ObjectRemoved:DeleteMarkerCreated")]}]))
    erased_at = now[0]

    # Then at once no current object holds the key but files of the snapshots it superseded
    s3 = boto3.client("s3", endpoint_url=moto_server)
    assert f"s3://{BUCKET}/{VICTIM}" not in rows(RESULTS, "features")
    holding = latest_holding(s3)
    assert holding, "the search must be able to find the key (it sat in the results)"
    assert holding <= superseded_files(), holding - superseded_files()

    # When the pipeline's reconciler comes round at the cleanup time the report gives, with no further upload
    due = datetime.fromisoformat(Results(RESULTS).report["maintenance"]["cleanup_due_at"]).timestamp()
    assert due - erased_at <= 3600 - 15 * 60  # room for the reconciler's period (5 min) and the run's start
    now[0] = due + 5 * 60
    process({"action": "reconcile"})

    # Then no current object, no state item and no log line holds the key in any encoding
    holding = []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=BUCKET):
        for version in page.get("Versions", []):
            body = s3.get_object(Bucket=BUCKET, Key=version["Key"], VersionId=version["VersionId"])["Body"].read()
            if holds(_decoded(version["Key"], body), VICTIM):
                holding.append((version["Key"], version["IsLatest"]))
    assert holding, "older versions still hold it"
    assert [key for key, latest in holding if latest] == []
    # ... only old versions, which the bucket's NoncurrentVersionExpiration removes after the retention window
    for item in stack.ddb.scan(TableName="runs")["Items"]:
        assert not holds(json.dumps(item, ensure_ascii=False).encode(), VICTIM), item
    assert Results(RESULTS).report["maintenance"]["cleanup_due_at"] is None
    out, err = capfd.readouterr()
    for line in (out + err).splitlines():
        assert not holds(line.encode(), VICTIM), line


def _decoded(key: str, body: bytes) -> bytes:
    """Parquet compresses its pages: search its values, not its bytes."""
    if not key.endswith(".parquet"):
        return body
    import io

    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(body))
    return "\n".join(str(v) for column in table.columns for v in column.to_pylist()).encode()


class RefusingDeletes:
    """S3 as the job's client meets it when DeleteObjects answers 200 with a per-key error for every table and run
    file (a bucket policy, a KMS or a throttling fault)."""

    def __init__(self, client):
        self.client = client

    def __getattr__(self, name):
        return getattr(self.client, name)

    def delete_objects(self, Bucket, Delete):  # noqa: N803  (boto3's names)
        refused = [o for o in Delete["Objects"] if "/_running/" not in o["Key"]]
        kept = [o for o in Delete["Objects"] if o not in refused]
        if kept:
            self.client.delete_objects(Bucket=Bucket, Delete={**Delete, "Objects": kept})
        return {"Errors": [{"Key": o["Key"], "Code": "AccessDenied", "Message": "Access Denied"} for o in refused]}


@pytest.mark.parametrize("fault", ["DeleteObjects per-key errors", "a Glue error"])
def test_a_run_that_fails_after_publishing_on_its_last_attempt_still_gets_its_cleanup(
    moto_server, weights_file, tmp_path, monkeypatch, lambda_context, fault
):
    from emr_job import catalog, storage

    # Given the stack on a moto server (MAX_ATTEMPTS=2), images including the victim, all processed
    stack, trigger, job_state, now = deployed_with_the_victim(moto_server, weights_file, tmp_path, monkeypatch)
    assert stack.env["MAX_ATTEMPTS"] == "2"
    ended = lambda state: job_state.lambda_handler(  # noqa: E731
        serverless_state(job_state.PIPELINE.state.read().run.job_id, stack.app_id, state), lambda_context
    )
    trigger.lambda_handler(sqs_event([{"Records": [s3_record(VICTIM)]}]), lambda_context)
    run_job(stack, job_state.PIPELINE.state.read().run.job_id)
    ended("SUCCESS")

    # When the image is erased, the first attempt fails, and the last one publishes, then fails after the swap
    stack.s3.delete_object(Bucket=BUCKET, Key=VICTIM)
    now[0] += 120
    trigger.lambda_handler(sqs_event([{"Records": [s3_record(VICTIM, "ObjectRemoved:Delete", at=now[0])]}]),
                           lambda_context)  # fmt: skip
    ended("FAILED")
    now[0] += 301
    job_state.lambda_handler({"action": "reconcile"}, lambda_context)
    with monkeypatch.context() as faulty:
        if fault == "a Glue error":
            faulty.setattr(catalog, "sync_glue", lambda *a, **k: (_ for _ in ()).throw(
                ClientError({"Error": {"Code": "ThrottlingException", "Message": "slow"}}, "UpdateTable")))  # fmt: skip
        else:
            faulty.setattr(storage, "s3_client", lambda client=storage.s3_client(): RefusingDeletes(client))
        run_job(stack, job_state.PIPELINE.state.read().run.job_id, exit_status=1)
    ended("FAILED")

    # Then the run is settled as published: the key left every current file, nothing gave up, a cleanup is due
    assert f"s3://{BUCKET}/{VICTIM}" not in rows(RESULTS, "features")
    state = job_state.PIPELINE.state.read()
    assert not state.given_up and state.failures == 0 and state.last_run["published"] == "yes"
    due = datetime.fromisoformat(Results(RESULTS).report["maintenance"]["cleanup_due_at"]).timestamp()
    assert state.cleanup_at == math.ceil(due) and due - now[0] <= 3600 - 15 * 60
    glue = boto3.client("glue", endpoint_url=moto_server)
    features = glue.get_table(DatabaseName="image_features_dev", Name="features")["Table"]["Parameters"]
    synced = features["metadata_location"] == Results(RESULTS).report["commit"]["tables"]["features"]
    assert synced == (fault != "a Glue error")  # orphans that could not go did not skip the sync

    # When the reconciler comes round at the due time, with no further upload
    now[0] = due + 5 * 60
    assert job_state.lambda_handler({"action": "reconcile"}, lambda_context)["reconciled"] == "cleanup"
    run_job(stack, job_state.PIPELINE.state.read().run.job_id)
    ended("SUCCESS")

    # Then no file of a current or superseded snapshot, and no current object, holds the erased key
    s3 = boto3.client("s3", endpoint_url=moto_server)
    assert latest_holding(s3) == set()  # every file of every snapshot still reachable is a current object
    assert glue.get_table(DatabaseName="image_features_dev", Name="features")["Table"]["Parameters"][
        "metadata_location"] == Results(RESULTS).report["commit"]["tables"]["features"]  # fmt: skip
