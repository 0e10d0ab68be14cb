"""image-features status: what the pipeline of one deployed stack does now, on one screen (or --json for scripts).

Read calls only, over the same state item DAL the functions use (pipeline.state) and the stack's outputs and
parameters. `gather` returns plain data (every field of the screen, JSON-ready); `render` makes the screen from it.
Nothing shown names an image: counts, run ids, reasons and the report's own location only."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
import time
from datetime import datetime, timezone
from typing import Callable, Optional

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pipeline.settings import ENV_VARS
from pipeline.state import PipelineState, State
from pipeline.timing import GAVE_UP, next_start

from ops.preflight import CallFailed, UsageError, call
from ops.stack import Stack, StackError, add_arguments, describe, explain, resolve

# One screen should answer in seconds, also when an endpoint does not: short timeouts, one retry (as preflight).
CLIENT_CONFIG = Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2, "mode": "standard"})
RETRY_NOW = "to retry now, upload (or re-upload) any image"
URL_SECONDS = 3600  # --url: how long the presigned link to report.html works
AGE_WINDOW_S = 900  # CloudWatch: the oldest message's age, the maximum over the last 15 minutes
RECONCILE_MINUTES = 5  # template.yaml's ReconcileMinutes default, for a stack that does not say
QUEUES = (("uploads", "UploadQueueUrl"), ("uploads dead-letter", "DeadLetterQueueUrl"),
          ("job-state dead-letter", "JobStateDeadLetterQueueUrl"))  # fmt: skip
LIVE_CLUSTER_STATES = ("RUNNING", "WAITING")  # an EC2 cluster whose primary node serves its application UIs
# Free text that quotes a key (keys may hold spaces): from an s3:// URI or images/<label>/ on, it is withheld whole
KEYLIKE = re.compile(r"(s3a?://|\bimages/[^\s/]+/).*", re.S)

DESCRIPTION = (
    "What the pipeline of a deployed stack does now, on one screen (--json: the same as JSON, for scripts). "
    "It reads the stack, its state item, queues and results; it changes nothing."
)
EPILOG = """\
what it shows:
  pipeline   idle (results current) | waiting for uploads to pause (since when, and when the run starts: after
             QuietSeconds of quiet, or MaxWaitSeconds at the latest) | starting | running | retrying at T after n
             failures | gave up (why, and what restarts it) | cleanup due at T (the erasure bound)
  run        the active run: engine, run id, EMR job run or cluster id, EMR state, start, elapsed, progress
             (stage, images done of total, rate, ETA), the Spark UI (a link valid 1 hour) and the EMR console
  queues     messages waiting and in flight in the upload queue and both dead-letter queues, and the oldest
             message's age (CloudWatch, last 15 minutes)
  last run   outcome, images, k, duration, cost, failures by reason, where report.html is (--url: a link)
  deployed   artifacts version, weights, engine, architecture

read permissions used: cloudformation:DescribeStacks, dynamodb:GetItem, s3:GetObject, sqs:GetQueueAttributes,
  cloudwatch:GetMetricData, emr-serverless:GetJobRun and GetDashboardForJobRun (Engine=serverless),
  elasticmapreduce:DescribeCluster and GetOnClusterAppUIPresignedURL (Engine=ec2). A link that cannot be made is
  a note; another call that fails is named on the screen and the exit status is 1.
exit status: 0 shown; 1 the stack cannot be read (unknown, another application's, a refused call) or part of the
  screen could not be read; 2 bad usage."""


# ---- the command -----------------------------------------------------------------------------------------------


def add_parser(commands) -> None:
    """`image-features status`, on the console script's subcommands."""
    parser = commands.add_parser("status", help="what the pipeline does now: waiting, running, retrying, gave up; "
                                 "the last run and its cost; the queues", description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the status as JSON, for scripts")
    parser.add_argument(
        "--url",
        action="store_true",
        help=f"add a presigned link to the last run's report.html (valid {URL_SECONDS // 60} minutes)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, clients: Optional[Callable] = None, now: Optional[float] = None) -> int:
    """The subcommand. clients (service -> boto3 client) and now are for tests."""
    try:
        session = None if clients else boto3.Session(profile_name=args.profile)
        name, region = resolve(args, session.region_name if session else None)
    except (UsageError, BotoCoreError) as exc:  # an unknown environment or profile, no region
        print(f"image-features status: error: {exc}", file=sys.stderr)
        return 2
    clients = clients or (lambda service: session.client(service, region_name=region, config=CLIENT_CONFIG))
    try:
        stack = describe(clients("cloudformation"), name, region)
        data = gather(stack, clients, time.time() if now is None else now, url=args.url)
    except StackError as exc:
        print(f"image-features status: {exc}", file=sys.stderr)
        return 1
    except CallFailed as exc:
        print(f"image-features status: {explain(exc)}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if args.json else render(data, colour=_colour(sys.stdout)))
    return 1 if data["errors"] else 0


# ---- gathering -------------------------------------------------------------------------------------------------


def gather(stack: Stack, clients: Callable, now: float, url: bool = False) -> dict:
    """Everything the screen shows, as plain data. Raises CallFailed when the state item cannot be read (nothing
    else on the screen makes sense without it); other failed calls are listed in "errors", named."""
    errors: list = []
    state = read_state(clients("dynamodb"), stack.output("StateTableName"))
    bucket, results = _split(stack.output("ResultsUri"))
    s3 = clients("s3")
    report = _guarded(errors, lambda: read_json(s3, bucket, results + "report.json"))
    return {
        "stack": {"name": stack.name, "region": stack.region, "status": stack.status},
        "pipeline": pipeline_status(state, stack, now),
        "run": active_run(state, stack, clients, now, report, errors),
        "queues": queues(stack, clients, now, errors),
        "last_run": last_run(state, report, stack, s3 if url else None),
        "deployed": deployed(stack),
        "checked_at": _iso(now),
        "errors": errors,
    }


def read_state(dynamodb, table: str) -> State:
    try:
        return PipelineState(dynamodb, table).read()
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise CallFailed("dynamodb:GetItem", error.get("Code", ""), error.get("Message", "")) from exc
    except BotoCoreError as exc:
        raise CallFailed("dynamodb:GetItem", type(exc).__name__, str(exc)) from exc


def read_json(s3, bucket: str, key: str) -> Optional[dict]:
    """An object of the results as JSON; None when there is none."""
    try:
        body = _call(s3, "get_object", Bucket=bucket, Key=key)["Body"].read()
    except CallFailed as exc:
        if exc.code in ("NoSuchKey", "404"):
            return None
        raise
    return json.loads(body)


def _settings(stack: Stack) -> dict:
    p = stack.parameters

    def number(name: str, default) -> int:
        try:
            return int(p.get(name) or default)
        except ValueError:
            return int(default)

    return {"quiet_seconds": number("QuietSeconds", ENV_VARS["QUIET_SECONDS"]),
            "max_wait_seconds": number("MaxWaitSeconds", ENV_VARS["MAX_WAIT_SECONDS"]),
            "retry_base_seconds": number("RetryBaseSeconds", ENV_VARS["RETRY_BASE_SECONDS"]),
            "max_attempts": number("MaxAttempts", ENV_VARS["MAX_ATTEMPTS"]),
            "reconcile_minutes": number("ReconcileMinutes", RECONCILE_MINUTES)}  # fmt: skip


def pipeline_status(state: State, stack: Stack, now: float) -> dict:
    """The pipeline's state in one word, a line that says it, notes for the lines below it, and the times behind
    them."""
    s = _settings(stack)
    nxt = next_start(state, s["quiet_seconds"], s["max_wait_seconds"], now)
    out = {
        "state": "", "summary": "", "notes": [], "changes_waiting": max(state.gen - state.processed_gen, 0),
        "waiting_since": _iso(state.first_change_at), "last_change_at": _iso(state.last_change_at),
        "starts_at": _iso(nxt.at), "starts_by": nxt.by, "failures": state.failures, "retry_at": None,
        "gave_up": None, "cleanup": None, "alert_pending": state.alert is not None,
        "events_pending": len(getattr(state, "outbox", None) or {}), "settings": s,
        "changes_after_run": max(state.gen - state.run.gen, 0) if state.run else 0,
    }  # fmt: skip
    notes, run = out["notes"], state.run
    reconcile = f"the reconcile pass (every {s['reconcile_minutes']} min)"
    plural = "s" * (state.failures != 1)
    if run is not None and not run.job_id:
        out["state"], out["summary"] = "starting", f"run {run.run_id}, claimed {_when(run.claimed_at, now)}"
        notes.append("EMR has not confirmed its job yet")
    elif run is not None and run.cancel_requested_at:
        out["state"], out["summary"] = "cancelling", f"run {run.run_id}: past its timeout (JobTimeoutMinutes)"
        notes.append(f"the reconciler asked EMR to cancel it {_when(run.cancel_requested_at, now)}")
    elif run is not None:
        out["state"], out["summary"] = "running", f"{run.run_id} (attempt {run.attempt} of {s['max_attempts']})"
    elif nxt.reason == "clean":
        out["state"] = "idle"
        out["summary"] = "results are current" if state.last_run else "no run yet: no image has changed"
    elif nxt.reason == "given-up":
        last = state.last_run or {}
        why = _clean(last.get("detail")) or last.get("state") or "unknown"
        out["state"], out["summary"] = "gave-up", f"after {state.failures} failed attempt{plural}: {why}"
        out["gave_up"] = {"why": why, "restarts": GAVE_UP, "retry_now": RETRY_NOW, "after_failures": state.failures}
        notes += [GAVE_UP, RETRY_NOW]
    elif nxt.reason == "backoff":
        out["state"], out["retry_at"] = "retrying", _iso(state.retry_at)
        out["summary"] = f"at {_when(nxt.at, now)} after {state.failures} failure{plural}"
        notes.append(f"attempt {state.failures + 1} of {s['max_attempts']}: {reconcile} starts it")
    elif nxt.reason == "settling":
        since = f" since {_when(state.first_change_at, now)}" if state.first_change_at else ""
        out["state"] = "waiting"
        out["summary"] = f"for uploads to pause: {out['changes_waiting']} change(s){since}"
        latest = state.first_change_at + s["max_wait_seconds"] if state.first_change_at else None
        if nxt.by == "quiet":
            notes.append(
                f"starts at {_when(nxt.at, now)}, once uploads pause for {s['quiet_seconds']} s (QuietSeconds)"
            )
            if latest and latest > nxt.at:
                notes.append(f"or at {_when(latest, now)} at the latest (MaxWaitSeconds)")
        else:
            notes.append(f"starts at {_when(nxt.at, now)}: the longest wait, {s['max_wait_seconds']} s "
                         "(MaxWaitSeconds), whatever the uploads")  # fmt: skip
    else:
        out["state"], out["summary"] = "due", "a run starts now"
        notes.append(f"the next quiet-period tick or {reconcile} starts it")
    if out["changes_after_run"]:
        notes.append(f"{out['changes_after_run']} change(s) since this run was claimed: the next run follows it")
    if state.cleanup_at is not None or state.cleanup_pending:
        line = _cleanup_line(state, now, reconcile)
        out["cleanup"] = {"due_at": _iso(state.cleanup_at), "guessed": state.cleanup_guessed,
                          "pending": state.cleanup_pending, "summary": line}  # fmt: skip
        notes.append(line)
    unsent = (("an alert", out["alert_pending"]), (f"{out['events_pending']} event(s)", out["events_pending"]))
    pending = [what for what, there in unsent if there]
    if pending:
        notes.append(f"not sent yet: {' and '.join(pending)} (the functions' next invocation sends them)")
    return out


def _cleanup_line(state: State, now: float, reconcile: str) -> str:
    if state.cleanup_pending:
        return ("an erasure cleanup is pending: files of superseded snapshots may still hold erased images until a "
                "run succeeds")  # fmt: skip
    guess = " (a guess: the report could not be read)" if state.cleanup_guessed else ""
    if state.cleanup_at <= now:
        return f"cleanup due since {_when(state.cleanup_at, now)}{guess}: {reconcile} starts its run, even after " \
               "giving up"  # fmt: skip
    return f"cleanup due at {_when(state.cleanup_at, now)}{guess}: a run starts then, so that erased images leave " \
           "superseded snapshots' files"  # fmt: skip


def active_run(state: State, stack: Stack, clients: Callable, now: float, report: Optional[dict],
               errors: list) -> Optional[dict]:  # fmt: skip
    run = state.run
    if run is None:
        return None
    started = run.started_at or run.claimed_at
    out = {"run_id": run.run_id, "attempt": run.attempt, "engine": stack.engine, "job_id": run.job_id or None,
           "emr_state": None, "claimed_at": _iso(run.claimed_at), "started_at": _iso(started),
           "elapsed_s": int(now - started), "progress": None, "progress_note": None, "spark_ui": None,
           "spark_ui_note": None, "console": None, "logs": None, "emr_created_at": None}  # fmt: skip
    if run.job_id:
        (serverless_job if stack.engine == "serverless" else ec2_cluster)(out, stack, clients, errors)
    if report and report.get("launch_id") == run.run_id:
        out["progress_note"] = "published: the run's results are current; EMR is finishing the job"
    else:
        bucket, results = _split(stack.output("ResultsUri"))
        got = _guarded(errors, lambda: read_json(clients("s3"), bucket, f"{results}progress/{run.run_id}.json"))
        out["progress"] = _progress(got) if got else None
        out["progress_note"] = None if got else "not reported yet"
    return out


def _progress(p: dict) -> dict:
    keep = ("stage", "images_done", "images_total", "rate", "eta_s", "started_at", "updated_at", "job_run_id")
    return {k: p.get(k) for k in keep}


def serverless_job(out: dict, stack: Stack, clients: Callable, errors: list) -> None:
    app, job, region = stack.output("EmrApplicationId"), out["job_id"], stack.region
    emr = clients("emr-serverless")
    got = _guarded(errors, lambda: _call(emr, "get_job_run", applicationId=app, jobRunId=job)["jobRun"])
    if got:
        out["emr_state"] = got.get("state")
        if got.get("createdAt"):
            out["emr_created_at"] = _iso(got["createdAt"].timestamp())
    out["console"] = (f"https://{region}.console.aws.amazon.com/emr/home?region={region}#/serverless/applications/"
                      f"{app}/job-runs/{job}")  # fmt: skip
    bucket, _ = _split(stack.output("ResultsUri"))
    out["logs"] = f"s3://{bucket}/logs/emr-serverless/applications/{app}/jobs/{job}/"
    try:  # a live Spark UI while it runs, the Spark History Server after: valid one hour
        out["spark_ui"] = _call(emr, "get_dashboard_for_job_run", applicationId=app, jobRunId=job)["url"]
    except CallFailed as exc:
        out["spark_ui_note"] = _no_link(exc)


def ec2_cluster(out: dict, stack: Stack, clients: Callable, errors: list) -> None:
    cluster, region = out["job_id"], stack.region
    emr = clients("emr")
    got = _guarded(errors, lambda: _call(emr, "describe_cluster", ClusterId=cluster)["Cluster"])
    out["console"] = f"https://{region}.console.aws.amazon.com/emr/home?region={region}#/clusterDetails/{cluster}"
    bucket, _ = _split(stack.output("ResultsUri"))
    out["logs"] = f"s3://{bucket}/logs/emr-ec2/{cluster}/"
    if not got:
        return
    status = got.get("Status", {})
    out["emr_state"] = status.get("State")
    created = status.get("Timeline", {}).get("CreationDateTime")
    if created:
        out["emr_created_at"] = _iso(created.timestamp())
    if out["emr_state"] not in LIVE_CLUSTER_STATES:
        out["spark_ui_note"] = "the cluster serves its Spark UI once it runs; the console's page links it"
        return
    try:  # the on-cluster Spark History Server through EMR's proxy: no SSH tunnel, nothing to create
        answer = _call(emr, "get_on_cluster_app_ui_presigned_url", ClusterId=cluster,
                       OnClusterAppUIType="SparkHistoryServer")  # fmt: skip
        if answer.get("PresignedURLReady") and answer.get("PresignedURL"):
            out["spark_ui"] = answer["PresignedURL"]
        else:
            out["spark_ui_note"] = "EMR is still preparing the link; ask again in a minute, or use the console's page"
    except CallFailed as exc:
        out["spark_ui_note"] = _no_link(exc) + "; the console's page links the Spark UI"


def queues(stack: Stack, clients: Callable, now: float, errors: list) -> list:
    sqs, found = clients("sqs"), []
    for label, output in QUEUES:
        url = stack.outputs.get(output)
        if not url:
            continue
        entry = {"queue": label, "name": url.rstrip("/").rsplit("/", 1)[-1], "waiting": None, "in_flight": None,
                 "oldest_age_s": None}  # fmt: skip
        attributes = _guarded(errors, lambda url=url: _call(sqs, "get_queue_attributes", QueueUrl=url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"])  # fmt: skip
        if attributes:
            entry["waiting"] = int(attributes.get("ApproximateNumberOfMessages", 0))
            entry["in_flight"] = int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0))
        found.append(entry)
    ages = _guarded(errors, lambda: oldest_ages(clients("cloudwatch"), [q["name"] for q in found], now))
    for entry in found:
        entry["oldest_age_s"] = (ages or {}).get(entry["name"])
    return found


def oldest_ages(cloudwatch, names: list, now: float) -> dict:
    """Queue name -> ApproximateAgeOfOldestMessage (s), the latest one-minute maximum of the window; absent when
    CloudWatch has no datapoint (an idle queue reports none for a while)."""
    if not names:
        return {}
    queries = [{"Id": f"q{i}", "MetricStat": {"Metric": {"Namespace": "AWS/SQS",
                                                          "MetricName": "ApproximateAgeOfOldestMessage",
                                                          "Dimensions": [{"Name": "QueueName", "Value": name}]},
                                               "Period": 60, "Stat": "Maximum"}, "ReturnData": True}
               for i, name in enumerate(names)]  # fmt: skip
    answer = _call(cloudwatch, "get_metric_data", MetricDataQueries=queries, ScanBy="TimestampDescending",
                   StartTime=datetime.fromtimestamp(now - AGE_WINDOW_S, tz=timezone.utc),
                   EndTime=datetime.fromtimestamp(now, tz=timezone.utc))  # fmt: skip
    ages = {}
    for result in answer.get("MetricDataResults", []):
        if result.get("Values"):
            ages[names[int(result["Id"][1:])]] = round(result["Values"][0])
    return ages


def last_run(state: State, report: Optional[dict], stack: Stack, s3=None) -> Optional[dict]:
    """The last settled run (state item) and the published report, when it is that run's (or the last one's)."""
    last = state.last_run or {}
    if not last and not report:
        return None
    same = bool(report) and report.get("launch_id") == last.get("run_id")
    out = {"run_id": last.get("run_id"), "outcome": last.get("state"), "attempt": _int(last.get("attempt")),
           "ended_at": _iso(_float(last.get("ended_at"))), "detail": _clean(last.get("detail")) or None,
           "published": same or last.get("published") == "yes", "cancelled": last.get("cancelled"),
           "cost": _cost(last, report if same else None), "results": None}  # fmt: skip
    if report:
        bucket, results = _split(stack.output("ResultsUri"))
        resources = report.get("timings_s") or {}
        out["results"] = {
            "launch_id": report.get("launch_id"), "job_run_id": report.get("run_id"), "of_last_run": same,
            "finished_at": report.get("finished_at"),
            "images": {k: report.get(f"images_{k}") for k in ("total", "ok", "failed", "featurized", "removed")},
            "k": report.get("k"), "duration_s": resources.get("total"),
            "failures_by_reason": {_clean(k): v for k, v in (report.get("failures_by_reason") or {}).items()},
            "report": f"s3://{bucket}/{results}{report['html']}" if report.get("html") else None,
            "report_url": None,
        }  # fmt: skip
        if s3 is not None and report.get("html"):
            out["results"]["report_url"] = s3.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": results + report["html"]}, ExpiresIn=URL_SECONDS
            )
    return out


def _cost(last: dict, report: Optional[dict]) -> Optional[dict]:
    """EMR's own figures from the state item (billed where EMR says); else the job's estimate in its report."""
    basis = "billed_" if _float(last.get("billed_vcpu_hours")) else ""
    vcpu, gb = _float(last.get(basis + "vcpu_hours")), _float(last.get(basis + "memory_gb_hours"))
    usd, nih = _float(last.get("estimated_usd")), _float(last.get("normalized_instance_hours"))
    if vcpu or nih:  # EMR reports no zero for a job that ran (moto does)
        source = "EMR, billed" if basis else "EMR, used"
        return {"vcpu_hours": vcpu, "memory_gb_hours": gb, "usd": usd, "normalized_instance_hours": nih,
                "source": source}  # fmt: skip
    r = (report or {}).get("resources")
    if r:
        return {"vcpu_hours": round(r.get("vcpu_seconds", 0) / 3600, 6), "memory_gb_hours":
                round(r.get("gb_seconds", 0) / 3600, 6), "usd": r.get("estimated_usd"),
                "normalized_instance_hours": None, "source": "the job's own estimate"}  # fmt: skip
    return None


def deployed(stack: Stack) -> dict:
    p = stack.parameters
    weights = stack.outputs.get("WeightsUri") or ""
    return {
        "artifacts_version": stack.outputs.get("ArtifactsVersion"),
        "weights": p.get("ModelWeights"),
        "weights_file": "/".join(weights.split("/")[-2:]) or None,
        "engine": stack.engine,
        "architecture": p.get("Architecture"),
        "release": p.get("EmrReleaseLabel"),
        "stage": p.get("Stage"),
        "dashboard": stack.outputs.get("DashboardUrl"),
    }


# ---- rendering -------------------------------------------------------------------------------------------------

WIDTH = 120  # the screen's lines, but for links
STATE_COLOURS = {"idle": "32", "running": "32", "waiting": "33", "due": "33", "starting": "33", "retrying": "33",
                 "cancelling": "31", "gave-up": "31"}  # fmt: skip


def render(data: dict, colour: bool = False) -> str:
    """The screen: one block per question, label column on the left, times in UTC with how long ago."""
    now = _epoch(data["checked_at"])
    stack, p = data["stack"], data["pipeline"]
    lines = []

    def row(label: str, text, hang: int = 0) -> None:
        lines.extend(_wrapped(label, text, hang))

    head = p["state"].upper()
    if colour:
        head = f"\033[1;{STATE_COLOURS.get(p['state'], '0')}m{head}\033[0m"
    row("stack", f"{stack['name']} ({stack['region']}, {stack['status']}), checked {_clock(now)}")
    row("pipeline", f"{head}  {p['summary']}")
    for note in p["notes"]:
        row("", " " * (len(p["state"]) + 2) + note, hang=len(p["state"]) + 2)
    run = data["run"]
    if run:
        lines.append("")
        what = "EMR Serverless job run" if run["engine"] == "serverless" else "EMR cluster"
        row("run", f"{run['run_id']}  attempt {run['attempt']}, {run['engine']}")
        emr_state = f", {run['emr_state']}" if run["emr_state"] else ""
        row("  job", f"{what} {run['job_id'] or '(not started yet)'}{emr_state}")
        row("  started", f"{_when(_epoch(run['started_at']), now)}, elapsed {_duration(run['elapsed_s'])}")
        row("  progress", _progress_line(run["progress"], now) if run["progress"] else run["progress_note"])
        if run["job_id"]:
            row("  spark ui", run["spark_ui"] or run["spark_ui_note"])
            row("  console", run["console"])
            row("  logs", run["logs"])
    lines.append("")
    for q in data["queues"]:
        counts = "?" if q["waiting"] is None else f"{q['waiting']} waiting, {q['in_flight']} in flight"
        age = "" if q["oldest_age_s"] is None else f", oldest {_duration(q['oldest_age_s'])}"
        row("queue" if q is data["queues"][0] else "", f"{q['queue'] + ':':<23}{counts}{age}")
    last = data["last_run"]
    lines.append("")
    if last is None:
        row("last run", "none yet")
    else:
        lines.extend(_last_run_lines(last, now))
    d = data["deployed"]
    lines.append("")
    weights = d["weights"] + (f" ({d['weights_file']})" if d["weights_file"] else "") if d["weights"] else "?"
    row("deployed", f"artifacts {d['artifacts_version']}, engine {d['engine']} {d['architecture'] or ''}"
                    f"{', ' + d['release'] if d['release'] else ''}".rstrip())  # fmt: skip
    row("", f"weights {weights}")
    if d["dashboard"]:
        row("", f"dashboard {d['dashboard']}")
    for error in data["errors"]:
        row("error", error)
    return "\n".join(lines)


def _last_run_lines(last: dict, now: float) -> list:
    out: list = []

    def add(label, text):
        out.extend(_wrapped(label, text))

    if last["run_id"]:
        ended = f", ended {_when(_epoch(last['ended_at']), now)}" if last["ended_at"] else ""
        add("last run", f"{last['run_id']}  {last['outcome']}{ended}, attempt {last['attempt']}"
                        + (" (published)" if last["published"] and last["outcome"] != "SUCCESS" else ""))  # fmt: skip
        if last["detail"]:
            add("  detail", last["detail"])
        if last["cancelled"]:
            add("  cancelled", last["cancelled"])
    r = last["results"]
    if r is None:
        add("  results", "none published yet")
    else:
        which = "this run" if r["of_last_run"] else "that run"
        if not r["of_last_run"]:
            by = r["launch_id"] or "a run the pipeline did not launch"
            at = f", finished {_when(_epoch(r['finished_at']), now)}" if r["finished_at"] else ""
            add("results", f"published by {by}{at}")
        i = r["images"]
        add("  images", f"{i['total']} total: {i['ok']} ok, {i['failed']} failed; {which} featurized "
                        f"{i['featurized']}, removed {i['removed']}")  # fmt: skip
        add("  pca", f"k = {r['k']}" if r["k"] else "not fitted")
        if r["duration_s"] is not None:
            add("  duration", _duration(r["duration_s"]) + " (the job's own timing)")
    cost = last["cost"]
    if cost:
        if cost["vcpu_hours"] is not None:
            usd = f", about ${cost['usd']:.4f}" if cost["usd"] is not None else ""
            add("  cost", f"{cost['vcpu_hours']:.4g} vCPU-hours, {cost['memory_gb_hours'] or 0:.4g} GB-hours{usd} "
                          f"({cost['source']})")  # fmt: skip
        else:
            add("  cost", f"{cost['normalized_instance_hours']:g} normalized instance hours ({cost['source']})")
    if r:
        reasons = sorted(r["failures_by_reason"].items(), key=lambda kv: -kv[1])
        if reasons:
            add("  failures", ", ".join(f"{n} x {reason}" for reason, n in reasons))
        if r["report"]:
            add("  report", r["report"])
        if r["report_url"]:
            add("  link", f"{r['report_url']}  (valid {URL_SECONDS // 60} min)")
        elif r["report"]:
            add("", "--url gives a link to open it, valid 1 hour")
    return out


def _wrapped(label: str, text, hang: int = 0) -> list:
    """A row of the screen, its text wrapped at WIDTH under its own start (links and paths are never broken)."""
    first = f"{label:<11}{text}"
    if len(first) <= WIDTH or any(len(word) > 60 for word in str(text).split()):  # a link stays on its line, whole
        return [first]
    return textwrap.wrap(first, WIDTH, subsequent_indent=" " * (11 + hang), break_long_words=False,
                         break_on_hyphens=False)  # fmt: skip


def _progress_line(p: dict, now: float) -> str:
    """featurize: 120 of 500 images (24%), 12.5 images/s, ETA 30 s; later stages say what featurizing did."""
    stage, done, total, rate = p.get("stage") or "?", p.get("images_done") or 0, p.get("images_total"), p.get("rate")
    if stage == "featurize" and total:
        line = f"featurize: {done} of {total} images ({100 * done / total:.0f}%)"
        line += (f", {rate:.1f} images/s" if rate else "") + (f", ETA {_duration(p['eta_s'])}" if rate else "")
    elif total and stage != "plan":
        line = f"{stage}: featurized {done} of {total} images" + (f" at {rate:.1f} images/s" if rate else "")
    else:
        line = stage
    updated = _epoch(p.get("updated_at"))
    if updated is not None:
        line += f" (updated {_ago(min(updated, now), now)})"  # the job's clock may run a little ahead of ours
    return line


# ---- helpers ---------------------------------------------------------------------------------------------------


_call = call  # every read names the IAM action it needs when it fails


def _no_link(exc: CallFailed) -> str:
    """Why a link could not be made, in one short line."""
    if exc.code in ("404", "NotImplemented", "UnknownOperationException", "InvalidAction"):
        return f"no link: this endpoint does not offer {exc.action}"  # moto, behind the local stack
    return "no link: " + _one_line(explain(exc))


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _guarded(errors: list, read: Callable):
    """read(), or None with the failed call named in errors."""
    try:
        return read()
    except CallFailed as exc:
        errors.append(_one_line(explain(exc)))
        return None


def _split(uri: str) -> tuple:
    """s3://bucket/prefix/ -> (bucket, 'prefix/')."""
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    return bucket, prefix


def _clean(text) -> str:
    return KEYLIKE.sub("<withheld>", str(text or "")).strip()


def _int(value) -> Optional[int]:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def _float(value) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _iso(epoch: Optional[float]) -> Optional[str]:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(iso) -> Optional[float]:
    """An ISO-8601 time (UTC if it names no zone) as epoch seconds; None if it is not one (a report's own field)."""
    try:
        when = datetime.fromisoformat(str(iso).replace("Z", "+00:00"))
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def _clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    seconds = int(abs(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {s} s" if minutes < 10 and s else f"{minutes} min"
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m} min" if hours < 48 else f"{hours // 24} days"


def _ago(epoch: float, now: float) -> str:
    delta = now - epoch
    if abs(delta) < 1:
        return "just now"
    return f"{_duration(delta)} ago" if delta > 0 else f"in {_duration(delta)}"


def _when(epoch: Optional[float], now: float) -> str:
    """12:03:10 UTC (in 3 min); the date too when it is not today's."""
    if epoch is None:
        return "?"
    at, today = datetime.fromtimestamp(epoch, tz=timezone.utc), datetime.fromtimestamp(now, tz=timezone.utc)
    stamp = at.strftime("%H:%M:%S UTC") if at.date() == today.date() else at.strftime("%Y-%m-%d %H:%M UTC")
    return f"{stamp} ({_ago(epoch, now)})"


def _colour(stream) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"
