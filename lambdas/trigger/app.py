"""Trigger: S3 changes (through SQS, directly, or from EventBridge) -> mark the pipeline dirty -> maybe start.

Events only say "something changed, run soon": the run lists images/ itself. So a lost, duplicated or
reordered event can delay results, never corrupt them, and nothing here keeps an object key."""

from __future__ import annotations

from pipeline import control, settings
from pipeline.notifications import parse
from pipeline.observability import count, logger, metrics, tracer
from pipeline.wiring import build_pipeline

SETTINGS = settings.load()
PIPELINE = build_pipeline(SETTINGS)


@logger.inject_lambda_context(log_event=False)  # events carry object keys: personal data
@tracer.capture_lambda_handler
@metrics.log_metrics(raise_on_empty_metrics=False)
def lambda_handler(event: dict, context) -> dict:
    signals = parse(event, SETTINGS.bucket, SETTINGS.images_prefix)
    failed_ids = control.dead_letter(PIPELINE, signals.malformed)
    count("EventsIgnored", sum(signals.ignored.values()))
    if signals.changes:
        try:
            control.on_changes(PIPELINE, signals.changes, signals.latest_change_at)
        except Exception:
            logger.exception("could not mark the pipeline dirty; the batch will be retried")
            if not signals.from_sqs:
                raise  # direct S3/EventBridge invocations are retried by Lambda's async retries
            malformed = {mid for mid, _, _ in signals.malformed}
            return _response(event, failed_ids + [mid for mid in _message_ids(event) if mid not in malformed])
    started = control.Started("idle")
    if signals.changes or signals.ticks:
        try:
            started = control.maybe_start(PIPELINE)
        except Exception:  # the change is recorded: the schedule starts the run if this invocation cannot
            logger.exception("run not started now; the reconciler will")
        if started.reason == "settling" and signals.changes:
            control.schedule_tick(PIPELINE)
    logger.info("batch handled", extra={"changes": signals.changes, "ticks": signals.ticks,
                                        "ignored": dict(signals.ignored), "malformed": len(signals.malformed),
                                        "run": started.run_id or started.reason})  # fmt: skip
    if signals.from_sqs:
        return _response(event, failed_ids)
    return {"changes": signals.changes, "run": started.run_id, "reason": started.reason}


def _message_ids(event: dict) -> list:
    return [str(r.get("messageId") or "") for r in event.get("Records", []) if isinstance(r, dict)]


def _response(event: dict, failed_ids: list) -> dict:
    return {"batchItemFailures": [{"itemIdentifier": mid} for mid in dict.fromkeys(failed_ids)]}
