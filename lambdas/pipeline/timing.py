"""When a run starts, and what restarts a pipeline that gave up: pure functions over the state item, shared by the
functions (control.maybe_start) and the operator's `status`, which cannot load the functions' Powertools."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pipeline.state import State

GAVE_UP = "no more automatic runs until a new upload, a new deployment, or images changed without an event (seen daily)"  # noqa: E501


@dataclass(frozen=True)
class NextStart:
    """What maybe_start does now: active | clean | given-up | backoff | settling | start; at: from when a start is
    due (None: not without a new change); by: quiet | max-wait | retry | now."""

    reason: str
    at: Optional[float] = None
    by: Optional[str] = None


def next_start(state: State, quiet_s: int, max_wait_s: int, now: float) -> NextStart:
    """A run starts once the pipeline is dirty, no run is active, it has not given up, any back-off has passed, and
    uploads paused for quiet_s (or the first waiting change is max_wait_s old): the first time all of these hold."""
    if state.run is not None:
        return NextStart("active")
    if not state.dirty:
        return NextStart("clean")
    if state.given_up:
        return NextStart("given-up")
    # quiet: no change for quiet_s (no change recorded: quiet already); overdue: waiting for max_wait_s
    quiet_at = -float("inf") if state.last_change_at is None else state.last_change_at + quiet_s
    overdue_at = float("inf") if state.first_change_at is None else state.first_change_at + max_wait_s
    settled_at, by = (quiet_at, "quiet") if quiet_at <= overdue_at else (overdue_at, "max-wait")
    if now < state.retry_at:
        return NextStart("backoff", max(state.retry_at, settled_at), "retry" if state.retry_at >= settled_at else by)
    if now < settled_at:
        return NextStart("settling", settled_at, by)
    return NextStart("start", now, "now")
