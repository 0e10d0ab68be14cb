"""The control loop the three entry points share: changes mark the pipeline dirty, at most one run starts when
uploads settle, a run's end is settled exactly once, and a schedule repairs whatever an event failed to do.

Every function reads the one state item, acts, and writes back conditionally, so any of them may run twice,
late, concurrently or not at all and the next one picks up where it stopped (controller-runtime's Reconcile)."""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

from aws_lambda_powertools.metrics import MetricUnit

from pipeline import costs, events
from pipeline.inputs import current_inputs, published_report
from pipeline.launchers import JobOutcome, StartBlocked, StartRefused
from pipeline.notifications import TICK
from pipeline.observability import count, digest, logger, measure
from pipeline.settings import Settings
from pipeline.state import Conflict, PipelineState, Run, State, dropped_events, retry_delay_s
from pipeline.timing import GAVE_UP, next_start

STARTING_GRACE_S = 300  # a claim without a job id older than this lost its starter (the function timeout is 120 s)
# A start that EMR has not confirmed for this long after its claim (about six reconcile passes, each with the SDK's own
# retries) ends as a failed attempt, once EMR lists no job of the run: an outage past this needs the back-off and
# a person, and its alert comes within the hour that erasures are promised in.
START_CONFIRM_S = 1800
TIMEOUT_SLACK_S = 900  # EMR stops a run at its timeout; past this too the reconciler cancels it (and alerts again)
# The published report could not be read as a run succeeded: guess that a cleanup is due this much later. A run then
# deletes what is due by then and its report says what is left; a sooner due time is late by at most this.
CLEANUP_GUESS_S = 1800


@dataclass
class Pipeline:
    settings: Settings
    state: PipelineState
    launcher: object  # ServerlessLauncher | Ec2Launcher
    sqs: object = None
    sns: object = None
    s3: object = None
    events: object = None  # EventBridge, for the default bus


@dataclass
class Started:
    reason: str  # started | starting | active | clean | given-up | backoff | settling | raced | refused | blocked
    # | unconfirmed
    run_id: Optional[str] = None


def new_run_id(now: float) -> str:
    return "run-" + datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


# --- entry points ------------------------------------------------------------------------------------------
def on_changes(p: Pipeline, changes: int, latest_change_at: Optional[float]) -> bool:
    """Uploads, deletions or expiries happened: mark dirty. False if all were visible to a claimed run already."""
    marked = p.state.mark_dirty(latest_change_at)
    count("ChangesMarked" if marked else "ChangesAlreadyCovered", changes)
    return marked


def maybe_start(p: Pipeline, hurry: bool = False) -> Started:
    """Start a run if the pipeline is dirty, no run is active, and uploads have settled (or waited too long).
    hurry: an erasure cleanup is due: start without waiting for uploads to settle or for a back-off to end."""
    state = p.state.read()
    flush(p, state)
    now, s = p.state.clock(), p.settings
    if state.run is not None:
        if not state.run.job_id and now - state.run.claimed_at > STARTING_GRACE_S:
            return _launch(p, state, state.run)  # its starter died between the claim and the job id
        return Started("active", state.run.run_id)
    due = next_start(state, s.quiet_seconds, s.max_wait_seconds, now)
    if due.reason != "start" and not (hurry and due.reason in ("settling", "backoff")):
        return Started(due.reason)  # clean | given-up | backoff | settling
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
    cancel a run past its timeout, start a run for a due erasure cleanup, and start a deferred run."""
    state = p.state.read()
    flush(p, state)
    run, now = state.run, p.state.clock()
    if run is None and state.given_up and (state.given_up_on or {}).get("artifacts") != p.settings.artifacts_version:
        # A deployment since the pipeline gave up may be the fix: one more attempt now, not at the daily pass
        logger.info("given up, and other artifacts are deployed now: one more attempt")
        p.state.mark_daily()
    if run is None and state.cleanup_at is not None and now >= state.cleanup_at:
        hurry = _mark_cleanup(p, state, now)  # also when given up: the erasure bound waits for no one
        return {"reconciled": "cleanup" if hurry else "start", "next": maybe_start(p, hurry).reason}
    if run is None or not run.job_id:
        return {"reconciled": "start", "next": maybe_start(p).reason}
    outcome = p.launcher.status(run.job_id)
    if outcome is not None:
        logger.info("run ended without its state event reaching us; settled from EMR", extra={"run_id": run.run_id})
        count("RunsSettledByReconciler")
        return {"reconciled": "settled", **settle(p, outcome)}
    limit = p.settings.job_timeout_minutes * 60 + TIMEOUT_SLACK_S
    if run.cancel_requested_at or now - (run.started_at or run.claimed_at) > limit:
        return _cancel(p, run, now)
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
        due = (report.get("maintenance") or {}).get("cleanup_due_at")
        if due and _epoch(due) <= p.state.clock():
            return "cleanup due"  # superseded snapshots' files wait for a run (the reconciler starts one sooner)
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
        return _fail_start(p, run, "START_REFUSED", str(exc), "refused")
    except StartBlocked as exc:
        # Never a second job: the run keeps its claim and starts once EMR lists no other job of this stack.
        logger.error("another job of this stack is active; not starting", extra={"run_id": run.run_id,
                                                                                 "reason": str(exc)})  # fmt: skip
        count("RunStartsBlocked")
        _alert_once(p, run, "blocked", f"run {run.run_id} waits: another job of this stack is active", "BLOCKED",
                    f"{exc}; at most one job runs, so this run starts once that one has ended (retried at every "
                    "reconcile pass); see docs/DEPLOY.md, Operations")  # fmt: skip
        return Started("blocked", run.run_id)
    except Exception:
        # The request may have started a job whose answer was lost: keep the claim, retry with the same token.
        logger.exception("run start not confirmed; the reconciler retries it", extra={"run_id": run.run_id})
        count("RunStartsUnconfirmed")
        if p.state.clock() - run.claimed_at > START_CONFIRM_S:
            return _unconfirmed(p, run)
        return Started("starting", run.run_id)
    return _record(p, run, job_id)


def _unconfirmed(p: Pipeline, run: Run) -> Started:
    """A start unconfirmed for START_CONFIRM_S: adopt its job if EMR lists one, else end it as a failed attempt. If
    EMR cannot be asked, a job may exist: the claim stays (at most one run) and a person is told, once."""
    minutes = int(p.state.clock() - run.claimed_at) // 60
    try:
        job_id = p.launcher.find(run.run_id)
    except Exception:
        logger.exception("cannot tell whether the unconfirmed start made a job; the run keeps its claim",
                         extra={"run_id": run.run_id})  # fmt: skip
        _alert_once(p, run, "unconfirmed", f"run {run.run_id} start unconfirmed for {minutes} minutes",
                    "START_UNCONFIRMED", "EMR neither confirms the start nor lists its jobs; the run keeps its claim "
                    "(a job may exist) and the reconciler keeps trying; see docs/DEPLOY.md, Operations")  # fmt: skip
        return Started("starting", run.run_id)
    if job_id:
        logger.info("the unconfirmed start did make its job: adopted", extra={"run_id": run.run_id})
        count("RunStartsAdopted")
        return _record(p, run, job_id)
    detail = f"EMR did not confirm the start for {minutes} minutes and lists no job of this run"
    return _fail_start(p, run, "START_UNCONFIRMED", detail, "unconfirmed")


def _fail_start(p: Pipeline, run: Run, state: str, detail: str, reason: str) -> Started:
    """No job exists for the run: end it as a failed attempt (back-off, attempts, give-up, one alert)."""
    current = p.state.read()
    if current.run is None or current.run.run_id != run.run_id:
        return Started("raced", run.run_id)
    _end(p, current, JobOutcome(p.launcher.engine, run.job_id, False, state, detail))
    return Started(reason, run.run_id)


def _record(p: Pipeline, run: Run, job_id: str) -> Started:
    try:
        p.state.record_job(run, job_id)
    except Conflict:
        return Started("raced", run.run_id)
    count("RunsStarted")
    logger.info("run started", extra={"run_id": run.run_id, "job_id": job_id, "engine": p.launcher.engine,
                                      "attempt": run.attempt, "changes_since": run.first_change_at})  # fmt: skip
    return Started("started", run.run_id)


def _cancel(p: Pipeline, run: Run, now: float) -> dict:
    """A run past its timeout: cancel it, once, with one alert. Its slot stays taken until EMR reports it ended,
    then it settles as a failed attempt. A cancel that fails is asked again at the next pass; a run still not
    ended TIMEOUT_SLACK_S after the cancel is alerted once more, for a person."""
    s = p.settings
    if not run.cancel_requested_at:
        minutes = int(now - (run.started_at or run.claimed_at)) // 60
        alert = _alert(f"run {run.run_id} cancelled after {minutes} minutes", run, "CANCELLING",
                       f"still running past JOB_TIMEOUT_MINUTES ({s.job_timeout_minutes}) and EMR did not stop it: "
                       "the reconciler cancels it; once EMR reports it ended it counts as a failed attempt, and the "
                       "next run follows the back-off")  # fmt: skip
        try:
            p.state.request_cancel(run, alert)
        except Conflict:
            return {"reconciled": "cancelling", "run_id": run.run_id}  # another pass requested it (or it settled)
        run.cancel_requested_at = now
        count("RunsCancelled")
        logger.warning("run past its timeout; cancelling it", extra={"run_id": run.run_id, "minutes": minutes})
    if not run.cancel_sent_at:
        try:
            p.launcher.cancel(run.job_id)
            p.state.record_cancel_sent(run)
        except Conflict:
            pass  # settled meanwhile
        except Exception:
            logger.exception("cancel not confirmed; the next reconcile pass asks again", extra={"run_id": run.run_id})
            count("RunCancelsUnconfirmed")
    if now - run.cancel_requested_at > TIMEOUT_SLACK_S:
        minutes = int(now - run.cancel_requested_at) // 60
        why = "" if run.cancel_sent_at else " (the cancel call itself fails)"
        _alert_once(p, run, "stuck", f"run {run.run_id} not ended {minutes} minutes after its cancel", "CANCELLING",
                    f"EMR has not ended the run since the reconciler cancelled it{why}; no other run starts until it "
                    "ends: it needs a person; see docs/DEPLOY.md, Operations")  # fmt: skip
    flush(p, p.state.read())
    return {"reconciled": "cancelling", "run_id": run.run_id}


def _mark_cleanup(p: Pipeline, state: State, now: float) -> bool:
    """The erasure cleanup the published run asked for is due: mark the pipeline dirty, once. True if marked here."""
    try:
        p.state.mark_cleanup(state.cleanup_at, revive=state.given_up)
    except Conflict:
        return False  # another pass marked it
    count("CleanupRunsDue")
    logger.info("erasure cleanup due; starting a run", extra={"late_s": int(now - state.cleanup_at),
                                                               "guessed": state.cleanup_guessed,
                                                               "given_up": state.given_up})  # fmt: skip
    return True


def _alert_once(p: Pipeline, run: Run, incident: str, subject: str, state: str, detail: str) -> None:
    if p.state.alert_once(run, incident, _alert(subject, run, state, detail)):
        flush(p, p.state.read())


def _end(p: Pipeline, state: State, outcome: JobOutcome) -> None:
    run, s = state.run, p.settings
    record = {"run_id": run.run_id, "state": outcome.state, "attempt": run.attempt, "detail": outcome.detail[:500]}
    used = costs.summary(outcome.usage, s.price_vcpu_hour, s.price_gb_hour) if outcome.usage else {}
    record.update(costs.as_strings(used))  # the reconciler's answer from EMR says already what the job used
    if run.cancel_requested_at:
        record["cancelled"] = "past its timeout, by the reconciler"
    alert = None
    given_up_on = None
    cleanup_at, guessed = None, False
    # A run that published is settled as published whatever its exit status: a step after its swap failed (orphan
    # removal, the Glue sync), which the next run does again; its cleanup time must be kept (the erasure bound).
    # No job, no report to read (a refused start; the trigger may not read it).
    report, unreadable = _read_report(p, run) if outcome.job_id else (None, False)
    published = report if report and report.get("launch_id") == run.run_id else None
    kind = events.PUBLISHED if published is not None else None
    if outcome.succeeded or published is not None:
        cleanup_at, guessed, alert = _cleanup_after(p, state, report, unreadable)
    if published is not None and not outcome.succeeded:
        record["published"] = "yes"
        due = f"; the erasure cleanup run starts at {_iso(cleanup_at)}" if cleanup_at else ""
        alert = alert or _alert(f"run {run.run_id} published, then ended {outcome.state}", run, outcome.state,
                                f"{outcome.detail}; its results are published and current; the step that failed "
                                f"after publishing is done again by the next run{due}")  # fmt: skip
    elif not outcome.succeeded:
        gave_up = state.failures + 1 >= s.max_attempts
        kind = events.GAVE_UP if gave_up else events.FAILED
        if gave_up:
            given_up_on = {"artifacts": s.artifacts_version, **_inputs_sha(p)}
        delay_min = retry_delay_s(s.retry_base_seconds, state.failures) // 60
        then = GAVE_UP + _cleanup_left(state) if gave_up else f"retrying in {delay_min} minutes"
        if gave_up or not run.cancel_requested_at:  # a cancelled run was alerted as the cancel was requested
            alert = _alert(f"run {run.run_id} ended {outcome.state}", run, outcome.state, f"{outcome.detail}; {then}")
    event = kind and events.build(kind, s.stage, s.bucket, s.results_prefix, run.run_id, run.attempt, outcome.state,
                                  outcome.detail, published, used)  # fmt: skip
    dropped = dropped_events(state) if event else []  # what the settle pushes out of a full outbox
    try:
        p.state.settle(state, outcome.succeeded or published is not None, record, alert, s.retry_base_seconds,
                       s.max_attempts, given_up_on, cleanup_at, guessed, event or None)  # fmt: skip
    except Conflict:
        logger.info("run already settled by another invocation", extra={"run_id": run.run_id})
        return
    if dropped:
        logger.error("events EventBridge kept refusing were dropped", extra={"dropped": len(dropped)})
        count("EventsDropped", len(dropped))
    count("RunsSucceeded" if outcome.succeeded else "RunsFailed")
    if published is not None and not outcome.succeeded:
        count("RunsFailedAfterPublishing")
    _run_metrics(run, published, p.state.clock())
    if outcome.usage is None and outcome.job_id:
        used = _usage_after_settle(p, run, outcome.job_id)
    _emit_costs(used)
    logger.info("run settled", extra={**record, **costs.as_strings(used), "cleanup_at": cleanup_at,
                                      "event": kind})  # fmt: skip
    if alert or event:
        flush(p, p.state.read())


# Per settled run, for the dashboard: its length, and what it did when it published (report.json's counts)
RUN_METRICS = {"images_total": "ImagesTotal", "images_featurized": "ImagesFeaturized",
               "images_failed_this_run": "ImagesFailed", "images_removed": "ImagesRemoved"}  # fmt: skip


def _run_metrics(run: Run, published: Optional[dict], now: float) -> None:
    measure("RunDurationSeconds", round(now - (run.started_at or run.claimed_at), 1), MetricUnit.Seconds)
    if published is None:
        return
    for field, metric in RUN_METRICS.items():
        if published.get(field) is not None:
            count(metric, int(published[field]), always=True)


def _emit_costs(figures: dict) -> None:
    """One metric per figure of what the run used: the hours its estimate is priced on, and the estimate."""
    on = costs.basis(figures)
    for name, metric in costs.METRICS.items():
        value = figures.get(name if name == "estimated_usd" else on + name, figures.get(name))
        if value is not None:
            measure(metric, value)


def _read_report(p: Pipeline, run: Run) -> tuple:
    """(the published report or None, whether it could not be read). Unreadable: a failed run settles as failed, as
    before report.json recorded launch ids; a successful one guesses its cleanup (_cleanup_after)."""
    s = p.settings
    try:
        return published_report(p.s3, s.bucket, s.results_prefix), False
    except Exception:
        logger.exception("the published report could not be read as the run settled", extra={"run_id": run.run_id})
        count("ReportUnreadableAtSettle")
        return None, True


def _usage_after_settle(p: Pipeline, run: Run, job_id: str) -> dict:
    """What the run used, which EMR's end event does not say: asked of EMR once the run is settled, so that EMR's
    errors or slowness never hold the settle up, and added to last_run. A failure records nothing."""
    s = p.settings
    try:
        used = costs.summary(p.launcher.usage(job_id), s.price_vcpu_hour, s.price_gb_hour)
        if used:
            p.state.record_usage(run.run_id, costs.as_strings(used))
        return used
    except Exception:
        logger.exception("the run's resource use could not be read or recorded", extra={"run_id": run.run_id})
        count("RunUsageUnreadable")
        return {}


def _cleanup_left(state: State) -> str:
    """What the give-up alert adds when the erasure bound is at stake."""
    if state.cleanup_pending:
        return ("; an erasure cleanup is pending: files of superseded snapshots may still hold erased images until a "
                "run succeeds (docs/DEPLOY.md, The erasure cleanup)")  # fmt: skip
    if state.cleanup_at is not None:
        return f"; the erasure cleanup due at {_iso(state.cleanup_at)} starts a run then all the same"
    return ""


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="seconds")


def _cleanup_after(p: Pipeline, state: State, report: Optional[dict], unreadable: bool) -> tuple:
    """(cleanup_at, guessed, alert) as a run succeeds (or published): when the next run must start so that the files
    of superseded snapshots go (the published report's maintenance.cleanup_due_at), or None. A report that cannot be
    read (or parsed) never fails the settle: a cleanup run is guessed CLEANUP_GUESS_S later; if that run cannot read it
    either, guessing stops (else one run per guess, forever) and a person is told."""
    s, run = p.settings, state.run
    try:
        if unreadable:
            raise ValueError("report.json could not be read")
        due = ((report or {}).get("maintenance") or {}).get("cleanup_due_at")
        due = _epoch(due) if due else None
        if due is not None and due <= (run.started_at or run.claimed_at):
            # It started after the time and still says it is due: a run at once would do the same, pass after pass
            logger.warning("the settled run left a cleanup that was due before it started", extra={"due_at": due})
            count("CleanupDueRepeated")
            due = math.ceil(p.state.clock() + CLEANUP_GUESS_S)
        return due, False, None
    except Exception:
        logger.exception("the published report could not be read as the run settled; guessing the cleanup")
        count("CleanupDueUnreadable")
    if state.cleanup_guessed:
        return None, False, _alert("erasure cleanup cannot be scheduled", run, "REPORT_UNREADABLE",
                                   f"{s.results_prefix}report.json could not be read after two successful runs in a "
                                   "row, so files of superseded snapshots may outlive the erasure bound; the daily "
                                   "pass still runs; see docs/DEPLOY.md, Operations")  # fmt: skip
    return math.ceil(p.state.clock() + CLEANUP_GUESS_S), True, None


def _epoch(text) -> int:
    """An ISO-8601 time (UTC if it names no zone) -> epoch seconds, rounded up: a run never starts before it."""
    when = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return math.ceil((when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp())


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


def flush(p: Pipeline, state: State) -> None:
    """The outbox: the pending alert and events, each removed once sent; what fails waits for the next invocation."""
    flush_alert(p, state)
    flush_events(p, state)


def flush_events(p: Pipeline, state: State) -> None:
    """Put the pending events on the default bus (at least once: an answer lost after PutEvents puts it again, with
    the same detail id), then forget each one EventBridge took."""
    names = sorted(state.outbox)
    for start in range(0, len(names), events.PUT_EVENTS_MAX):
        batch = names[start : start + events.PUT_EVENTS_MAX]
        try:
            answer = p.events.put_events(Entries=[events.entry(state.outbox[name]) for name in batch])
        except Exception:
            logger.exception("events not put; kept for the next invocation")
            count("EventsUnsent", len(batch))
            return
        for name, result in zip(batch, answer.get("Entries", [])):
            if result.get("EventId"):
                p.state.clear_event(name)
                count("EventsPut")
            else:  # a per-entry failure (throttled, internal): kept
                logger.warning("event not put; kept", extra={"error": result.get("ErrorCode")})
                count("EventsUnsent")


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
