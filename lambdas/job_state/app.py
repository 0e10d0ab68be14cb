"""Job state: an EMR run reached an end state -> settle its manifests, release the lock, start the next run."""

from __future__ import annotations

from pipeline import coordinator, settings
from pipeline.launchers import parse_state_event
from pipeline.observability import logger, metrics, tracer
from pipeline.wiring import build_pipeline

SETTINGS = settings.load()
PIPELINE = build_pipeline(SETTINGS)


@logger.inject_lambda_context(log_event=False)
@tracer.capture_lambda_handler
@metrics.log_metrics(raise_on_empty_metrics=False)
def lambda_handler(event: dict, context) -> dict:
    outcome = parse_state_event(event)
    if outcome is None or outcome.engine != SETTINGS.engine:
        logger.debug("not an end state of this stack's engine", extra={"detail_type": event.get("detail-type")})
        return {"settled": None}
    # A StartFailed here propagates: EventBridge's async retry comes back and finds the waiting work.
    return coordinator.finish_run(PIPELINE, outcome, owner=context.aws_request_id)
