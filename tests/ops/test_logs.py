"""image-features logs: which run, which EMR job, which of the log objects EMR keeps is the driver's, and what the
command says when there is nothing (yet). AWS through moto (DynamoDB for the state item, EMR Serverless and EMR for
the jobs, S3 for the logs) and botocore's Stubber for CloudFormation's DescribeStacks and for refused S3 reads: moto's
CloudFormation costs seconds to load, and ops.stack.describe reads only DescribeStacks' answer."""

import functools
import gzip
import uuid
from datetime import datetime, timezone
from types import SimpleNamespace

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws
from pipeline.state import PipelineState

from ops import logs
from ops.cli import main, parser
from tests.lambdas.stack import BUCKET, REGION, set_job_state

STACK = "image-features-dev"
# One session for the module: it parses each service's model once (mock_aws drops boto3's default session, and with
# it the models read, at every start); moto answers clients made before or after it starts alike.
SESSION = boto3.Session(region_name=REGION)


@functools.cache
def client(service: str):
    return SESSION.client(service)


@pytest.fixture
def aws():
    """The stack's bucket, state table and EMR Serverless application in moto (as tests/lambdas/stack.py makes them)."""
    with mock_aws():
        s3 = client("s3")
        s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        ddb = client("dynamodb")
        ddb.create_table(TableName="runs", KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
                         AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                         BillingMode="PAY_PER_REQUEST")  # fmt: skip
        emrs = client("emr-serverless")
        app_id = emrs.create_application(name="features", releaseLabel="emr-7.10.0", type="SPARK")["applicationId"]
        yield SimpleNamespace(s3=s3, ddb=ddb, emrs=emrs, emr=client("emr"), app_id=app_id, engine="serverless")


def deploy(aws, engine="serverless") -> None:
    """The stack as deployed with Engine=engine: what DescribeStacks answers (described) and how runs start."""
    aws.engine = engine


def described(aws) -> dict:
    """DescribeStacks' answer for the stack: the outputs and parameters of template.yaml that `logs` reads."""
    outputs = {"Application": "image-features", "BucketName": BUCKET, "StateTableName": "runs"}
    if aws.engine == "serverless":
        outputs["EmrApplicationId"] = aws.app_id
    parameters = {"Engine": aws.engine, "Stage": "dev", "LogsRetentionDays": "30"}
    return {
        "StackName": STACK, "CreationTime": datetime.now(timezone.utc), "StackStatus": "UPDATE_COMPLETE",
        "Outputs": [{"OutputKey": k, "OutputValue": v} for k, v in outputs.items()],
        "Parameters": [{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
    }  # fmt: skip


def clients(aws, stack_error=None, s3=None):
    """service -> client, as the command builds them: moto's, with a stubbed CloudFormation (and S3 when given)."""
    cfn = SESSION.client("cloudformation")  # a client of its own: a Stubber stays on its client
    stub = Stubber(cfn)
    if stack_error:
        stub.add_client_error("describe_stacks", service_error_code="ValidationError", service_message=stack_error)
    else:
        stub.add_response("describe_stacks", {"Stacks": [described(aws)]}, {"StackName": STACK})
    stub.activate()
    made = {"cloudformation": cfn, "s3": s3 or aws.s3, "dynamodb": aws.ddb, "emr-serverless": aws.emrs, "emr": aws.emr}
    return made.__getitem__


def new_run_id() -> str:
    return f"run-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def start(aws, job=True) -> tuple:
    """Claim a run in the state item and start its EMR job as the launchers do: (run id, job id)."""
    state = PipelineState(aws.ddb, "runs")
    state.mark_dirty(None)
    run_id = new_run_id()
    run = state.claim(state.read(), run_id)
    if not job:
        return run_id, ""
    if aws.engine == "serverless":
        role, entry = "arn:aws:iam::123456789012:role/emr-runtime", {"sparkSubmit": {"entryPoint": "s3://b/main.py"}}
        job_id = aws.emrs.start_job_run(applicationId=aws.app_id, clientToken=run_id, name=run_id,
                                        executionRoleArn=role, jobDriver=entry)["jobRunId"]  # fmt: skip
        set_job_state(aws, job_id, "RUNNING")
    else:
        job_id = aws.emr.run_job_flow(
            Name=f"image-features-dev-{run_id}", ReleaseLabel="emr-7.10.0", LogUri=f"s3://{BUCKET}/logs/emr-ec2/",
            Instances={"MasterInstanceType": "m5.xlarge", "InstanceCount": 1, "KeepJobFlowAliveWhenNoSteps": False},
            JobFlowRole="emr-instance-profile", ServiceRole="emr-service",
        )["JobFlowId"]  # fmt: skip
    state.record_job(run, job_id)
    return run_id, job_id


def settle(aws, run_id: str, job_id: str) -> None:
    """The job ended and the job-state function settled the run: it is the state item's last_run."""
    if aws.engine == "serverless":
        set_job_state(aws, job_id, "SUCCESS")
    else:
        aws.emr.terminate_job_flows(JobFlowIds=[job_id])
    state = PipelineState(aws.ddb, "runs")
    outcome = {"run_id": run_id, "state": "SUCCESS", "attempt": 1, "detail": ""}
    state.settle(state.read(), True, outcome, None, retry_base_s=300, max_attempts=3)


def driver(aws, job_id: str, stream: str) -> str:
    return f"logs/emr-serverless/applications/{aws.app_id}/jobs/{job_id}/SPARK_DRIVER/{stream}.gz"


def upload(aws, key: str, text: str) -> None:
    """What EMR does at each upload: the object again, compressed, with everything the file holds so far."""
    aws.s3.put_object(Bucket=BUCKET, Key=key, Body=gzip.compress(text.encode()))


def numbered(prefix: str, count: int) -> str:
    return "".join(f"{prefix} {i}\n" for i in range(1, count + 1))


def run_logs(aws, *argv, stack_error=None, s3=None, sleep=None) -> int:
    args = parser().parse_args(["logs", "--stack", STACK, "--region", REGION, *argv])
    return logs.command(args, clients=clients(aws, stack_error, s3),
                        sleep=sleep or (lambda s: pytest.fail("slept without --follow")))  # fmt: skip


def test_last_run_prints_the_last_lines_of_its_driver_stderr_then_stdout(aws, capsys):
    # Given a settled run whose driver logs EMR Serverless uploaded
    deploy(aws)
    run_id, job_id = start(aws)
    settle(aws, run_id, job_id)
    upload(aws, driver(aws, job_id, "stderr"), numbered("log4j", 50))
    upload(aws, driver(aws, job_id, "stdout"), numbered("summary", 5))
    # When the operator asks for the last 3 lines
    code = run_logs(aws, "--lines", "3")
    # Then each file's last 3 lines are printed, stderr first, under headers naming the objects
    out, err = capsys.readouterr()
    assert code == 0
    stderr, stdout = (f"==> s3://{BUCKET}/{driver(aws, job_id, stream)} <==\n" for stream in ("stderr", "stdout"))
    assert out == f"{stderr}log4j 48\nlog4j 49\nlog4j 50\n\n{stdout}summary 3\nsummary 4\nsummary 5\n"
    assert f"{run_id}: EMR Serverless job run {job_id}, SUCCESS" in err


def test_one_stream_has_no_header_and_the_default_is_100_lines(aws, capsys):
    deploy(aws)
    run_id, job_id = start(aws)
    upload(aws, driver(aws, job_id, "stdout"), numbered("line", 150))
    assert run_logs(aws, "--stream", "stdout") == 0  # the active run: EMR knows its job
    out, _ = capsys.readouterr()
    assert out.splitlines() == [f"line {i}" for i in range(51, 151)]


def test_ec2_prints_the_application_master_not_the_step_or_an_executor(aws, capsys):
    # Given a cluster whose step log, executor container and two application master attempts were uploaded
    deploy(aws, engine="ec2")
    run_id, cluster = start(aws)
    base = f"logs/emr-ec2/{cluster}"
    app = f"{base}/containers/application_1700000000000_0001"
    upload(aws, f"{base}/steps/s-1ABCDEFGH/stderr.gz", "INFO Client: Application report for application_1700\n")
    upload(aws, f"{app}/container_1700000000000_0001_01_000002/stderr.gz", "executor line\n")
    upload(aws, f"{app}/container_1700000000000_0001_01_000001/stderr.gz", "first attempt's driver\n")
    upload(aws, f"{app}/container_e02_1700000000000_0001_02_000001/stderr.gz", "driver, second attempt\n")
    upload(aws, f"{app}/container_e02_1700000000000_0001_02_000001/stdout.gz", "images_ok=12\n")
    # When the operator asks for the run's logs
    code = run_logs(aws)
    # Then the driver's output is the last attempt's application master container's
    out, err = capsys.readouterr()
    assert code == 0
    assert "driver, second attempt\n" in out and "images_ok=12\n" in out
    for other in ("Application report", "executor line", "first attempt"):
        assert other not in out
    assert f"EMR cluster {cluster}" in err and "container_e02_1700000000000_0001_02_000001/" in err


def test_run_names_an_older_run(aws, capsys):
    deploy(aws)
    older, older_job = start(aws)
    settle(aws, older, older_job)
    newer, newer_job = start(aws)
    settle(aws, newer, newer_job)
    upload(aws, driver(aws, older_job, "stdout"), "older run\n")
    upload(aws, driver(aws, newer_job, "stdout"), "newer run\n")
    assert run_logs(aws, "--run", older) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "older run"
    assert run_logs(aws) == 0  # without --run: the last settled run
    assert capsys.readouterr().out.splitlines()[-1] == "newer run"


def test_nothing_uploaded_yet_says_where_it_looked_and_why(aws, capsys):
    deploy(aws)
    run_id, job_id = start(aws)
    where = f"s3://{BUCKET}/logs/emr-serverless/applications/{aws.app_id}/jobs/{job_id}/"
    # While the job runs: not an error
    assert run_logs(aws) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert f"no driver logs yet for {run_id}" in err and where in err and "uploads" in err and "--follow" in err
    # Once it has ended with none: an error
    settle(aws, run_id, job_id)
    assert run_logs(aws) == 1
    err = capsys.readouterr().err
    assert f"no driver logs for {run_id}" in err and where in err and "30 days" in err


def test_follow_prints_each_new_line_once_and_stops_when_the_run_ends(aws, capsys):
    # Given a running job whose driver has written 3 lines and half of a 4th
    deploy(aws)
    run_id, job_id = start(aws)
    upload(aws, driver(aws, job_id, "stdout"), "a 1\na 2\na 3\na 4 is be")
    uploads = iter([
        lambda: upload(aws, driver(aws, job_id, "stdout"), "a 1\na 2\na 3\na 4 is being written\na 5\n"),
        lambda: (upload(aws, driver(aws, job_id, "stdout"), "a 1\na 2\na 3\na 4 is being written\na 5\ndone"),
                 set_job_state(aws, job_id, "SUCCESS")),
    ])  # fmt: skip
    slept = []

    def sleep(seconds):  # between polls, EMR uploads a longer copy; at the second, the job has ended
        slept.append(seconds)
        next(uploads)()

    # When the operator follows the run
    code = run_logs(aws, "--follow", "--stream", "stdout", sleep=sleep)
    # Then every line is printed once, the unfinished one once it is whole, and the command ends with the run
    assert code == 0
    assert capsys.readouterr().out == "a 1\na 2\na 3\na 4 is being written\na 5\ndone\n"
    assert slept == [logs.POLL_S, logs.POLL_S]


def test_follow_waits_for_the_first_upload_and_ctrl_c_exits_130(aws, capsys):
    deploy(aws)
    run_id, _ = start(aws)

    def interrupt(seconds):
        raise KeyboardInterrupt

    assert run_logs(aws, "--follow", sleep=interrupt) == 130
    out, err = capsys.readouterr()
    assert out == "" and "waiting" in err and "Traceback" not in err


def test_no_run_yet(aws, capsys):
    deploy(aws)
    assert run_logs(aws) == 1
    assert "no run yet" in capsys.readouterr().err


def test_a_starting_run_has_no_job_yet(aws, capsys):
    deploy(aws)
    run_id, _ = start(aws, job=False)
    assert run_logs(aws) == 0
    assert f"{run_id} is starting: EMR has no job for it yet" in capsys.readouterr().err


def test_an_unknown_run_says_what_was_searched(aws, capsys):
    deploy(aws, engine="ec2")
    missing = new_run_id()
    assert run_logs(aws, "--run", missing) == 1
    assert f"no EMR cluster named image-features-dev-{missing} created since" in capsys.readouterr().err


def test_unknown_stack_is_one_line_naming_stack_and_region(aws, capsys):
    assert run_logs(aws, stack_error=f"Stack with id {STACK} does not exist") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no stack {STACK} in {REGION}" in err


@pytest.mark.parametrize("denied", ["list_objects_v2", "get_object"])
def test_a_refused_s3_read_names_the_iam_action(aws, capsys, denied):
    deploy(aws)
    _, job_id = start(aws)
    s3 = SESSION.client("s3")
    stub = Stubber(s3)
    if denied == "get_object":
        stub.add_response("list_objects_v2", {"Contents": [{"Key": driver(aws, job_id, "stdout"), "ETag": '"1"',
                          "Size": 20, "LastModified": datetime.now(timezone.utc)}], "IsTruncated": False})  # fmt: skip
    stub.add_client_error(denied, service_error_code="AccessDenied", service_message="Access Denied",
                          http_status_code=403)  # fmt: skip
    stub.activate()
    assert run_logs(aws, s3=s3) == 1
    action = {"list_objects_v2": "s3:ListBucket", "get_object": "s3:GetObject"}[denied]
    assert f"{action} denied" in capsys.readouterr().err.splitlines()[-1]


def test_the_console_script_dispatches_to_logs(monkeypatch):
    monkeypatch.setattr(logs, "command", lambda args: 7 if args.follow and args.lines == 5 else 0)
    assert main(["logs", "--follow", "-n", "5"]) == 7


@pytest.mark.parametrize("argv", [["--run", "20240101"], ["--lines", "-1"], ["--stream", "syslog"]])
def test_bad_usage_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(["logs", *argv])
    assert exit_.value.code == 2


def test_help_says_where_the_logs_come_from(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["logs", "--help"])
    out = capsys.readouterr().out
    assert "SPARK_DRIVER" in out and "containers/application_" in out and "every few minutes" in out
