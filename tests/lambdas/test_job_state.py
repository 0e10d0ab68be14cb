"""Job-state function against moto: success, failure with retries and alerts, duplicates, EMR on EC2."""

import json

import pytest

from tests.lambdas.conftest import (
    BUCKET,
    job_runs,
    load,
    pending_keys,
    run_manifest,
    s3_record,
    serverless_state,
    sqs_event,
)


def alerts(aws) -> list:
    got = aws.sqs.receive_message(QueueUrl=aws.alerts, MaxNumberOfMessages=10).get("Messages", [])
    return [json.loads(m["Body"]) for m in got]


def test_success_releases_the_lock_and_clears_pending(aws, trigger, job_state, lambda_context):
    trigger.lambda_handler(sqs_event([{"Records": [s3_record("images/A/1.jpg")]}]), lambda_context)
    job = job_runs(aws)[0]

    result = job_state.lambda_handler(serverless_state(job["id"], aws.app_id, "SUCCESS"), lambda_context)

    assert result == {"settled": job["name"], "succeeded": True, "next_run": None}
    assert job_state.PIPELINE.lock.active() is None and pending_keys(aws) == []
    # A duplicate of the same event (EventBridge is at least once) changes nothing
    again = job_state.lambda_handler(serverless_state(job["id"], aws.app_id, "SUCCESS"), lambda_context)
    assert again == {"settled": None, "next_run": None}


def test_running_state_is_not_an_end(aws, trigger, job_state, lambda_context):
    trigger.lambda_handler(sqs_event([{"Records": [s3_record("images/A/1.jpg")]}]), lambda_context)
    job = job_runs(aws)[0]
    assert job_state.lambda_handler(serverless_state(job["id"], aws.app_id, "RUNNING"), lambda_context) == {
        "settled": None
    }
    assert job_state.PIPELINE.lock.active().job_id == job["id"]


def test_failure_retries_then_gives_up_and_alerts(aws, trigger, job_state, lambda_context):
    trigger.lambda_handler(sqs_event([{"Records": [s3_record("images/A/1.jpg")]}]), lambda_context)
    first = job_runs(aws)[0]

    # First failure (MAX_ATTEMPTS=2): kept pending with its attempt counted, retried at once as a new run
    result = job_state.lambda_handler(serverless_state(first["id"], aws.app_id, "FAILED"), lambda_context)
    assert result["succeeded"] is False and result["next_run"] and result["next_run"] != first["name"]
    assert run_manifest(aws, result["next_run"])["attempt"] == 2
    [alert] = alerts(aws)
    assert alert["state"] == "FAILED" and alert["abandoned_manifests"] == [] and "will retry" in alert["summary"]

    # Second failure: given up, moved to failed/, alerted, nothing more started
    second = next(r for r in job_runs(aws) if r["name"] == result["next_run"])
    result = job_state.lambda_handler(serverless_state(second["id"], aws.app_id, "FAILED"), lambda_context)
    assert result["next_run"] is None and pending_keys(aws) == []
    failed = aws.s3.list_objects_v2(Bucket=BUCKET, Prefix="manifests/failed/")["Contents"]
    assert len(failed) == 1
    [alert] = alerts(aws)
    assert alert["abandoned_manifests"] and "gave up" in alert["summary"]
    assert job_state.PIPELINE.lock.active() is None


@pytest.fixture
def ec2(aws):
    aws.monkeypatch.setenv("ENGINE", "ec2")
    aws.monkeypatch.setenv("EC2_USE_SPOT", "true")
    return load("trigger.app"), load("job_state.app")


def test_ec2_engine_runs_a_transient_cluster_with_one_step(aws, ec2, lambda_context):
    trigger, _ = ec2
    trigger.lambda_handler(sqs_event([{"Records": [s3_record("images/A/1.jpg")]}]), lambda_context)

    [cluster] = aws.emr.list_clusters()["Clusters"]
    described = aws.emr.describe_cluster(ClusterId=cluster["Id"])["Cluster"]
    assert described["AutoTerminate"] is True  # KeepJobFlowAliveWhenNoSteps=False
    assert described["ReleaseLabel"] == "emr-7.10.0"
    [step] = aws.emr.list_steps(ClusterId=cluster["Id"])["Steps"]
    assert step["ActionOnFailure"] == "TERMINATE_CLUSTER"
    args = step["Config"]["Args"]
    assert args[:3] == ["spark-submit", "--deploy-mode", "cluster"]
    assert args[args.index("--manifest") + 1].startswith(f"s3://{BUCKET}/manifests/runs/run-")
    [bootstrap] = aws.emr.list_bootstrap_actions(ClusterId=cluster["Id"])["BootstrapActions"]
    assert bootstrap["ScriptPath"] == f"s3://{BUCKET}/artifacts/job/bootstrap.sh"
    groups = {
        g["InstanceGroupType"]: g for g in aws.emr.list_instance_groups(ClusterId=cluster["Id"])["InstanceGroups"]
    }
    assert groups["CORE"]["Market"] == "SPOT" and groups["MASTER"]["Market"] == "ON_DEMAND"

    # A retried start for the same run finds the cluster instead of making a second one
    assert trigger.PIPELINE.launcher.start(step["Name"], "s3://x/m.json") == cluster["Id"]
    assert len(aws.emr.list_clusters()["Clusters"]) == 1


def test_ec2_step_and_cluster_events_settle_the_run(aws, ec2, lambda_context):
    trigger, job_state = ec2
    trigger.lambda_handler(sqs_event([{"Records": [s3_record("images/A/1.jpg")]}]), lambda_context)
    cluster_id = aws.emr.list_clusters()["Clusters"][0]["Id"]
    step_event = {
        "detail-type": "EMR Step Status Change",
        "source": "aws.emr",
        "detail": {"clusterId": cluster_id, "stepId": "s-1", "state": "COMPLETED", "message": "done"},
    }
    assert job_state.lambda_handler(step_event, lambda_context)["succeeded"] is True
    # The cluster's own termination event afterwards is not a second settlement
    cluster_event = {
        "detail-type": "EMR Cluster State Change",
        "source": "aws.emr",
        "detail": {"clusterId": cluster_id, "state": "TERMINATED", "stateChangeReason": "{}"},
    }
    assert job_state.lambda_handler(cluster_event, lambda_context) == {"settled": None}


def test_missing_configuration_names_the_variable(aws):
    from pipeline.settings import SettingsError
    from pipeline.settings import load as load_settings

    with pytest.raises(SettingsError, match="missing environment variable\\(s\\): BUCKET"):
        load_settings({**aws.env, "BUCKET": ""})
    with pytest.raises(SettingsError, match="EMR_APPLICATION_ID is required when ENGINE=serverless"):
        load_settings({**aws.env, "EMR_APPLICATION_ID": ""})
    with pytest.raises(SettingsError, match="QUIET_SECONDS must be at most 900"):
        load_settings({**aws.env, "QUIET_SECONDS": "3600"})
