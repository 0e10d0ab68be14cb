"""Job state and schedule: EMR says a run ended -> settle it once, start the next; the schedule reconciles
(every few minutes: lost end events, unconfirmed starts, runs past their timeout, due erasure cleanups) and marks
the pipeline dirty (once a day)."""

from __future__ import annotations

from pipeline import control, settings
from pipeline.launchers import parse_state_event
from pipeline.observability import logger, metrics, tracer
from pipeline.wiring import build_pipeline

SETTINGS = settings.load()
PIPELINE = build_pipeline(SETTINGS)
ACTIONS = {"reconcile": control.reconcile, "daily": control.daily}


@logger.inject_lambda_context(log_event=False)
@tracer.capture_lambda_handler
@metrics.log_metrics(raise_on_empty_metrics=False)
def lambda_handler(event: dict, context) -> dict:
    action = event.get("action") if isinstance(event, dict) else None
    if action in ACTIONS:  # the schedules' input (template.yaml)
        result = ACTIONS[action](PIPELINE)
        logger.info("scheduled pass", extra={"action": action, **result})
        return result
    outcome = parse_state_event(event)
    if outcome is None or outcome.engine != SETTINGS.engine:
        logger.debug("not an end state of this stack's engine", extra={"detail_type": event.get("detail-type")})
        return {"settled": None}
    # An exception here propagates: EventBridge retries, and the settle is conditional, so it counts once.
    return control.settle(PIPELINE, outcome)
