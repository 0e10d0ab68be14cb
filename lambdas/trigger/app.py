"""Trigger: S3 upload events (through SQS, directly, or from EventBridge) -> a pending manifest -> one run."""

from __future__ import annotations

from dataclasses import asdict

from aws_lambda_powertools.utilities.idempotency import (
    DynamoDBPersistenceLayer,
    IdempotencyConfig,
    idempotent_function,
)
from pipeline import coordinator, settings
from pipeline.notifications import Change, parse
from pipeline.observability import count, logger, metrics, tracer
from pipeline.wiring import build_pipeline

SETTINGS = settings.load()
PIPELINE = build_pipeline(SETTINGS)
IDEMPOTENCY = IdempotencyConfig(event_key_jmespath="ids", expires_after_seconds=24 * 3600)
PERSISTENCE = DynamoDBPersistenceLayer(table_name=SETTINGS.table_name, boto3_client=PIPELINE.lock.db)


@idempotent_function(data_keyword_argument="batch", persistence_store=PERSISTENCE, config=IDEMPOTENCY)
def queue_batch(batch: dict) -> dict:
    """Keyed on bucket + key + sequencer of every change: a redelivered batch returns the first answer."""
    changes = [Change(**c) for c in batch["changes"]]
    return {"pending": PIPELINE.manifests.write_pending(changes), "images": len(changes)}


@logger.inject_lambda_context(log_event=False)  # events carry object keys: personal data
@tracer.capture_lambda_handler
@metrics.log_metrics(raise_on_empty_metrics=False)
def lambda_handler(event: dict, context) -> dict:
    IDEMPOTENCY.register_lambda_context(context)
    parsed = parse(event, SETTINGS.bucket, SETTINGS.images_prefix)
    failed_ids = coordinator.dead_letter(PIPELINE, parsed.malformed)
    count("EventsIgnored", sum(parsed.ignored.values()))
    if parsed.changes:
        changes = [{**asdict(c), "message_id": ""} for c in parsed.changes]
        queued = queue_batch(batch={"ids": sorted(c.identity for c in parsed.changes), "changes": changes})
        count("ImagesQueued", len(parsed.changes))
        content_hash = queued["pending"].rsplit("/", 1)[-1].removesuffix(".json")  # no key names in logs
        logger.info("batch queued", extra={"images": queued["images"], "manifest": content_hash})
    try:
        started = coordinator.start_next_run(PIPELINE, context.aws_request_id, SETTINGS.quiet_seconds)
        if started.reason == "settling" and parsed.changes:
            coordinator.schedule_tick(PIPELINE)
    except coordinator.StartFailed:
        logger.exception("run not started; the batch will be retried")
        if not parsed.from_sqs:
            raise  # direct S3/EventBridge invocations are retried by Lambda's async retries
        failed_ids += parsed.message_ids
        started = coordinator.StartResult(reason="failed")
    logger.info(
        "batch handled",
        extra={"images": len(parsed.changes), "ignored": dict(parsed.ignored), "malformed": len(parsed.malformed),
               "run": started.run_id or started.reason, "failed_items": len(failed_ids)},
    )  # fmt: skip
    if parsed.from_sqs:
        return {"batchItemFailures": [{"itemIdentifier": mid} for mid in dict.fromkeys(failed_ids)]}
    return {"images": len(parsed.changes), "run_started": started.run_id}
