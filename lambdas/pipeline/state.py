"""The pipeline's whole state: one DynamoDB item, changed only by conditional updates. It holds counts and
times, never an object key.

  gen                changes marked so far (one per batch that held any); dirty while gen > processed_gen
  processed_gen      the gen the last successful run started from
  first_change_at    earliest change not yet claimed by a run (for MAX_WAIT_SECONDS)
  last_change_at     latest change marked (for QUIET_SECONDS)
  covered_before     changes that happened before this were visible to a run already claimed (late duplicates)
  run                the active run: run_id, gen, claimed_at, first_change_at, attempt, [job_id, started_at];
                     cancel_requested_at, cancel_sent_at once it ran past its timeout and is being cancelled;
                     alerted_<incident>: when that incident of the run was alerted (each at most once)
  failures           consecutive failed runs; retry_at: not before; given_up_gen: no automatic run until gen moves
  given_up_on        what the run that gave up had: artifacts (ARTIFACTS_VERSION) and inputs (the images/ digest's
                     SHA-256, when it could be listed); the daily pass restarts it only if either has changed
  last_run           outcome of the last settled run, for people and alerts, with what it used and an estimate of
                     its price where EMR said (pipeline/costs.py)
  alert              an alert not yet sent (outbox: sent, then removed), so a failed publish is never lost
  cleanup_at         when a run must start so that the files of superseded snapshots go (erasure bound), from the
                     published report's maintenance.cleanup_due_at; cleanup_guessed: that time is a guess, the
                     report could not be read
  cleanup_pending    a cleanup came due and no run has succeeded since (its run failed: the give-up alert says so)
  outbox_<event id>  an EventBridge event not yet put (outbox, like alert: put, then removed), written by the settle
                     that claimed the run, so each settled run has one event, kept through a failed PutEvents
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from botocore.exceptions import ClientError

ITEM_ID = "pipeline"
ALERTED = "alerted_"  # run.alerted_<incident>: that incident was alerted once
OUTBOX = "outbox_"  # outbox_<event id>: an event to put on the bus
# Events kept while EventBridge refuses them (a denied PutEvents): the oldest go beyond this, so the one item stays
# far below DynamoDB's 400 KB and the pipeline runs on (about 2 KB each)
OUTBOX_MAX = 20
CLOCK_SKEW_S = 60  # margin between S3's event times and ours when deciding a change was already visible


class Conflict(RuntimeError):
    """A conditional update lost: the state moved since it was read (another invocation got there first)."""


@dataclass
class Run:
    run_id: str
    gen: int
    claimed_at: float
    first_change_at: float
    attempt: int
    job_id: str = ""
    started_at: float = 0.0
    cancel_requested_at: float = 0.0
    cancel_sent_at: float = 0.0


@dataclass
class State:
    gen: int = 0
    processed_gen: int = 0
    first_change_at: Optional[float] = None
    last_change_at: Optional[float] = None
    covered_before: Optional[float] = None
    run: Optional[Run] = None
    failures: int = 0
    retry_at: float = 0.0
    given_up_gen: int = -1
    given_up_on: Optional[dict] = None
    last_run: Optional[dict] = None
    alert: Optional[dict] = None
    cleanup_at: Optional[float] = None
    cleanup_guessed: bool = False
    cleanup_pending: bool = False
    outbox: dict = field(default_factory=dict)  # attribute name -> the event (JSON text)

    @property
    def dirty(self) -> bool:
        return self.gen > self.processed_gen

    @property
    def given_up(self) -> bool:
        return self.gen <= self.given_up_gen


def _num(item: dict, name: str, default=None):
    value = item.get(name)
    return default if value is None else float(value["N"])


def _s(value: str) -> dict:
    return {"S": value}


def _n(value: float) -> dict:
    # Times to the millisecond, rounded down: a change stored "now" is never in the future of "now".
    return {"N": repr(math.floor(value * 1000) / 1000) if isinstance(value, float) else str(value)}


class PipelineState:
    def __init__(self, dynamodb, table: str, clock: Callable[[], float] = time.time):
        self.db, self.table, self.clock = dynamodb, table, clock

    def _update(self, expression: str, values: dict, condition: Optional[str] = None, names: Optional[dict] = None):
        args = {"TableName": self.table, "Key": {"id": _s(ITEM_ID)}, "UpdateExpression": expression}
        if values:  # DynamoDB refuses an empty map
            args["ExpressionAttributeValues"] = values
        if condition:
            args["ConditionExpression"] = condition
        if names:
            args["ExpressionAttributeNames"] = names
        try:
            self.db.update_item(**args)
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                raise Conflict(expression.split(" ", 2)[1]) from None
            raise

    def read(self) -> State:
        item = self.db.get_item(TableName=self.table, Key={"id": _s(ITEM_ID)}, ConsistentRead=True).get("Item") or {}
        run = None
        if "run" in item:
            r = item["run"]["M"]
            run = Run(
                run_id=r["run_id"]["S"],
                gen=int(_num(r, "gen", 0)),
                claimed_at=_num(r, "claimed_at", 0.0),
                first_change_at=_num(r, "first_change_at", 0.0),
                attempt=int(_num(r, "attempt", 1)),
                job_id=r.get("job_id", {}).get("S", ""),
                started_at=_num(r, "started_at", 0.0),
                cancel_requested_at=_num(r, "cancel_requested_at", 0.0),
                cancel_sent_at=_num(r, "cancel_sent_at", 0.0),
            )
        return State(
            gen=int(_num(item, "gen", 0)),
            processed_gen=int(_num(item, "processed_gen", 0)),
            first_change_at=_num(item, "first_change_at"),
            last_change_at=_num(item, "last_change_at"),
            covered_before=_num(item, "covered_before"),
            run=run,
            failures=int(_num(item, "failures", 0)),
            retry_at=_num(item, "retry_at", 0.0),
            given_up_gen=int(_num(item, "given_up_gen", -1)),
            given_up_on=_plain(item["given_up_on"]) if "given_up_on" in item else None,
            last_run=_plain(item["last_run"]) if "last_run" in item else None,
            alert=_plain(item["alert"]) if "alert" in item else None,
            cleanup_at=_num(item, "cleanup_at"),
            cleanup_guessed=item.get("cleanup_guessed", {}).get("BOOL", False),
            cleanup_pending=item.get("cleanup_pending", {}).get("BOOL", False),
            outbox={name: value["S"] for name, value in item.items() if name.startswith(OUTBOX)},
        )

    # --- changes -------------------------------------------------------------------------------------
    def mark_dirty(self, changed_at: Optional[float]) -> bool:
        """Record that something changed (one update per batch, whatever its size). False when every change
        of the batch happened before a run already claimed started, which lists images/ later: covered."""
        now = self.clock()
        when = now if changed_at is None else min(changed_at, now)
        try:
            self._update(
                "SET gen = if_not_exists(gen, :zero) + :one, last_change_at = :now, "
                "first_change_at = if_not_exists(first_change_at, :now)",
                {":zero": _n(0), ":one": _n(1), ":now": _n(now), ":when": _n(when)},
                condition="attribute_not_exists(covered_before) OR covered_before < :when",
            )
            return True
        except Conflict:
            return False

    def mark_cleanup(self, seen_cleanup_at: float, revive: bool = False) -> None:
        """A cleanup is due: behave as if something changed, and forget the due time in the same write. revive: the
        pipeline had given up; the cleanup run gets attempts and back-off of its own (the erasure bound does not
        wait for a person). Raises Conflict if another invocation marked it already (or a settle set another time
        meanwhile)."""
        now = self.clock()
        revived = ", failures = :zero REMOVE cleanup_at, retry_at" if revive else " REMOVE cleanup_at"
        self._update(
            "SET gen = if_not_exists(gen, :zero) + :one, first_change_at = if_not_exists(first_change_at, :now), "
            "cleanup_marked_at = :now, cleanup_pending = :yes" + revived,
            {":zero": _n(0), ":one": _n(1), ":now": _n(now), ":seen": _n(int(seen_cleanup_at)), ":yes": {"BOOL": True}},
            condition="cleanup_at = :seen",
        )

    def mark_daily(self) -> None:
        """The daily reconciliation: behave as if something changed, so images that changed without an event
        (lifecycle expiry, lost notifications, images older than the stack) converge within a day."""
        now = self.clock()
        self._update(
            "SET gen = if_not_exists(gen, :zero) + :one, first_change_at = if_not_exists(first_change_at, :now), "
            "daily_marked_at = :now",
            {":zero": _n(0), ":one": _n(1), ":now": _n(now)},
        )

    # --- runs ----------------------------------------------------------------------------------------
    def claim(self, seen: State, run_id: str) -> Run:
        """Take the single run slot for the changes seen. Raises Conflict if the state moved since."""
        now = self.clock()
        run = Run(run_id, seen.gen, now, seen.first_change_at or now, attempt=seen.failures + 1)
        self._update(
            "SET #run = :run, covered_before = :covered REMOVE first_change_at",
            {
                ":run": {
                    "M": {
                        "run_id": _s(run.run_id),
                        "gen": _n(run.gen),
                        "claimed_at": _n(now),
                        "first_change_at": _n(run.first_change_at),
                        "attempt": _n(run.attempt),
                    }
                },
                ":covered": _n(now - CLOCK_SKEW_S),
                ":gen": _n(seen.gen),
            },  # fmt: skip
            condition="attribute_not_exists(#run) AND gen = :gen",
            names={"#run": "run"},
        )
        return run

    def record_job(self, run: Run, job_id: str) -> None:
        self._update(
            "SET #run.job_id = :job, #run.started_at = :now",
            {":job": _s(job_id), ":now": _n(self.clock()), ":id": _s(run.run_id)},
            condition="#run.run_id = :id",
            names={"#run": "run"},
        )
        run.job_id = job_id

    def request_cancel(self, run: Run, alert: dict) -> None:
        """Record, with its alert, that the run is to be cancelled. Conflict: another invocation did already."""
        self._once(run, "cancel_requested_at", alert)

    def record_cancel_sent(self, run: Run) -> None:
        self._update(
            "SET #run.cancel_sent_at = :now",
            {":now": _n(self.clock()), ":id": _s(run.run_id)},
            condition="#run.run_id = :id",
            names={"#run": "run"},
        )

    def alert_once(self, run: Run, incident: str, alert: dict) -> bool:
        """Queue the alert of one incident of the run, unless it was queued already. True if queued now."""
        try:
            self._once(run, ALERTED + incident, alert)
            return True
        except Conflict:
            return False

    def _once(self, run: Run, field: str, alert: dict) -> None:
        self._update(
            "SET #run.#field = :now, alert = :alert",
            {":now": _n(self.clock()), ":alert": _strings(alert), ":id": _s(run.run_id)},
            condition="#run.run_id = :id AND attribute_not_exists(#run.#field)",
            names={"#run": "run", "#field": field},
        )

    def settle(self, seen: State, succeeded: bool, outcome: dict, alert: Optional[dict], retry_base_s: int,
               max_attempts: int, given_up_on: Optional[dict] = None, cleanup_at: Optional[float] = None,
               cleanup_guessed: bool = False, event: Optional[tuple] = None) -> None:  # fmt: skip
        """End the active run, once: the condition on its run_id makes a retried invocation a Conflict.
        given_up_on: what the run had (digests only), kept if this failure gives up. cleanup_at (and whether it is
        a guess): when the next run must start for the published run's erasure cleanup; a success replaces it.
        event: (id, JSON text) for the outbox, in the same write: one event per settled run."""
        run, now = seen.run, self.clock()
        values = {":id": _s(run.run_id), ":last": _strings({**outcome, "ended_at": int(now)})}
        sets, removes = ["last_run = :last"], ["#run"]
        if succeeded:
            sets += ["processed_gen = :gen", "failures = :zero"]
            removes += ["retry_at", "given_up_gen", "given_up_on", "cleanup_pending"]
            values.update({":gen": _n(run.gen), ":zero": _n(0)})
            if cleanup_at is None:
                removes.append("cleanup_at")
            else:
                sets.append("cleanup_at = :cleanup")
                values[":cleanup"] = _n(int(cleanup_at))  # whole seconds: mark_cleanup's condition compares it
            if cleanup_guessed:
                sets.append("cleanup_guessed = :yes")
                values[":yes"] = {"BOOL": True}
            else:
                removes.append("cleanup_guessed")
        else:
            failures = seen.failures + 1
            sets += ["failures = :failures", "retry_at = :retry", "first_change_at = :first"]
            # Giving up freezes the back-off: no automatic retry comes anyway, and once the cause is fixed the next
            # change or deployment must get its run within the quiet period, not hours of doubled delay later.
            gives_up = failures >= max_attempts
            values.update({
                ":failures": _n(failures),
                ":retry": _n(now if gives_up else now + retry_delay_s(retry_base_s, seen.failures)),
                ":first": _n(run.first_change_at),  # its changes are unprocessed again, from when they began
            })  # fmt: skip
            if gives_up:
                sets += ["given_up_gen = :gen", "given_up_on = :on"]
                values.update({":gen": _n(seen.gen), ":on": _strings(given_up_on or {})})
        if alert:
            sets.append("alert = :alert")
            values[":alert"] = _strings(alert)
        names = {"#run": "run"}
        if event:
            sets.append("#event = :event")
            names["#event"], values[":event"] = OUTBOX + event[0], _s(event[1])
            for i, old in enumerate(dropped_events(seen)):
                removes.append(f"#old{i}")
                names[f"#old{i}"] = old
        expression = f"SET {', '.join(sets)} REMOVE {', '.join(removes)}"
        self._update(expression, values, condition="#run.run_id = :id", names=names)

    def record_usage(self, run_id: str, figures: dict) -> None:
        """Add what a settled run used to its last_run. Conflict: another run has settled since."""
        names = {f"#f{i}": name for i, name in enumerate(figures)}
        values = {f":f{i}": _s(str(value)) for i, value in enumerate(figures.values())}
        sets = ", ".join(f"last_run.{name} = {name.replace('#', ':')}" for name in names)
        self._update(f"SET {sets}", {**values, ":id": _s(run_id)}, condition="last_run.run_id = :id", names=names)

    def clear_event(self, name: str) -> None:
        """An event was put: out of the outbox (absent already: another invocation put it too, at least once)."""
        with contextlib.suppress(Conflict):
            self._update("REMOVE #event", {}, condition="attribute_exists(#event)", names={"#event": name})

    def clear_alert(self, alert_id: str) -> None:
        # Conflict: a newer alert replaced it, or another invocation sent and removed it already.
        with contextlib.suppress(Conflict):
            self._update("REMOVE alert", {":id": _s(alert_id)}, condition="alert.id = :id")


def dropped_events(seen: State) -> list:
    """The outbox entries a new event pushes out: the oldest beyond OUTBOX_MAX (run ids sort by time)."""
    return sorted(seen.outbox)[: max(0, len(seen.outbox) + 1 - OUTBOX_MAX)]


def retry_delay_s(base_s: int, failures_before: int) -> int:
    """How long after its failure a run is retried: doubling per consecutive failure, capped at 2^8 x base."""
    return base_s * 2 ** min(failures_before, 8)


def _strings(value: dict) -> dict:
    """A flat dict as a DynamoDB map of strings (the inverse of _plain)."""
    return {"M": {k: _s(str(v)) for k, v in value.items()}}


def _plain(value: dict) -> dict:
    return {k: next(iter(v.values())) for k, v in value["M"].items()}
