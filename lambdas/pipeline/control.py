"""The control loop the three entry points share: changes mark the pipeline dirty, at most one run starts when
uploads settle, a run's end is settled exactly once, and a schedule repairs whatever an event failed to do.

Every function reads the one state item, acts, and writes back conditionally, so any of them may run twice,
late, concurrently or not at all and the next one picks up where it stopped (controller-runtime's Reconcile)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

from pipeline.inputs import current_inputs, published_report
from pipeline.launchers import JobOutcome, StartRefused
from pipeline.notifications import TICK
from pipeline.observability import count, digest, logger
from pipeline.settings import Settings
from pipeline.state import Conflict, PipelineState, Run, State, retry_delay_s

STARTING_GRACE_S = 300  # a claim without a job id older than this lost its starter (the function timeout is 120 s)
GAVE_UP = "no more automatic runs until a new upload, a new deployment, or images changed without an event (seen daily)"  # noqa: E501
TIMEOUT_SLACK_S = 900  # EMR stops a run at its timeout; past this as well, someone should look


@dataclass
class Pipeline:
    settings: Settings
    state: PipelineState
    launcher: object  # ServerlessLauncher | Ec2Launcher
    sqs: object = None
    sns: object = None
    s3: object = None


@dataclass
class Started:
    reason: str  # started | starting | active | clean | given-up | backoff | settling | raced | refused
    run_id: Optional[str] = None


def new_run_id(now: float) -> str:
    return "run-" + datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


# --- entry points ------------------------------------------------------------------------------------------
def on_changes(p: Pipeline, changes: int, latest_change_at: Optional[float]) -> bool:
    """Uploads, deletions or expiries happened: mark dirty. False if all were visible to a claimed run already."""
    marked = p.state.mark_dirty(latest_change_at)
    count("ChangesMarked" if marked else "ChangesAlreadyCovered", changes)
    return marked


def maybe_start(p: Pipeline) -> Started:
    """Start a run if the pipeline is dirty, no run is active, and uploads have settled (or waited too long)."""
    state = p.state.read()
    flush_alert(p, state)
    now, s = p.state.clock(), p.settings
    if state.run is not None:
        if not state.run.job_id and now - state.run.claimed_at > STARTING_GRACE_S:
            return _launch(p, state, state.run)  # its starter died between the claim and the job id
        return Started("active", state.run.run_id)
    if not state.dirty:
        return Started("clean")
    if state.given_up:
        return Started("given-up")
    if now < state.retry_at:
        return Started("backoff")
    quiet = state.last_change_at is None or now - state.last_change_at >= s.quiet_seconds
    overdue = state.first_change_at is not None and now - state.first_change_at >= s.max_wait_seconds
    if not (quiet or overdue):
        return Started("settling")
    try:
        run = p.state.claim(state, new_run_id(now))
    except Conflict:
        return Started("raced")  # another invocation claimed it, or a change arrived meanwhile
    return _launch(p, state, run)


def settle(p: Pipeline, outcome: JobOutcome) -> dict:
    """A run ended (EMR's event, or the reconciler asking EMR): record it once, alert on failure, start the next."""
    state = p.state.read()
    run = state.run
    if run is None or run.job_id != outcome.job_id:
        logger.info("end of a run that is not active; ignored", extra={"job": digest(outcome.job_id)})
        count("StateEventsIgnored")
        return {"settled": None, "next": maybe_start(p).reason}
    _end(p, state, outcome)
    return {"settled": run.run_id, "succeeded": outcome.succeeded, "next": maybe_start(p).reason}


def reconcile(p: Pipeline) -> dict:
    """The schedule's pass: settle a run whose end event was lost or early, retry a start that never reported,
    alert on a run past its timeout, and start a deferred run."""
    state = p.state.read()
    flush_alert(p, state)
    run, now = state.run, p.state.clock()
    if run is None and state.given_up and (state.given_up_on or {}).get("artifacts") != p.settings.artifacts_version:
        # A deployment since the pipeline gave up may be the fix: one more attempt now, not at the daily pass
        logger.info("given up, and other artifacts are deployed now: one more attempt")
        p.state.mark_daily()
    if run is None or not run.job_id:
        return {"reconciled": "start", "next": maybe_start(p).reason}
    outcome = p.launcher.status(run.job_id)
    if outcome is not None:
        logger.info("run ended without its state event reaching us; settled from EMR", extra={"run_id": run.run_id})
        count("RunsSettledByReconciler")
        return {"reconciled": "settled", **settle(p, outcome)}
    limit = p.settings.job_timeout_minutes * 60 + TIMEOUT_SLACK_S
    if now - (run.started_at or run.claimed_at) > limit and not run.timeout_alerted:
        p.state.queue_alert(_alert(f"run {run.run_id} still running after {int(now - run.started_at) // 60} minutes",
                                   run, "RUNNING", "past JOB_TIMEOUT_MINUTES; EMR should have stopped it"))  # fmt: skip
        p.state.mark_timeout_alerted(run)
        flush_alert(p, p.state.read())
    return {"reconciled": "running", "run_id": run.run_id}


def daily(p: Pipeline) -> dict:
    """Once a day, catch what the events missed (expiries, lost events, old images): mark the pipeline dirty if
    images/ differs from what the published run listed (or, given up, from what the failed run had). Nothing
    changed: nothing starts. A run active or due is marked as before, since its listing may predate the change."""
    state = p.state.read()
    why = _daily_reason(p, state) if state.run is None and (not state.dirty or state.given_up) else "run active or due"
    if why is None:
        logger.info("daily pass: images/ unchanged since the published run; nothing to start")
        count("DailyUnchanged")
        return {"daily": "unchanged", "next": maybe_start(p).reason}
    p.state.mark_daily()
    count("DailyReconciliations")
    logger.info("daily pass: reconciling", extra={"why": why})
    return {"daily": why, "next": maybe_start(p).reason}


def _daily_reason(p: Pipeline, state: State) -> Optional[str]:
    """Why the daily pass should run the job now; None when nothing changed. Any doubt runs it."""
    s = p.settings
    try:
        if state.given_up:
            on = state.given_up_on or {}
            if on.get("artifacts") != s.artifacts_version:
                return "given up; new artifacts deployed"
            if on.get("inputs") != current_inputs(p.s3, s.bucket, s.images_prefix)["sha256"]:
                return "given up; images changed"
            return None
        report = published_report(p.s3, s.bucket, s.results_prefix)
        now = current_inputs(p.s3, s.bucket, s.images_prefix)
        if report is None:
            return "no results yet" if now["images"] else None
        if report.get("inputs") != now:
            return "images changed" if report.get("inputs") else "the report has no inputs digest (an older job)"
        if (report.get("maintenance") or {}).get("oldest_uncompacted_delete"):
            return "erased rows to compact"  # runs stay at least daily until erased rows leave the table files
        return None
    except Exception:
        logger.exception("daily pass: images/ or the report could not be read; reconciling anyway")
        count("DailyInputsUnreadable")
        return "inputs unreadable"


# --- internals ---------------------------------------------------------------------------------------------
def _launch(p: Pipeline, state: State, run: Run) -> Started:
    """Start the claimed run. The run id is the idempotency token, so starting again is always safe."""
    try:
        job_id = p.launcher.start(run.run_id)
    except StartRefused as exc:
        logger.error("the engine refused the run", extra={"run_id": run.run_id, "reason": str(exc)})
        _end(p, p.state.read(), JobOutcome(p.launcher.engine, run.job_id, False, "START_REFUSED", str(exc)))
        return Started("refused", run.run_id)
    except Exception:
        # The request may have started a job whose answer was lost: keep the claim, retry with the same token.
        logger.exception("run start not confirmed; the reconciler retries it", extra={"run_id": run.run_id})
        count("RunStartsUnconfirmed")
        return Started("starting", run.run_id)
    try:
        p.state.record_job(run, job_id)
    except Conflict:
        return Started("raced", run.run_id)
    count("RunsStarted")
    logger.info("run started", extra={"run_id": run.run_id, "job_id": job_id, "engine": p.launcher.engine,
                                      "attempt": run.attempt, "changes_since": run.first_change_at})  # fmt: skip
    return Started("started", run.run_id)


def _end(p: Pipeline, state: State, outcome: JobOutcome) -> None:
    run, s = state.run, p.settings
    record = {"run_id": run.run_id, "state": outcome.state, "attempt": run.attempt, "detail": outcome.detail[:500]}
    alert = None
    given_up_on = None
    if not outcome.succeeded:
        gave_up = state.failures + 1 >= s.max_attempts
        if gave_up:
            given_up_on = {"artifacts": s.artifacts_version, **_inputs_sha(p)}
        delay_min = retry_delay_s(s.retry_base_seconds, state.failures) // 60
        then = GAVE_UP if gave_up else f"retrying in {delay_min} minutes"
        alert = _alert(f"run {run.run_id} ended {outcome.state}", run, outcome.state, f"{outcome.detail}; {then}")
    try:
        p.state.settle(state, outcome.succeeded, record, alert, s.retry_base_seconds, s.max_attempts, given_up_on)
    except Conflict:
        logger.info("run already settled by another invocation", extra={"run_id": run.run_id})
        return
    count("RunsSucceeded" if outcome.succeeded else "RunsFailed")
    logger.info("run settled", extra=record)
    if alert:
        flush_alert(p, p.state.read())


def _inputs_sha(p: Pipeline) -> dict:
    """{"inputs": the images/ digest} as a run gives up; {} if unreadable (then the daily pass restarts it)."""
    try:
        return {"inputs": current_inputs(p.s3, p.settings.bucket, p.settings.images_prefix)["sha256"]}
    except Exception:
        logger.exception("images/ could not be listed as the pipeline gave up")
        return {}


def _alert(subject: str, run: Run, state: str, detail: str) -> dict:
    return {"id": uuid.uuid4().hex[:12], "subject": subject[:100], "run_id": run.run_id, "state": state,
            "attempt": run.attempt, "detail": detail[:1000]}  # fmt: skip


def flush_alert(p: Pipeline, state: State) -> None:
    """Send the pending alert, then forget it. A failed publish leaves it for the next invocation."""
    alert = state.alert
    if not alert or not p.settings.alert_topic_arn:
        return
    try:
        p.sns.publish(TopicArn=p.settings.alert_topic_arn, Subject=f"image-features: {alert['subject']}"[:100],
                      Message=json.dumps({**alert, "status": state.last_run}, indent=2))  # fmt: skip
    except Exception:
        logger.exception("alert not sent; kept for the next invocation")
        return
    p.state.clear_alert(alert["id"])
    count("AlertsSent")


def schedule_tick(p: Pipeline) -> None:
    """One delayed message: it comes back once uploads should have settled, and starts the run if they have."""
    p.sqs.send_message(QueueUrl=p.settings.queue_url, MessageBody=json.dumps(TICK),
                       DelaySeconds=p.settings.quiet_seconds)  # fmt: skip


def dead_letter(p: Pipeline, malformed: list) -> list:
    """Send unreadable SQS bodies to the DLQ at once (retrying cannot fix them). Returns ids not sent."""
    failed = []
    for message_id, reason, body in malformed:
        text = body if isinstance(body, str) else json.dumps(body, default=str)
        logger.error("malformed message", extra={"message_id": message_id, "reason": reason,
                                                 "body_sha": digest(text or "")})  # fmt: skip
        count("MalformedMessages")
        if not p.settings.dead_letter_queue_url:
            failed.append(message_id)  # no DLQ configured: let SQS redrive it after maxReceiveCount
            continue
        try:
            p.sqs.send_message(
                QueueUrl=p.settings.dead_letter_queue_url,
                MessageBody=text or "(empty)",
                MessageAttributes={
                    "reason": {"DataType": "String", "StringValue": reason[:256]},
                    "source_message_id": {"DataType": "String", "StringValue": message_id or "-"},
                },
            )
        except Exception:
            logger.exception("could not send to the dead-letter queue", extra={"message_id": message_id})
            failed.append(message_id)
    return failed
