"""image-features logs: the Spark driver's output of a pipeline run, as EMR stored it in the stack's own bucket.

Which run: the active run once EMR has its job, else the last settled run (the state item says which), or
--run ID. Where EMR keeps the driver's output (the stack sets both log URIs, lambdas/pipeline/launchers.py):
  EMR Serverless  s3://<bucket>/logs/emr-serverless/applications/<application>/jobs/<job run>/SPARK_DRIVER/
                  stdout.gz and stderr.gz (EMR Serverless User Guide, "Getting started from the AWS CLI")
  EMR on EC2      s3://<bucket>/logs/emr-ec2/<cluster>/containers/application_<id>/container_<id>_<attempt>_000001/
                  stdout.gz and stderr.gz: in YARN cluster mode the driver runs in the application master, the
                  first container of the attempt; the step's own log (<cluster>/steps/) holds only the
                  spark-submit client (EMR Management Guide, "View log files archived to Amazon S3")
It prints the last --lines lines of each; --follow keeps printing while EMR runs the job."""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Optional

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pipeline.launchers import ACTIVE_JOB_RUN_STATES, FIND_WINDOW_S, run_time
from pipeline.state import PipelineState

from ops import stack as stacks
from ops.preflight import CallFailed, UsageError, call

RUN_ID = re.compile(r"run-\d{8}T\d{6}Z-[0-9a-f]{8}")  # pipeline/control.py new_run_id
POLL_S = 30  # EMR uploads every few minutes: polling faster only lists the same objects again
SERVERLESS_LOGS = "logs/emr-serverless/"  # the launchers' logUri and LogUri under the stack's bucket
EC2_LOGS = "logs/emr-ec2/"
# <logUri>/applications/<app>/jobs/<job run>/SPARK_DRIVER/std{out,err}.gz: EMR Serverless User Guide, Getting
# started from the AWS CLI (https://docs.aws.amazon.com/emr/latest/EMR-Serverless-UserGuide/gs-cli.html); the
# same keys as aws-samples/emr-serverless-samples examples/python-api/emr_serverless.py fetch_driver_log.
DRIVER_FILE = re.compile(r"(?:^|/)SPARK_DRIVER/(stdout|stderr)\.gz$")
# <LogUri>/<cluster>/containers/: "Application container logs. The logs for each YARN application are stored in
# these locations" (https://docs.aws.amazon.com/emr/latest/ManagementGuide/emr-manage-view-web-log-files.html). In
# cluster mode the driver runs in the application master (https://spark.apache.org/docs/3.5.0/running-on-yarn.html),
# YARN's container 000001 of the attempt: container_[e<epoch>_]<cluster timestamp>_<application>_<attempt>_<container>.
MASTER_FILE = re.compile(r"application_(\d+)_(\d+)/container_(?:e\d+_)?\d+_\d+_(\d+)_000001/(stdout|stderr)\.gz$")
S3_ACTIONS = {"list_objects_v2": "s3:ListBucket", "get_object": "s3:GetObject"}  # IAM's names, not the API's
CLIENT_CONFIG = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"})
STREAMS = {"both": ("stderr", "stdout"), "stderr": ("stderr",), "stdout": ("stdout",)}  # the summary comes last
# Why nothing may be there yet. EMR on EC2: "Amazon EMR archives the log files to Amazon S3 at 5 minute intervals"
# (https://docs.aws.amazon.com/emr/latest/ManagementGuide/emr-plan-debugging.html).
WHY = {
    "serverless": "EMR Serverless uploads the driver's stdout and stderr there while the job runs and at its end, "
    "so they lag by a few minutes",
    "ec2": "EMR uploads the YARN containers' logs there every 5 minutes and when the cluster ends, and the driver's "
    "container exists only once the step's spark-submit has started it",
}

HELP = f"""\
where the output comes from:
  EMR Serverless  s3://<bucket>/{SERVERLESS_LOGS}applications/<application>/jobs/<job run>/SPARK_DRIVER/
                  std{{out,err}}.gz
  EMR on EC2      s3://<bucket>/{EC2_LOGS}<cluster>/containers/application_*/container_*_000001/std{{out,err}}.gz
                  (the application master, where the driver runs in cluster mode; not the step's own log)
EMR uploads these every few minutes while the job runs and at its end: a young run may have none yet, and a
long one shows what the last upload held. They are EMR's copies in your bucket, printed as stored; they expire
after the stack's LogsRetentionDays. The driver's log4j output is on stderr, the job's own summary on stdout.
Reads: cloudformation:DescribeStacks, dynamodb:GetItem, s3:ListBucket, s3:GetObject (and kms:Decrypt with
EncryptionMode=kms), emr-serverless:ListJobRuns and GetJobRun, or elasticmapreduce:ListClusters and
DescribeCluster.
Exit status: 0 printed (or nothing yet for a run still going), 1 no run, no logs for an ended run, or a failed
AWS call, 2 bad usage, 130 interrupted."""


class Unreadable(Exception):
    """A log object that is not the gzip file EMR writes (one line for the operator)."""


@dataclass(frozen=True)
class Job:
    """One pipeline run on EMR: a job run of the stack's application, or the run's own cluster (EC2)."""

    run_id: str
    engine: str
    id: str  # job run id, or cluster id
    state: str = ""

    @property
    def active(self) -> bool:
        if self.engine == "serverless":
            return self.state in ACTIVE_JOB_RUN_STATES
        # A cluster uploads its containers' logs until it has terminated, after its step has ended.
        return not self.state.startswith("TERMINATED") and self.state != "NOT_FOUND"

    def describe(self) -> str:
        what = "EMR Serverless job run" if self.engine == "serverless" else "EMR cluster"
        return f"{what} {self.id}, {self.state or 'state unknown'}"


@dataclass
class Context:
    """What one invocation works with: the stack, its AWS clients, and what to print."""

    stack: stacks.Stack
    clients: Callable  # service name -> boto3 client
    streams: tuple
    lines: int

    @property
    def bucket(self) -> str:
        return self.stack.output("BucketName")

    def client(self, service: str):
        return self.clients(service)


# ---- the command -----------------------------------------------------------------------------------------------


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "logs",
        help="print the Spark driver's output of the last run (or --run ID), from the logs EMR keeps in S3",
        description="Print the last lines of the Spark driver's stdout and stderr of a pipeline run, as EMR "
        "stored them in the stack's bucket: the active run once EMR has its job, else the last settled run.",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stacks.add_arguments(parser)
    parser.add_argument(
        "--run",
        dest="run_id",
        metavar="RUN_ID",
        type=run_id_arg,
        help="a pipeline run id (run-YYYYmmddTHHMMSSZ-xxxxxxxx, as image-features status shows it)",
    )
    parser.add_argument(
        "--lines",
        "-n",
        type=line_count,
        default=100,
        metavar="N",
        help="how many of each file's last lines to print (default: %(default)s)",
    )
    parser.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help=f"keep printing new lines (every {POLL_S} s) until the run has ended; Ctrl-C stops",
    )
    parser.add_argument(
        "--stream",
        choices=list(STREAMS),
        default="both",
        help="the driver's stdout (the job's summary), stderr (Spark's log4j), or both (default)",
    )
    parser.set_defaults(run=command)


def run_id_arg(value: str) -> str:
    if not RUN_ID.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a run id: run-YYYYmmddTHHMMSSZ-xxxxxxxx, as "
                                         "image-features status shows it")  # fmt: skip
    return value


def line_count(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of lines (0 or more)")
    return count


def command(args: argparse.Namespace, clients: Optional[Callable] = None, sleep: Callable = time.sleep) -> int:
    """`image-features logs`. clients (service -> boto3 client) and sleep are for tests."""
    try:
        session = None if clients else boto3.Session(profile_name=args.profile)
        name, region = stacks.resolve(args, session.region_name if session else None)
    except (UsageError, BotoCoreError) as exc:  # an unknown environment or profile, no region
        print(f"image-features logs: error: {exc}", file=sys.stderr)
        return 2
    if clients is None:
        clients = functools.cache(lambda service: session.client(service, region_name=region, config=CLIENT_CONFIG))
    try:
        stack = stacks.describe(clients("cloudformation"), name, region)
        ctx = Context(stack, clients, STREAMS[args.stream], args.lines)
        return show(ctx, args.run_id, args.follow, sleep)
    except stacks.StackError as exc:
        print(f"image-features logs: {exc}", file=sys.stderr)
    except CallFailed as exc:
        print(f"image-features logs: {stacks.explain(exc)}", file=sys.stderr)
    except Unreadable as exc:
        print(f"image-features logs: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130  # Ctrl-C ends --follow: no traceback
    except BrokenPipeError:  # `image-features logs | head` had what it wanted
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    return 1


def show(ctx: Context, wanted: Optional[str], follow: bool, sleep: Callable) -> int:
    """Pick the run, find its EMR job, print its driver's logs (and, following, what comes after)."""
    state = read_state(ctx)
    run_id = wanted or pick_run(state)
    if not run_id:
        note("no run yet: the pipeline has not started one (image-features status says what it waits for)")
        return 1
    job = find_job(ctx, run_id, state)
    while job is None and follow and starting(state, run_id):
        sleep(POLL_S)
        state = read_state(ctx)
        job = find_job(ctx, run_id, state)
    if job is None:
        if starting(state, run_id):
            note(f"{run_id} is starting: EMR has no job for it yet; try again in a minute, or add --follow")
            return 0
        note(f"no EMR job for {run_id}: {searched(ctx, run_id)}")
        return 1
    return tail(ctx, job, follow, sleep)


def tail(ctx: Context, job: Job, follow: bool, sleep: Callable) -> int:
    printer = Printer(ctx, headers=len(ctx.streams) > 1)
    told = set()
    while True:
        job = refresh(ctx, job)  # state first: a listing after the end also sees the end's upload
        found = driver_files(ctx, job)
        if found and "found" not in told:
            told.add("found")
            note(f"{job.run_id}: {job.describe()}; driver logs from s3://{ctx.bucket}/{folder(found[0]['Key'])}")
        elif not found and job.active and "missing" not in told:
            told.add("missing")
            note(f"no driver logs yet for {job.run_id} ({job.describe()}) under {where(ctx, job)}: {WHY[job.engine]}; "
                 + ("waiting" if follow else "try again in a few minutes, or add --follow"))  # fmt: skip
        for obj in found:
            printer.update(obj, final=not job.active)
        if not follow or not job.active:
            break
        sleep(POLL_S)
    if not printer.printed and not job.active:
        days = ctx.stack.parameters.get("LogsRetentionDays", "LogsRetentionDays")
        note(f"no driver logs for {job.run_id} ({job.describe()}) under {where(ctx, job)}: EMR puts them there while "
             f"the job runs and at its end, so the last upload is still on its way (try again in a few minutes), the "
             f"job ended before its driver started, or they expired (logs/ keeps them {days} days)")  # fmt: skip
        return 1
    return 0


# ---- which run, which job --------------------------------------------------------------------------------------


def read_state(ctx: Context):
    table = ctx.stack.output("StateTableName")
    try:
        return PipelineState(ctx.client("dynamodb"), table).read()
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise CallFailed("dynamodb:GetItem", error.get("Code", ""), error.get("Message", "")) from exc
    except BotoCoreError as exc:
        raise CallFailed("dynamodb:GetItem", type(exc).__name__, str(exc)) from exc


def pick_run(state) -> str:
    """The active run once EMR has its job, else the last settled run, else the active run that is starting."""
    if state.run and state.run.job_id:
        return state.run.run_id
    if state.last_run and state.last_run.get("run_id"):
        return state.last_run["run_id"]
    return state.run.run_id if state.run else ""


def starting(state, run_id: str) -> bool:
    return bool(state.run and state.run.run_id == run_id and not state.run.job_id)


def find_job(ctx: Context, run_id: str, state) -> Optional[Job]:
    """The run's job: the state item knows the active run's; EMR's lists know every run's by name."""
    engine = ctx.stack.engine
    if state.run and state.run.run_id == run_id and state.run.job_id:
        return Job(run_id, engine, state.run.job_id)
    since = datetime.fromtimestamp(run_time(run_id) - FIND_WINDOW_S, tz=timezone.utc)
    if engine == "serverless":
        runs = [j for j in job_runs(ctx, createdAtAfter=since) if j.get("name") == run_id]  # the launcher's name
        newest = max(runs, key=lambda j: j["createdAt"], default=None)
        return Job(run_id, engine, newest["id"], newest["state"]) if newest else None
    name = cluster_name(ctx, run_id)
    found = [c for c in clusters(ctx, CreatedAfter=since) if c["Name"] == name]
    newest = max(found, key=lambda c: c["Status"]["Timeline"]["CreationDateTime"], default=None)
    return Job(run_id, engine, newest["Id"], newest["Status"]["State"]) if newest else None


def searched(ctx: Context, run_id: str) -> str:
    since = datetime.fromtimestamp(run_time(run_id) - FIND_WINDOW_S, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if ctx.stack.engine == "serverless":
        return (f"no job run named {run_id} in EMR Serverless application {ctx.stack.output('EmrApplicationId')} "
                f"created since {since} (EMR lists job runs for 90 days)")  # fmt: skip
    return f"no EMR cluster named {cluster_name(ctx, run_id)} created since {since} (EMR lists clusters for 60 days)"


def cluster_name(ctx: Context, run_id: str) -> str:
    stage = ctx.stack.parameters.get("Stage")
    if not stage:
        raise stacks.StackError(f"stack {ctx.stack.name} in {ctx.stack.region} has no parameter Stage: deploy this "
                                "version of the template (sam build && sam deploy)")  # fmt: skip
    return f"image-features-{stage}-{run_id}"  # template.yaml RUN_NAME_PREFIX, then the run id (launchers)


def job_runs(ctx: Context, **filters) -> list:
    app, token, found = ctx.stack.output("EmrApplicationId"), None, []
    while True:
        try:
            page = call(ctx.client("emr-serverless"), "list_job_runs", applicationId=app, **filters,
                        **({"nextToken": token} if token else {}))  # fmt: skip
        except CallFailed as exc:
            if exc.code == "ResourceNotFoundException":  # moto's answer for an application without runs yet
                return found
            raise
        found += page["jobRuns"]
        token = page.get("nextToken")
        if not token:
            return found


def clusters(ctx: Context, **filters) -> list:
    marker, found = None, []
    while True:
        page = call(ctx.client("emr"), "list_clusters", **filters, **({"Marker": marker} if marker else {}))
        found += page["Clusters"]
        marker = page.get("Marker")
        if not marker:
            return found


def refresh(ctx: Context, job: Job) -> Job:
    """The job with EMR's state of it now."""
    try:
        if job.engine == "serverless":
            app = ctx.stack.output("EmrApplicationId")
            state = call(ctx.client("emr-serverless"), "get_job_run", applicationId=app, jobRunId=job.id)["jobRun"][
                "state"
            ]
        else:
            state = call(ctx.client("emr"), "describe_cluster", ClusterId=job.id)["Cluster"]["Status"]["State"]
    except CallFailed as exc:
        if exc.code not in ("ResourceNotFoundException", "InvalidRequestException"):
            raise
        state = "NOT_FOUND"  # gone from EMR's records: its logs may still be in the bucket
    return Job(job.run_id, job.engine, job.id, state)


# ---- where the driver's logs are -------------------------------------------------------------------------------


def prefix(ctx: Context, job: Job) -> str:
    if job.engine == "serverless":
        return f"{SERVERLESS_LOGS}applications/{ctx.stack.output('EmrApplicationId')}/jobs/{job.id}/"
    return f"{EC2_LOGS}{job.id}/containers/"


def where(ctx: Context, job: Job) -> str:
    return f"s3://{ctx.bucket}/{prefix(ctx, job)}"


def folder(key: str) -> str:
    return key.rsplit("/", 1)[0] + "/"


def driver_files(ctx: Context, job: Job) -> list:
    """The driver's log objects of the chosen streams (ListObjectsV2 entries), in the order to print them."""
    listed = list_objects(ctx, prefix(ctx, job))
    chosen = {}
    if job.engine == "serverless":
        for obj in listed:  # a SPARK_DRIVER folder per attempt, should EMR retry the job: the newest one
            match = DRIVER_FILE.search(obj["Key"])
            if match and (match[1] not in chosen or obj["LastModified"] > chosen[match[1]]["LastModified"]):
                chosen[match[1]] = obj
    else:
        # The newest application of the cluster, its last attempt's application master (a failed master is retried
        # in a new attempt, whose output is the driver's latest).
        masters = [(m, obj) for obj in listed for m in [MASTER_FILE.search(obj["Key"])] if m]
        if masters:
            last = max((int(m[1]), int(m[2]), int(m[3])) for m, _ in masters)
            chosen = {m[4]: obj for m, obj in masters if (int(m[1]), int(m[2]), int(m[3])) == last}
    return [chosen[stream] for stream in ctx.streams if stream in chosen]


def list_objects(ctx: Context, under: str) -> list:
    s3, token, found = ctx.client("s3"), None, []
    while True:
        page = s3_call(s3, "list_objects_v2", Bucket=ctx.bucket, Prefix=under,
                       **({"ContinuationToken": token} if token else {}))  # fmt: skip
        found += page.get("Contents", [])
        token = page.get("NextContinuationToken")
        if not token:
            return found


def s3_call(s3, method: str, **kwargs) -> dict:
    try:
        return call(s3, method, **kwargs)
    except CallFailed as exc:
        raise CallFailed(S3_ACTIONS[method], exc.code, exc.detail) from exc


def read_lines(ctx: Context, key: str, skip: int, keep: Optional[int]) -> tuple:
    """(lines in the object, the last `keep` of those after the first `skip`), streamed: a driver's log can be
    large, and only a deque of lines is held. Lines keep their newline; the last may lack it (more is coming)."""
    body = s3_call(ctx.client("s3"), "get_object", Bucket=ctx.bucket, Key=key)["Body"]
    kept, count = deque(maxlen=keep), 0
    try:
        with gzip.open(body, "rt", encoding="utf-8", errors="replace", newline="\n") as text:
            for count, line in enumerate(text, 1):
                if count > skip:
                    kept.append(line)
    except BotoCoreError as exc:  # the connection broke while streaming the object
        raise CallFailed("s3:GetObject", type(exc).__name__, str(exc)) from exc
    except (OSError, EOFError) as exc:
        raise Unreadable(f"s3://{ctx.bucket}/{key} is not a whole gzip file ({exc})") from exc
    finally:
        body.close()
    return count, list(kept)


class Printer:
    """What has been printed of each log object: EMR replaces an object with a longer copy at each upload, so
    --follow prints the lines past those it printed of the object's previous copy."""

    def __init__(self, ctx: Context, headers: bool):
        self.ctx, self.headers = ctx, headers
        self.printed: dict = {}  # key -> complete lines printed
        self.etags: dict = {}
        self.last_key = ""

    def update(self, obj: dict, final: bool) -> None:
        key, etag = obj["Key"], obj.get("ETag", "")
        if key in self.etags and self.etags[key] == etag:
            return
        done = self.printed.get(key)
        count, lines = read_lines(self.ctx, key, done or 0, self.ctx.lines if done is None else None)
        if done is not None and count < done:  # a shorter copy: EMR started the file afresh (log rotation)
            count, lines = read_lines(self.ctx, key, 0, self.ctx.lines)
        unfinished = bool(lines) and not lines[-1].endswith("\n") and not final
        if unfinished:  # printed whole from a later upload, or as it is once the run has ended
            count, lines = count - 1, lines[:-1]
        self.write(key, lines)
        self.printed[key], self.etags[key] = count, "" if unfinished else etag

    def write(self, key: str, lines: list) -> None:
        if not lines:
            return
        out = sys.stdout
        if self.headers and key != self.last_key:
            gap = "\n" if self.last_key else ""  # as tail(1) separates its files
            out.write(f"{gap}==> s3://{self.ctx.bucket}/{key} <==\n")
        out.writelines(line if line.endswith("\n") else line + "\n" for line in lines)
        out.flush()
        self.last_key = key


def note(message: str) -> None:
    """The command's own words go to stderr: stdout holds only what EMR stored."""
    print(f"image-features logs: {message}", file=sys.stderr, flush=True)
