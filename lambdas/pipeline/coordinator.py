"""What the functions do: queue uploads, start at most one run, and settle a run when it ends."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from pipeline.launchers import JobOutcome
from pipeline.lock import RunLock
from pipeline.manifests import ManifestStore
from pipeline.notifications import TICK
from pipeline.observability import count, digest, logger
from pipeline.settings import Settings


class StartFailed(RuntimeError):
    """The run could not be started; the lock was released and the pending manifests kept."""


@dataclass
class Pipeline:
    settings: Settings
    manifests: ManifestStore
    lock: RunLock
    launcher: object  # ServerlessLauncher | Ec2Launcher
    sqs: object = None
    sns: object = None
    clock: Callable[[], float] = field(default=time.time)


@dataclass
class StartResult:
    run_id: Optional[str] = None
    reason: str = "started"  # started | active | settling | nothing | duplicates


def start_next_run(p: Pipeline, owner: str, quiet_s: int = 0) -> StartResult:
    """If no run is active, merge every pending manifest into one run and start it.

    quiet_s > 0 waits until the newest pending manifest is that old, so a burst of uploads spread over
    many invocations becomes one run; the delayed tick sent by the trigger comes back to start it."""
    if not p.lock.acquire(owner, p.settings.lock_lease_seconds):
        count("RunsDeferred")
        logger.info("a run is active; pending manifests wait for it to end")
        return StartResult(reason="active")
    try:
        pending = p.manifests.list_pending()
        if not pending:
            p.lock.release(owner)
            return StartResult(reason="nothing")
        newest_age = p.clock() - max(pending.values())
        if quiet_s and newest_age < quiet_s:
            p.lock.release(owner)
            logger.info("uploads still arriving; run starts once they settle", extra={"age_s": round(newest_age)})
            return StartResult(reason="settling")
        keys = list(pending)
        plan = p.manifests.plan_run(keys)
        if plan.empty:  # every change was processed by an earlier run (late duplicates)
            p.manifests.delete(keys)
            p.lock.release(owner)
            logger.info("pending manifests held only processed events", extra={"manifests": len(keys)})
            return StartResult(reason="duplicates")
        manifest_uri = p.manifests.write_run(plan)
        job_id = p.launcher.start(plan.run_id, manifest_uri)
        p.lock.record_run(owner, plan.run_id, p.launcher.engine, job_id, p.settings.lock_lease_seconds)
    except Exception as exc:
        p.lock.release(owner)
        raise StartFailed(f"could not start a run: {type(exc).__name__}: {exc}") from exc
    count("RunsStarted")
    logger.info(
        "run started",
        extra={"run_id": plan.run_id, "job_id": job_id, "engine": p.launcher.engine, "attempt": plan.attempt,
               "added": len(plan.added), "removed": len(plan.removed), "manifests": len(keys)},
    )  # fmt: skip
    return StartResult(run_id=plan.run_id)


def schedule_tick(p: Pipeline) -> None:
    """One delayed message per batch: it returns after the quiet period and starts the run if all is calm."""
    p.sqs.send_message(
        QueueUrl=p.settings.queue_url, MessageBody=json.dumps(TICK), DelaySeconds=p.settings.quiet_seconds
    )


def finish_run(p: Pipeline, outcome: JobOutcome, owner: str) -> dict:
    """Settle the active run named by a state-change event, release the lock, start what waits."""
    active = p.lock.active()
    if active is None or active.job_id != outcome.job_id or active.engine != outcome.engine:
        # Duplicate or stale event (EventBridge is at least once): the run was settled already.
        logger.info("state event for a run that is not active; ignored", extra={"job_id": outcome.job_id})
        count("StateEventsIgnored")
        # Still look for waiting work: this may be the retry of an event whose first start attempt failed.
        return {"settled": None, "next_run": start_next_run(p, owner).run_id}
    if outcome.succeeded:
        processed = p.manifests.complete(active.run_id)
        count("RunsSucceeded")
        count("ImagesProcessed", processed)
        logger.info("run succeeded", extra={"run_id": active.run_id, "images": processed})
    else:
        abandoned = p.manifests.fail(active.run_id, p.settings.max_attempts)
        count("RunsFailed")
        logger.warning("run failed", extra={"run_id": active.run_id, "state": outcome.state,
                                            "abandoned_manifests": len(abandoned)})  # fmt: skip
        notify_failure(p, active.run_id, outcome, abandoned)
    p.lock.release(active.owner)
    next_run = start_next_run(p, owner).run_id  # work that waited for this run has waited long enough
    return {"settled": active.run_id, "succeeded": outcome.succeeded, "next_run": next_run}


def notify_failure(p: Pipeline, run_id: str, outcome: JobOutcome, abandoned: list) -> None:
    if not p.settings.alert_topic_arn:
        return
    gave_up = f"; gave up on {len(abandoned)} manifest(s), moved to failed/" if abandoned else "; will retry"
    p.sns.publish(
        TopicArn=p.settings.alert_topic_arn,
        Subject=f"image-features run {outcome.state.lower()}"[:100],
        Message=json.dumps(
            {
                "run_id": run_id,
                "engine": outcome.engine,
                "job_id": outcome.job_id,
                "state": outcome.state,
                "detail": outcome.detail,
                "run_manifest": p.manifests.uri(p.manifests.run_manifest_key(run_id)),
                "abandoned_manifests": abandoned,
                "summary": f"run {run_id} ended {outcome.state}{gave_up}",
            },
            indent=2,
        ),
    )
    if abandoned:
        count("RunsAbandoned")


def dead_letter(p: Pipeline, malformed: list) -> list:
    """Send unparseable SQS bodies to the DLQ at once (retrying cannot fix them). Returns ids not sent."""
    failed = []
    for message_id, reason, body in malformed:
        logger.error("malformed message", extra={"message_id": message_id, "reason": reason,
                                                 "body_sha": digest(body or "")})  # fmt: skip
        count("MalformedMessages")
        if not p.settings.dead_letter_queue_url:
            failed.append(message_id)  # no DLQ configured: let SQS redrive it after maxReceiveCount
            continue
        try:
            p.sqs.send_message(
                QueueUrl=p.settings.dead_letter_queue_url,
                MessageBody=body or "",
                MessageAttributes={
                    "reason": {"DataType": "String", "StringValue": reason[:256]},
                    "source_message_id": {"DataType": "String", "StringValue": message_id or "-"},
                },
            )
        except Exception:
            logger.exception("could not send to the dead-letter queue", extra={"message_id": message_id})
            failed.append(message_id)
    return failed
