"""image-features status: the screen in each state the pipeline can be in, for both engines, and what it says when it
cannot read the stack. The state item is written through its DAL (pipeline.state), as the functions write it; S3,
SQS, DynamoDB and CloudFormation are moto's; botocore's Stubber answers what moto lacks (GetDashboardForJobRun,
GetOnClusterAppUIPresignedURL, CloudWatch's queue ages) and the EMR job's own state."""

import itertools
import json
import types
from datetime import datetime, timezone

import boto3
import pytest
from botocore.stub import ANY, Stubber
from moto import mock_aws
from pipeline import costs
from pipeline.state import PipelineState

from ops import status
from ops.cli import main, parser
from ops.stack import Stack

REGION = "eu-west-3"
NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
APP = "00fabc123example"
JOB = "00fjobrun0example"
CLUSTER = "j-2AXXXXXXGAPLF"
KEY = "images/Kiwi/Jane Doe passport.jpg"  # an image's key: never on the screen, never in --json
SECRET = ("Jane", "Doe", "passport")
NAMES = itertools.count()


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%H:%M:%S UTC")


@pytest.fixture(scope="module")
def aws():
    with mock_aws():
        yield {s: boto3.client(s, region_name=REGION) for s in ("dynamodb", "s3", "sqs", "cloudformation")}


class World:
    """One deployed stack in moto, and a clock: the pipeline's history is written through the state item's DAL."""

    def __init__(self, aws, engine="serverless", **parameters):
        n = next(NAMES)
        self.aws, self.clock = aws, [NOW - 3600]
        self.table, self.bucket = f"state-{n}", f"data-{n}"
        aws["dynamodb"].create_table(TableName=self.table, KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
                                     AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                                     BillingMode="PAY_PER_REQUEST")  # fmt: skip
        aws["s3"].create_bucket(Bucket=self.bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
        urls = {o: aws["sqs"].create_queue(QueueName=f"{o}-{n}")["QueueUrl"]
                for o in ("UploadQueueUrl", "DeadLetterQueueUrl", "JobStateDeadLetterQueueUrl")}  # fmt: skip
        self.outputs = {"Application": "image-features", "BucketName": self.bucket, "StateTableName": self.table,
                        "ResultsUri": f"s3://{self.bucket}/results/", "ArtifactsVersion": "9f3c2a1b-21715c25",
                        "WeightsUri": f"s3://{self.bucket}/artifacts/model/21715c25/mobilenet_v2.weights.h5",
                        "EmrRuntimeRoleArn": "arn:aws:iam::123456789012:role/runtime", **urls}  # fmt: skip
        if engine == "serverless":
            self.outputs["EmrApplicationId"] = APP
        self.parameters = {"Engine": engine, "Architecture": "ARM64", "ModelWeights": "imagenet", "Stage": "dev",
                           "QuietSeconds": "60", "MaxWaitSeconds": "900", "MaxAttempts": "3",
                           "RetryBaseSeconds": "300", "ReconcileMinutes": "5", "EmrReleaseLabel": "emr-7.10.0",
                           **parameters}  # fmt: skip
        self.stack = Stack(f"image-features-{n}", REGION, self.outputs, self.parameters, "UPDATE_COMPLETE")
        self.state = PipelineState(aws["dynamodb"], self.table, clock=lambda: self.clock[0])
        self.stubs, self.aged = {}, False

    # --- the pipeline's history -------------------------------------------------------------------------
    def at(self, when: float) -> "World":
        self.clock[0] = when
        return self

    def change(self, when: float) -> None:
        self.at(when).state.mark_dirty(when)

    def start(self, when: float, job: str = JOB):
        run = self.at(when).state.claim(self.state.read(), f"run-{int(when)}-abcd1234")
        self.state.record_job(run, job)
        return run

    def end(self, when: float, ok: bool, detail: str = "", max_attempts: int = 3, cleanup_at=None, usage=None):
        seen = self.at(when).state.read()
        outcome = {"run_id": seen.run.run_id, "state": "SUCCESS" if ok else "FAILED", "attempt": seen.run.attempt,
                   "detail": detail}  # fmt: skip
        self.state.settle(seen, ok, outcome, None, 300, max_attempts, {"artifacts": "v1"}, cleanup_at)
        if usage:
            self.state.record_usage(seen.run.run_id, costs.as_strings(usage))
        return seen.run

    def put(self, key: str, body: dict) -> None:
        self.aws["s3"].put_object(Bucket=self.bucket, Key=key, Body=json.dumps(body).encode())

    def report(self, launch_id: str, **extra) -> dict:
        report = {"run_id": "20270115T075500Z-1a2b3c4d", "launch_id": launch_id, "images_total": 64,
                  "images_ok": 60, "images_failed": 4, "images_featurized": 12, "images_removed": 2, "k": 12,
                  "timings_s": {"total": 133.2}, "finished_at": "2027-01-15T07:57:13+00:00",
                  "failures_by_reason": {"undecodable": 3, "empty file (0 bytes)": 1},
                  "html": "runs/20270115T075500Z-1a2b3c4d/report.html", "input": f"s3://{self.bucket}/images/",
                  "resources": {"vcpu_seconds": 720.0, "gb_seconds": 2880.0, "estimated_usd": 0.0123},
                  **extra}  # fmt: skip
        self.put("results/report.json", report)
        return report

    # --- what the command reads ---------------------------------------------------------------------------
    def stub(self, service: str) -> Stubber:
        if service not in self.stubs:
            self.stubs[service] = Stubber(boto3.client(service, region_name=REGION))
        return self.stubs[service]

    def ages(self, **by_output) -> None:
        """CloudWatch's answer: the oldest message's age per queue (seconds), none for the others."""
        names = [self.outputs[o].rsplit("/", 1)[-1] for o in ("UploadQueueUrl", "DeadLetterQueueUrl",
                                                               "JobStateDeadLetterQueueUrl")]  # fmt: skip
        queries = [{"Id": f"q{i}", "MetricStat": {"Metric": {"Namespace": "AWS/SQS",
                                                             "MetricName": "ApproximateAgeOfOldestMessage",
                                                             "Dimensions": [{"Name": "QueueName", "Value": name}]},
                                                  "Period": 60, "Stat": "Maximum"}, "ReturnData": True}
                   for i, name in enumerate(names)]  # fmt: skip
        outputs = ("UploadQueueUrl", "DeadLetterQueueUrl", "JobStateDeadLetterQueueUrl")
        self.aged = True
        results = [{"Id": f"q{i}", "Values": [by_output[o]] if o in by_output else [], "StatusCode": "Complete"}
                   for i, o in enumerate(outputs)]  # fmt: skip
        self.stub("cloudwatch").add_response("get_metric_data", {"MetricDataResults": results},
                                             {"MetricDataQueries": queries, "ScanBy": "TimestampDescending",
                                              "StartTime": ANY, "EndTime": ANY})  # fmt: skip

    def clients(self, service: str):
        if service in self.stubs:
            self.stubs[service].activate()
            return self.stubs[service].client
        return self.aws[service]

    def gather(self, now: float = NOW, url: bool = False) -> dict:
        if not self.aged:
            self.ages()
        data = status.gather(self.stack, self.clients, now, url=url)
        self.aged = False
        for stub in self.stubs.values():
            stub.assert_no_pending_responses()
        return data

    def screen(self, now: float = NOW, **kwargs) -> tuple:
        data = self.gather(now, **kwargs)
        assert data["errors"] == []
        return data, status.render(data)


def job_run(state="RUNNING"):
    created = datetime.fromtimestamp(NOW - 300, tz=timezone.utc)
    arn = f"arn:aws:emr-serverless:{REGION}:123456789012:/applications/{APP}/jobruns/{JOB}"
    return {"jobRun": {"applicationId": APP, "jobRunId": JOB, "arn": arn,
                       "createdBy": "arn:aws:iam::123456789012:role/job-state", "createdAt": created,
                       "updatedAt": created, "executionRole": "arn:aws:iam::123456789012:role/runtime",
                       "state": state, "stateDetails": f"reading s3://bucket/{KEY}", "releaseLabel": "emr-7.10.0",
                       "jobDriver": {"sparkSubmit": {"entryPoint": "s3://x/main.py"}}}}  # fmt: skip


# ---- the pipeline, state by state ----------------------------------------------------------------------------


def test_idle_shows_the_last_run_its_images_cost_failures_and_where_its_report_is(aws):
    w = World(aws)
    w.change(NOW - 900)
    w.start(NOW - 840)
    run = w.end(NOW - 600, ok=True, usage={"vcpu_hours": 0.21, "memory_gb_hours": 0.84, "billed_vcpu_hours": 0.25,
                                           "billed_memory_gb_hours": 1.0, "estimated_usd": 0.0234})  # fmt: skip
    w.report(run.run_id)

    data, screen = w.screen()

    assert data["pipeline"]["state"] == "idle" and "pipeline   IDLE  results are current" in screen
    assert data["run"] is None
    assert f"last run   {run.run_id}  SUCCESS, ended {iso(NOW - 600)} (10 min ago), attempt 1" in screen
    assert "images   64 total: 60 ok, 4 failed; this run featurized 12, removed 2" in screen
    assert "k = 12" in screen and "duration 2 min 13 s" in screen
    assert "cost     0.25 vCPU-hours, 1 GB-hours, about $0.0234 (EMR, billed)" in screen
    assert "failures 3 x undecodable, 1 x empty file (0 bytes)" in screen
    assert f"report   s3://{w.bucket}/results/runs/20270115T075500Z-1a2b3c4d/report.html" in screen
    assert "artifacts 9f3c2a1b-21715c25, engine serverless ARM64" in screen
    assert "weights imagenet (21715c25/mobilenet_v2.weights.h5)" in screen


def test_url_adds_a_link_to_report_html_valid_for_an_hour(aws):
    w = World(aws)
    w.change(NOW - 900)
    w.start(NOW - 840)
    w.report(w.end(NOW - 600, ok=True).run_id)

    data, screen = w.screen(url=True)

    link = data["last_run"]["results"]["report_url"]
    assert link.startswith(f"https://{w.bucket}.s3.") or f"/{w.bucket}/" in link
    assert "results/runs/20270115T075500Z-1a2b3c4d/report.html" in link and "X-Amz-Expires=3600" in link
    assert link in screen


def test_waiting_for_uploads_to_pause_says_since_when_and_when_the_run_starts(aws):
    w = World(aws)
    w.change(NOW - 100)
    w.change(NOW - 20)

    data, screen = w.screen()

    p = data["pipeline"]
    assert (p["state"], p["starts_by"], p["changes_waiting"]) == ("waiting", "quiet", 2)
    assert p["starts_at"] == "2027-01-15T08:00:40Z" and p["waiting_since"] == "2027-01-15T07:58:20Z"
    assert f"WAITING  for uploads to pause: 2 change(s) since {iso(NOW - 100)} (1 min 40 s ago)" in screen
    assert f"starts at {iso(NOW + 40)} (in 40 s), once uploads pause for 60 s (QuietSeconds)" in screen
    assert f"or at {iso(NOW + 800)} (in 13 min) at the latest (MaxWaitSeconds)" in screen


def test_waiting_past_the_longest_wait_starts_at_max_wait_seconds_whatever_the_uploads(aws):
    w = World(aws)
    w.change(NOW - 880)
    w.change(NOW - 5)  # uploads never pause

    data, screen = w.screen()

    assert (data["pipeline"]["starts_by"], data["pipeline"]["starts_at"]) == ("max-wait", "2027-01-15T08:00:20Z")
    assert (
        f"starts at {iso(NOW + 20)} (in 20 s): the longest wait, 900 s (MaxWaitSeconds), whatever the uploads" in screen
    )


def test_running_shows_the_job_its_progress_spark_ui_console_and_the_changes_behind_it(aws):
    w = World(aws)
    w.change(NOW - 400)
    run = w.start(NOW - 300)
    w.change(NOW - 30)  # during the run: the next one follows
    w.put(f"results/progress/{run.run_id}.json", {
        "run_id": run.run_id, "job_run_id": "20270115T075500Z-1a2b3c4d", "stage": "featurize", "images_done": 120,
        "images_total": 500, "rate": 12.5, "eta_s": 30.4, "started_at": "2027-01-15T07:55:10Z",
        "updated_at": "2027-01-15T07:59:52Z"})  # fmt: skip
    ids = {"applicationId": APP, "jobRunId": JOB}
    w.stub("emr-serverless").add_response("get_job_run", job_run(), ids)
    w.stub("emr-serverless").add_response("get_dashboard_for_job_run", {"url": "https://spark-ui.example/x"}, ids)
    w.ages(UploadQueueUrl=42)

    data, screen = w.screen()

    r = data["run"]
    assert (r["run_id"], r["job_id"], r["emr_state"], r["elapsed_s"]) == (run.run_id, JOB, "RUNNING", 300)
    assert f"RUNNING  {run.run_id} (attempt 1 of 3)" in screen
    assert "1 change(s) since this run was claimed: the next run follows it" in screen
    assert f"job      EMR Serverless job run {JOB}, RUNNING" in screen
    assert f"started  {iso(NOW - 300)} (5 min ago), elapsed 5 min" in screen
    assert "progress featurize: 120 of 500 images (24%), 12.5 images/s, ETA 30 s (updated 8 s ago)" in screen
    assert "spark ui https://spark-ui.example/x" in screen
    assert (f"console  https://{REGION}.console.aws.amazon.com/emr/home?region={REGION}#/serverless/applications/"
            f"{APP}/job-runs/{JOB}") in screen  # fmt: skip
    assert "uploads:               0 waiting, 0 in flight, oldest 42 s" in screen
    assert data["queues"][0]["oldest_age_s"] == 42 and data["queues"][1]["oldest_age_s"] is None


def test_a_run_that_has_not_reported_yet_says_so_and_a_published_one_is_superseded_by_its_report(aws):
    w = World(aws)
    w.change(NOW - 400)
    run = w.start(NOW - 300)
    w.stub("emr-serverless").add_response("get_job_run", job_run())
    w.stub("emr-serverless").add_client_error("get_dashboard_for_job_run", "AccessDeniedException")

    data, screen = w.screen()
    assert "progress not reported yet" in screen
    assert "spark ui no link: emr-serverless:GetDashboardForJobRun denied" in screen

    w.report(run.run_id)
    w.stub("emr-serverless").add_response("get_job_run", job_run("SUCCESS"))
    w.stub("emr-serverless").add_response("get_dashboard_for_job_run", {"url": "https://history.example/x"})
    data, screen = w.screen()
    assert "published: the run's results are current; EMR is finishing the job" in screen


def test_retrying_says_when_after_how_many_failures_and_the_last_failure(aws):
    w = World(aws)
    w.change(NOW - 900)
    w.start(NOW - 800)
    w.end(NOW - 120, ok=False, detail="Job failed, please check complete logs in configured logging destination. "
                                      "ExitCode: 1.")  # fmt: skip

    data, screen = w.screen()

    assert (data["pipeline"]["state"], data["pipeline"]["retry_at"]) == ("retrying", "2027-01-15T08:03:00Z")
    assert f"RETRYING  at {iso(NOW + 180)} (in 3 min) after 1 failure" in screen
    assert "attempt 2 of 3: the reconcile pass (every 5 min) starts it" in screen
    assert "FAILED" in screen and "ExitCode: 1." in screen
    assert "results" in screen and "none published yet" in screen


def test_gave_up_says_why_what_restarts_it_and_that_an_erasure_cleanup_is_pending(aws):
    w = World(aws)
    w.change(NOW - 7200)
    w.start(NOW - 7100)
    w.end(NOW - 7000, ok=True, cleanup_at=NOW - 3600)
    w.at(NOW - 3590).state.mark_cleanup(NOW - 3600)  # the reconciler, as the cleanup came due
    w.start(NOW - 3580)
    w.end(NOW - 3000, ok=False, detail=f"Job run timed out. {KEY}", max_attempts=1)

    data, screen = w.screen()

    p = data["pipeline"]
    assert p["state"] == "gave-up" and p["gave_up"]["restarts"] == status.GAVE_UP and p["cleanup"]["pending"]
    assert "GAVE-UP  after 1 failed attempt: Job run timed out. <withheld>" in screen
    assert p["notes"][:2] == [status.GAVE_UP, "to retry now, upload (or re-upload) any image"]
    assert "no more automatic runs until a new upload, a new deployment, or images changed" in screen
    assert "an erasure cleanup is pending: files of superseded snapshots may still hold erased images" in screen


def test_cleanup_due_later_and_due_now(aws):
    w = World(aws)
    w.change(NOW - 900)
    w.start(NOW - 840)
    w.end(NOW - 600, ok=True, cleanup_at=NOW + 1200)

    data, screen = w.screen()
    assert data["pipeline"]["cleanup"]["due_at"] == "2027-01-15T08:20:00Z"
    assert f"cleanup due at {iso(NOW + 1200)} (in 20 min): a run starts then" in screen

    data, screen = w.screen(now=NOW + 1260)
    assert f"cleanup due since {iso(NOW + 1200)} (1 min ago): the reconcile pass (every 5 min) starts its run" in screen


def test_a_claim_without_a_job_is_starting_and_an_unclaimed_due_run_is_due(aws):
    w = World(aws)
    w.change(NOW - 120)
    data, screen = w.screen()
    assert data["pipeline"]["state"] == "due" and "DUE  a run starts now" in screen

    w.at(NOW - 10).state.claim(w.state.read(), "run-x-starting")
    data, screen = w.screen()
    assert data["pipeline"]["state"] == "starting" and "EMR has not confirmed its job yet" in screen
    assert "job      EMR Serverless job run (not started yet)" in screen


def test_ec2_shows_the_cluster_its_spark_ui_and_console_page(aws):
    w = World(aws, engine="ec2", Architecture="X86_64")
    w.change(NOW - 400)
    w.start(NOW - 300, job=CLUSTER)
    created = datetime.fromtimestamp(NOW - 290, tz=timezone.utc)
    emr = w.stub("emr")
    emr.add_response("describe_cluster", {"Cluster": {"Id": CLUSTER, "Name": "image-features-dev-run",
                                                      "Status": {"State": "RUNNING",
                                                                 "Timeline": {"CreationDateTime": created}},
                                                      "MasterPublicDnsName": "ip-10-0-0-1.eu-west-3.compute.internal"}},
                     {"ClusterId": CLUSTER})  # fmt: skip
    emr.add_response("get_on_cluster_app_ui_presigned_url", {"PresignedURLReady": True,
                                                             "PresignedURL": "https://p-x.emrappui.example/shs"},
                     {"ClusterId": CLUSTER, "OnClusterAppUIType": "SparkHistoryServer"})  # fmt: skip

    data, screen = w.screen()

    assert (data["run"]["engine"], data["run"]["emr_state"]) == ("ec2", "RUNNING")
    assert f"job      EMR cluster {CLUSTER}, RUNNING" in screen
    assert "spark ui https://p-x.emrappui.example/shs" in screen
    assert (
        f"console  https://{REGION}.console.aws.amazon.com/emr/home?region={REGION}#/clusterDetails/{CLUSTER}" in screen
    )
    assert f"logs     s3://{w.bucket}/logs/emr-ec2/{CLUSTER}/" in screen
    assert "engine ec2 X86_64" in screen


def test_ec2_cluster_still_starting_points_at_the_console(aws):
    w = World(aws, engine="ec2")
    w.change(NOW - 400)
    w.start(NOW - 60, job=CLUSTER)
    w.stub("emr").add_response("describe_cluster", {"Cluster": {"Id": CLUSTER, "Status": {"State": "STARTING"}}})

    data, screen = w.screen()

    assert f"EMR cluster {CLUSTER}, STARTING" in screen
    assert "spark ui the cluster serves its Spark UI once it runs; the console's page links it" in screen


def test_no_image_key_reaches_the_screen_or_the_json(aws):
    w = World(aws)
    w.change(NOW - 900)
    w.start(NOW - 840)
    run = w.end(NOW - 600, ok=False, detail=f"could not read s3://{w.bucket}/{KEY}; also {KEY}")
    w.report(
        run.run_id,
        failures_by_reason={f"undecodable at {KEY}": 1},
        first_failures=[{"path": KEY}],
        plots=[f"runs/x/{KEY}.png"],
        failures=[{"path": f"s3://{w.bucket}/{KEY}", "reason": "undecodable"}],
    )
    w.change(NOW - 30)
    w.stub("emr-serverless")  # no active run: no EMR call

    data, screen = w.screen()

    shown = screen + json.dumps(data)
    assert not [word for word in SECRET if word in shown]
    assert "could not read <withheld>" in screen and "1 x undecodable at <withheld>" in screen


# ---- the command ----------------------------------------------------------------------------------------------


def record(aws, w: World, application="image-features") -> str:
    """The stack's record in moto's CloudFormation, as the local stack makes it."""
    body = {"Parameters": {k: {"Type": "String", "Default": v} for k, v in w.parameters.items()},
            "Resources": {"Record": {"Type": "AWS::CloudFormation::WaitConditionHandle"}},
            "Outputs": {k: {"Value": v} for k, v in {**w.outputs, "Application": application}.items()}}  # fmt: skip
    with pytest.warns(UserWarning):  # moto: a WaitConditionHandle is not one of its resources
        aws["cloudformation"].create_stack(StackName=w.stack.name, TemplateBody=json.dumps(body))
    return w.stack.name


def command(argv, clients=None):
    args = parser().parse_args(["status", *argv])
    return status.run(args, clients=clients, now=NOW)


def test_json_prints_what_the_screen_shows_for_scripts(aws, capsys):
    w = World(aws)
    w.change(NOW - 900)
    w.start(NOW - 840)
    w.report(w.end(NOW - 600, ok=True).run_id)
    name = record(aws, w)
    w.ages(DeadLetterQueueUrl=3600)

    assert command(["--stack", name, "--region", REGION, "--json"], w.clients) == 0

    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"stack", "pipeline", "run", "queues", "last_run", "deployed", "checked_at", "errors"}
    assert data["stack"] == {"name": name, "region": REGION, "status": "CREATE_COMPLETE"}
    assert data["pipeline"]["state"] == "idle" and data["run"] is None
    assert [q["queue"] for q in data["queues"]] == ["uploads", "uploads dead-letter", "job-state dead-letter"]
    assert data["queues"][1]["oldest_age_s"] == 3600
    assert data["last_run"]["results"]["images"] == {"total": 64, "ok": 60, "failed": 4, "featurized": 12,
                                                     "removed": 2}  # fmt: skip
    assert data["deployed"]["engine"] == "serverless"


def test_the_console_script_shows_the_screen_through_boto3_as_configured(aws, capsys):
    w = World(aws)
    name = record(aws, w)

    assert main(["status", "--stack", name, "--region", REGION]) == 0  # moto's CloudWatch: no datapoints

    out = capsys.readouterr().out
    assert out.startswith(f"stack      {name} ({REGION}, CREATE_COMPLETE)")
    assert "IDLE  no run yet: no image has changed" in out and "last run   none yet" in out


def test_an_unknown_stack_is_one_line_naming_it_and_the_region(aws, capsys):
    assert main(["status", "--stack", "nope", "--region", REGION]) == 1
    err = capsys.readouterr().err
    assert err == f"image-features status: no stack nope in {REGION}: check --stack and --region (or --config-env)\n"


def test_a_stack_of_another_application_says_so(aws, capsys):
    w = World(aws)
    name = record(aws, w, application="something-else")

    assert main(["status", "--stack", name, "--region", REGION]) == 1
    assert "is not an image-features stack" in capsys.readouterr().err


def test_a_missing_permission_names_the_call(aws, capsys):
    cfn = Stubber(boto3.client("cloudformation", region_name=REGION))
    cfn.add_client_error("describe_stacks", "AccessDenied", "not authorized to perform cloudformation:DescribeStacks")
    cfn.activate()
    assert command(["--stack", "x", "--region", REGION], lambda service: cfn.client) == 1
    assert capsys.readouterr().err.strip() == (
        "image-features status: cloudformation:DescribeStacks denied: allow it to this identity, or use a profile that "
        "has it (--profile)")  # fmt: skip

    w = World(aws)
    name = record(aws, w)
    db = Stubber(boto3.client("dynamodb", region_name=REGION))
    db.add_client_error("get_item", "AccessDeniedException", "no")
    db.activate()
    clients = lambda service: db.client if service == "dynamodb" else w.clients(service)  # noqa: E731
    assert command(["--stack", name, "--region", REGION], clients) == 1
    assert capsys.readouterr().err.startswith("image-features status: dynamodb:GetItem denied")


def test_a_section_that_cannot_be_read_is_named_on_the_screen_and_fails_the_exit_status(aws, capsys):
    w = World(aws)
    name = record(aws, w)
    w.stub("cloudwatch").add_client_error("get_metric_data", "AccessDenied", "no")

    assert command(["--stack", name, "--region", REGION], w.clients) == 1

    out = capsys.readouterr().out
    assert "error      cloudwatch:GetMetricData denied" in out
    assert "uploads:               0 waiting, 0 in flight" in out  # the rest is shown all the same


def test_bad_usage_exits_2(capsys):
    assert main(["status", "--config-env", "nope"]) == 2
    assert "samconfig.toml has no environment 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["status", "--stack", "a", "--config-env", "dev"])
    assert exit_.value.code == 2


# ---- when runs start: the same answer as the control loop ---------------------------------------------------


def test_next_start_agrees_with_control_maybe_start():
    """For each state, maybe_start claims a run exactly from the time next_start gives, and not a second before."""
    from pipeline import control
    from pipeline.state import Conflict, Run, State

    class Claimed(Exception):
        pass

    class FakeState:
        def __init__(self, state, now):
            self.state, self.now = state, now

        def read(self):
            return self.state

        def clock(self):
            return self.now

        def claim(self, seen, run_id):
            raise Conflict("claim")  # maybe_start answers "raced": it tried to start a run

    settings = types.SimpleNamespace(quiet_seconds=60, max_wait_seconds=900, alert_topic_arn="")
    run = Run("run-1", 1, NOW - 100, NOW - 200, 1, job_id="j")
    states = [
        State(),  # clean
        State(gen=1, processed_gen=1),
        State(gen=2, processed_gen=1, first_change_at=NOW - 30, last_change_at=NOW - 30),  # quiet soon
        State(gen=2, processed_gen=1, first_change_at=NOW - 890, last_change_at=NOW - 1),  # overdue soon
        State(gen=2, processed_gen=1, first_change_at=NOW - 400, last_change_at=NOW - 100),  # due now
        State(gen=2, processed_gen=1, first_change_at=NOW - 400, last_change_at=None),  # a daily or cleanup mark
        State(gen=2, processed_gen=1, first_change_at=NOW - 400, last_change_at=NOW - 100, failures=1,
              retry_at=NOW + 120),  # backing off
        State(gen=2, processed_gen=1, first_change_at=NOW - 400, last_change_at=NOW - 10, failures=1,
              retry_at=NOW + 20),  # backing off, then settling
        State(gen=3, processed_gen=1, failures=3, given_up_gen=3, first_change_at=NOW - 400, last_change_at=NOW - 300),
        State(gen=3, processed_gen=1, run=run),
    ]  # fmt: skip
    words = {"raced": "start", "settling": "settling", "backoff": "backoff", "clean": "clean", "given-up": "given-up",
             "active": "active"}  # fmt: skip

    def control_says(state, now):
        p = control.Pipeline(settings, FakeState(state, now), launcher=None)
        return words[control.maybe_start(p).reason]

    for state in states:
        ours = status.next_start(state, 60, 900, NOW)
        assert ours.reason == control_says(state, NOW), state
        if ours.reason in ("settling", "backoff"):
            assert control_says(state, ours.at - 0.001) != "start" and control_says(state, ours.at) == "start", state
            assert status.next_start(state, 60, 900, ours.at).reason == "start"
