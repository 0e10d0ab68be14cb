"""Least privilege that is sufficient: every AWS call the functions and the job made in a recorded run of the
flow is allowed by exactly the policies template.yaml gives them, and calls outside those policies are denied.

The calls are recorded by the moto server (tests/iam.py reads them back per principal, told apart by access key).
moto's own IAM enforcement is not used: it checks requests signed by IAM users it knows, ignores most condition
keys and does not model PassRole, so the template's statements are evaluated over the recorded calls instead."""

import json
import os
import subprocess
import sys
import threading

import pytest

from tests.iam import ACCOUNT, Call, allows, recorded_calls
from tests.job.images import make_tree
from tests.lambdas.conftest import BUCKET, PRICES, Clock, load, s3_record, serverless_state, set_job_state, sqs_event
from tests.lambdas.stack import create_stack
from tests.template.cfn import ENGINES, policies, stack_values

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"AKIATRIGGERFUNCTION0": "trigger", "AKIAJOBSTATEFUNCTION": "job_state", "AKIAEMRJOBRUNTIMEROL": "job",
        "AKIAARTIFACTSFUNCTIO": "artifacts"}  # fmt: skip


@pytest.fixture
def recorder(moto_server, tmp_path, monkeypatch):
    from moto.moto_api import recorder as moto_recorder

    path = str(tmp_path / "recording.jsonl")
    monkeypatch.setattr(moto_recorder, "_location", path)
    # The server records from one thread per request, each entry in several buffered writes: serialize them
    lock, record = threading.Lock(), moto_recorder._record_request

    def record_one_at_a_time(*args, **kwargs):
        with lock:
            record(*args, **kwargs)

    monkeypatch.setattr(moto_recorder, "_record_request", record_one_at_a_time)
    moto_recorder.start_recording()
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    yield path
    moto_recorder.stop_recording()


def as_principal(monkeypatch, name: str) -> None:
    """The credentials the next clients are built with: one access key per role of the stack."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", {v: k for k, v in KEYS.items()}[name])
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # the default session caches the first credentials


def stack_policies(stack, engine: int, **parameters) -> dict:
    names = {"UploadQueue": "uploads", "UploadDeadLetterQueue": "uploads-dlq", "AlertTopic": "run-failures",
             "EmrRuntimeRole": "emr-runtime", "EmrServiceRole": "emr-service",
             "EmrInstanceRole": "emr-instance-profile", "JobStateDeadLetterQueue": "job-state-dlq",
             "ResultsDatabase": "image_features_dev"}  # fmt: skip
    values = stack_values(ACCOUNT, "eu-west-3", BUCKET, "runs", stack.app_id, names)
    values.update(Stage="dev", **parameters)
    return policies({**ENGINES[engine], "UseKms": True, "WeightsFromS3": True}, values)


def check(calls: list, granted: dict) -> None:
    refused = sorted({c.describe() for c in calls if not allows(granted[c.principal], c)})
    assert refused == [], "calls the template does not allow:\n" + "\n".join(refused)


def test_the_serverless_flow_needs_nothing_the_template_does_not_grant(recorder, weights_file, tmp_path, monkeypatch,
                                                                        lambda_context):  # fmt: skip
    # Given the stack on a moto server, and each role's calls signed with its own key
    stack = create_stack()
    stack.s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    # With the prices template.yaml gives: the job is run with them too (--price-vcpu-hour, --price-gb-hour)
    for name, value in {**stack.env, **PRICES, "QUIET_SECONDS": "60"}.items():
        monkeypatch.setenv(name, value)
    stack.s3.upload_file(weights_file, BUCKET, stack.env["WEIGHTS_URI"].split("/", 3)[3])  # as JobArtifacts does
    as_principal(monkeypatch, "trigger")
    trigger = load("trigger.app")
    as_principal(monkeypatch, "job_state")
    job_state = load("job_state.app")
    # The daily pass before any image or result: the missing report reads as "no results yet" (its listing is
    # granted), so nothing starts on an empty bucket
    assert job_state.lambda_handler({"action": "daily"}, lambda_context) == {"daily": "unchanged", "next": "clean"}
    for path in make_tree(str(tmp_path / "src"), labels=("Kiwi", "Apple"), per_label=2):
        stack.s3.upload_file(path, BUCKET, "images/" + os.path.relpath(path, tmp_path / "src"))
    clock = Clock(trigger.PIPELINE.state.clock())
    trigger.PIPELINE.state.clock = job_state.PIPELINE.state.clock = clock
    job_env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIAEMRJOBRUNTIMEROL", "PYSPARK_PYTHON": sys.executable,
               "TF_CPP_MIN_LOG_LEVEL": "2"}  # fmt: skip

    def run_the_job() -> None:
        run = job_state.PIPELINE.state.read().run
        driver = stack.emrs.get_job_run(applicationId=stack.app_id, jobRunId=run.job_id)["jobRun"]["jobDriver"]
        args = driver["sparkSubmit"]["entryPointArguments"]
        proc = subprocess.run([sys.executable, "-m", "emr_job", *args], cwd=ROOT, env=job_env, capture_output=True,
                              text=True)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]

    # When the whole flow runs: uploads and a malformed message, a tick, a failed run and its alert, the
    # schedule's retry, the job, a lost success event settled by the schedule, a second job, the daily pass, and a
    # third run that EMR keeps running past its timeout: cancelled, then settled by the schedule
    trigger.lambda_handler(sqs_event(["not json", {"Records": [s3_record("images/Kiwi/0.jpg", at=clock.now)]}]),
                           lambda_context)  # fmt: skip
    clock.advance(61)
    trigger.lambda_handler(sqs_event([{"image-features": "tick"}]), lambda_context)
    failed = job_state.PIPELINE.state.read().run.job_id
    job_state.lambda_handler(serverless_state(failed, stack.app_id, "FAILED"), lambda_context)
    clock.advance(301)
    job_state.lambda_handler({"action": "reconcile"}, lambda_context)
    run_the_job()
    job_state.lambda_handler({"action": "reconcile"}, lambda_context)  # moto reports SUCCESS: settled
    stack.s3.delete_object(Bucket=BUCKET, Key="images/Apple/1.jpg")
    job_state.lambda_handler({"action": "daily"}, lambda_context)
    run_the_job()
    job_state.lambda_handler({"action": "reconcile"}, lambda_context)  # settled; its report read
    stack.s3.delete_object(Bucket=BUCKET, Key="images/Kiwi/0.jpg")
    trigger.lambda_handler(sqs_event([{"Records": [s3_record("images/Kiwi/0.jpg", "ObjectRemoved:Delete",
                                                             at=clock.now)]}]), lambda_context)  # fmt: skip
    clock.advance(61)
    trigger.lambda_handler(sqs_event([{"image-features": "tick"}]), lambda_context)
    set_job_state(stack, job_state.PIPELINE.state.read().run.job_id, "RUNNING")
    clock.advance(180 * 60 + 901)
    job_state.lambda_handler({"action": "reconcile"}, lambda_context)  # cancelled
    job_state.lambda_handler({"action": "reconcile"}, lambda_context)  # settled from EMR (moto: CANCELLED at once)

    # Then every call each role made is allowed by its policies in template.yaml
    calls = recorded_calls(recorder, KEYS)
    made = {c.principal for c in calls}
    assert made == {"trigger", "job_state", "job"}
    actions = {c.action for c in calls}
    assert {"sqs:SendMessage", "sns:Publish", "emr-serverless:StartJobRun", "emr-serverless:GetJobRun",
            "emr-serverless:ListJobRuns", "emr-serverless:CancelJobRun", "iam:PassRole", "dynamodb:UpdateItem",
            "s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "glue:CreateTable",
            "glue:UpdateTable", "events:PutEvents"} <= actions  # fmt: skip
    assert job_state.PIPELINE.state.read().last_run["state"] == "CANCELLED"
    granted = stack_policies(stack, 0)
    check(calls, granted)

    # And calls outside them are refused
    outside = [
        Call("job", "s3:PutObject", f"arn:aws:s3:::{BUCKET}/images/Kiwi/new.jpg"),
        Call("job", "s3:GetObject", "arn:aws:s3:::another-bucket/images/a.jpg"),
        Call("job", "s3:ListBucket", f"arn:aws:s3:::{BUCKET}", (("s3:prefix", "logs/"),)),
        Call("job", "dynamodb:UpdateItem", f"arn:aws:dynamodb:eu-west-3:{ACCOUNT}:table/runs"),
        Call("job", "glue:UpdateTable", f"arn:aws:glue:eu-west-3:{ACCOUNT}:table/other_db/features"),
        Call("job", "glue:DeleteTable", f"arn:aws:glue:eu-west-3:{ACCOUNT}:table/image_features_dev/features"),
        Call("trigger", "s3:GetObject", f"arn:aws:s3:::{BUCKET}/images/Kiwi/0.jpg"),
        Call("trigger", "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/admin",
             (("iam:PassedToService", "emr-serverless.amazonaws.com"),)),
        Call("job_state", "emr-serverless:StartJobRun",
             f"arn:aws:emr-serverless:eu-west-3:{ACCOUNT}:/applications/other"),
        Call("job_state", "sqs:SendMessage", f"arn:aws:sqs:eu-west-3:{ACCOUNT}:uploads"),
        Call("trigger", "emr-serverless:CancelJobRun",  # only the reconciler cancels
             f"arn:aws:emr-serverless:eu-west-3:{ACCOUNT}:/applications/{stack.app_id}/jobruns/x"),
        Call("job_state", "emr-serverless:CancelJobRun",
             f"arn:aws:emr-serverless:eu-west-3:{ACCOUNT}:/applications/other/jobruns/x"),
        Call("job_state", "s3:ListBucket", f"arn:aws:s3:::{BUCKET}", (("s3:prefix", "results/"),)),
        Call("job_state", "s3:GetObject", f"arn:aws:s3:::{BUCKET}/results/tables/features/metadata/x.json"),
        Call("job_state", "events:PutEvents", f"arn:aws:events:eu-west-3:{ACCOUNT}:event-bus/default",
             (("events:source", "aws.s3"),)),
        Call("trigger", "events:PutEvents", f"arn:aws:events:eu-west-3:{ACCOUNT}:event-bus/other",
             (("events:source", "image-features"),)),
    ]  # fmt: skip
    listed = Call("job_state", "s3:ListBucket", f"arn:aws:s3:::{BUCKET}", (("s3:prefix", "results/report.json"),))
    assert listed in calls and allows(granted["job_state"], listed)
    assert [c.describe() for c in outside if allows(granted[c.principal], c)] == []


def test_the_ec2_flow_needs_nothing_the_template_does_not_grant(recorder, monkeypatch, lambda_context):
    stack = create_stack()
    env = {**stack.env, "ENGINE": "ec2", "EMR_INSTANCE_PROFILE": "emr-instance-profile", "RUN_NAME_PREFIX": "x"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    as_principal(monkeypatch, "trigger")
    trigger = load("trigger.app")
    as_principal(monkeypatch, "job_state")
    job_state = load("job_state.app")

    clock = Clock(trigger.PIPELINE.state.clock())
    trigger.PIPELINE.state.clock = job_state.PIPELINE.state.clock = clock

    trigger.lambda_handler(sqs_event([{"Records": [s3_record("images/Kiwi/0.jpg")]}]), lambda_context)
    job_state.lambda_handler({"action": "reconcile"}, lambda_context)
    clock.advance(180 * 60 + 901)  # past its timeout: its cluster is terminated, then the run settled
    job_state.lambda_handler({"action": "reconcile"}, lambda_context)
    job_state.lambda_handler({"action": "reconcile"}, lambda_context)

    calls = recorded_calls(recorder, KEYS)
    assert {"elasticmapreduce:RunJobFlow", "elasticmapreduce:ListClusters", "elasticmapreduce:ListSteps",
            "elasticmapreduce:TerminateJobFlows", "elasticmapreduce:DescribeCluster",  # the run's normalized hours
            "iam:PassRole"} <= {c.action for c in calls}  # fmt: skip
    granted = stack_policies(stack, 1)
    check(calls, granted)
    assert job_state.PIPELINE.state.read().run is None  # settled
    assert "normalized_instance_hours" in job_state.PIPELINE.state.read().last_run
    cluster = f"arn:aws:elasticmapreduce:eu-west-3:{ACCOUNT}:cluster/j-1"
    assert not allows(granted["trigger"], Call("trigger", "elasticmapreduce:TerminateJobFlows", cluster))  # reconciler
    assert json.dumps(sorted({c.principal for c in calls})) == '["job_state", "trigger"]'


def test_the_stack_puts_its_artifacts_in_place_with_only_what_it_is_granted(recorder, weights_file, tmp_path,
                                                                             monkeypatch):  # fmt: skip
    from artifacts.publish import Request, publish, remove

    from tests.lambdas.test_artifacts import layer

    # Given the stack's bucket, and a weights file the deployer uploaded elsewhere (ModelWeights=s3://...)
    stack = create_stack()
    stack.s3.create_bucket(Bucket="deployer", CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
    stack.s3.upload_file(weights_file, "deployer", "uploads/mobilenet_v2.weights.h5")
    as_principal(monkeypatch, "artifacts")
    import boto3

    s3 = boto3.client("s3", region_name="eu-west-3")
    weights = "s3://deployer/uploads/mobilenet_v2.weights.h5"

    # When JobArtifacts is created, updated with a changed job (pruning what is past its window), and deleted
    publish(s3, Request(BUCKET, "artifacts/", layer(tmp_path / "a", b"A"), weights, "", 0))
    publish(s3, Request(BUCKET, "artifacts/", layer(tmp_path / "b", b"B"), weights, "", 0))
    remove(s3, Request(BUCKET, "artifacts/", layer(tmp_path / "b", b"B"), weights, "", 0))

    # Then every call it made is allowed by ArtifactsFunction's policies, with ModelWeights naming that file
    calls = recorded_calls(recorder, KEYS)
    assert {c.principal for c in calls} == {"artifacts"}
    assert {"s3:PutObject", "s3:GetObject", "s3:DeleteObjectVersion", "s3:ListBucket",
            "s3:ListBucketVersions"} <= {c.action for c in calls}  # fmt: skip
    granted = stack_policies(stack, 0, ModelWeights=weights)
    check(calls, granted)
    # And nothing else of the bucket, nor any other file of the deployer's
    outside = [
        Call("artifacts", "s3:PutObject", f"arn:aws:s3:::{BUCKET}/images/Kiwi/new.jpg"),
        Call("artifacts", "s3:DeleteObject", f"arn:aws:s3:::{BUCKET}/results/report.json"),
        Call("artifacts", "s3:GetObject", "arn:aws:s3:::deployer/uploads/other.h5"),
        Call("artifacts", "s3:ListBucket", f"arn:aws:s3:::{BUCKET}", (("s3:prefix", "images/"),)),
        Call("artifacts", "s3:ListBucketVersions", f"arn:aws:s3:::{BUCKET}", (("s3:prefix", "images/"),)),
        Call("artifacts", "s3:DeleteObjectVersion", f"arn:aws:s3:::{BUCKET}/images/Kiwi/1.jpg"),
    ]
    assert [c.describe() for c in outside if allows(granted[c.principal], c)] == []
