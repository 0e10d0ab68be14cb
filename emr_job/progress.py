"""A run's progress while it lasts: its stage, images done of total, rate and time left.

Three sinks, none ever holding an object key (counts and times only):
  <output>/progress/<launch id>.json  for a run the pipeline launched: `status` finds it from the state item alone;
                                      at most every PROGRESS_EVERY_S, removed by the run at its end (report.json
                                      supersedes it), and by the next launched run should this one be killed
  a rich progress bar                 at a terminal (`python -m emr_job`)
  plain log lines                     elsewhere (spark-submit, EMR's driver log), at most every PROGRESS_EVERY_S

advance() is on the featurizing path and touches only memory; stage() writes at once if the throttle allows; a
background thread writes what waits for the throttle, reads Spark's task counts and redraws the bar. Nothing here
ever fails a run: the progress is advisory."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Callable, Optional

from emr_job import storage

PROGRESS_EVERY_S = 10.0  # the object and the plain lines, at most this often
HEARTBEAT_S = 60.0  # an unchanged state is written again this often: updated_at tells a live run from a dead one
POLL_S = 0.5  # how often Spark's task counts are read and the bar redrawn
FOLDER = "progress"
STAGES = ("plan", "featurize", "write", "pca", "publish", "clean")


def progress_uri(output: str, launch_id: str) -> str:
    return storage.join(storage.normalize(output), FOLDER, f"{launch_id}.json")


class Progress:
    """The progress of one run (job_run_id), written to the object of launch_id under output when both are given."""

    def __init__(self, job_run_id: str, log: Callable = print, output: Optional[str] = None,
                 launch_id: Optional[str] = None, tty: bool = False, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):  # fmt: skip
        self.job_run_id, self.launch_id, self.log, self.clock, self.wall = job_run_id, launch_id, log, clock, wall
        self.output = storage.normalize(output) if output and launch_id else None
        self.uri = progress_uri(self.output, launch_id) if self.output else None
        self.started_at = _iso(wall())
        self._lock = threading.Lock()  # the state, which threads update
        self._write_lock = threading.Lock()  # snapshot and write together: a later state is never overwritten
        self._stage, self._done, self._total = STAGES[0], 0, 0
        self._rate_from: Optional[float] = None  # when featurizing began, and ended: the rate's interval
        self._rate_until: Optional[float] = None
        self._source: Optional[Callable[[], int]] = None
        self._version, self._written, self._last_write = 0, -1, None  # the state's changes, and what was written
        self._warned = False
        self._said: tuple = ()
        self._tty = tty
        self._bar = self._row = None
        self._bar_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._opened = clock()

    # --- what the job reports ---------------------------------------------------------------------------
    def stage(self, name: str, total: Optional[int] = None) -> None:
        """A new stage; total: the images it counts (done starts at 0). Leaving featurize, every image is done."""
        now = self.clock()
        with self._lock:
            ended = self._stage == "featurize" and name != "featurize" and self._total > 0
            if ended:
                self._done, self._rate_until = self._total, now
        if ended:  # the featurize stage's outcome, once, whatever the throttle
            outcome = self.snapshot(now)
            if self._bar:
                self._show(outcome)
            else:
                with self._write_lock:  # the throttled path may be saying it too
                    self._say(outcome)
        with self._lock:
            self._stage = name
            if total is not None:
                self._total, self._done = int(total), 0
            if name == "featurize":
                self._rate_from, self._rate_until = now, None
            self._version += 1
        self._show()
        self._flush()

    def count_from_now(self) -> None:
        """The images start flowing: the rate counts from now, not from the stage's start (Spark starting, the
        network loading), as the report's images_per_second does."""
        with self._lock:
            self._rate_from = self.clock()

    def advance(self, n: int = 1) -> None:
        """n more images done. Memory only: this is on the featurizing path."""
        with self._lock:
            self._done = min(self._done + n, self._total)
            self._version += 1

    def reach(self, done: int) -> None:
        """At least `done` images are done."""
        with self._lock:
            done = min(int(done), self._total)
            if done > self._done:
                self._done = done
                self._version += 1

    def follow(self, source: Optional[Callable[[], int]]) -> None:
        """Read images done from source() at each poll (Spark's task counts), until follow(None)."""
        self._source = source

    # --- the sinks -----------------------------------------------------------------------------------------
    def snapshot(self, now: Optional[float] = None) -> dict:
        """The progress object as written: no object key in it."""
        now = self.clock() if now is None else now
        with self._lock:
            stage, done, total = self._stage, self._done, self._total
            rate = None
            if self._rate_from is not None and done:
                until = now if self._rate_until is None else self._rate_until
                rate = done / max(until - self._rate_from, 1e-6)
        return {
            "run_id": self.launch_id,
            "job_run_id": self.job_run_id,
            "stage": stage,
            "images_done": done,
            "images_total": total,
            "rate": round(rate, 2) if rate else None,
            "eta_s": round((total - done) / rate, 1) if rate else None,
            "started_at": self.started_at,
            "updated_at": _iso(self.wall()),
        }

    def start(self) -> Progress:
        """Remove progress objects of earlier launches, write the first state if it is due (_flush), and follow the
        run in a thread."""
        if self.uri:
            self._remove_stale()
        if self._tty:
            self._bar = _open_bar()
        self._show()
        self._flush()
        self._thread = threading.Thread(target=self._follow, name="progress", daemon=True)
        self._thread.start()
        return self

    def tick(self) -> None:
        """One poll: the source's count, the bar, and a write if one is due."""
        source = self._source
        if source is not None:
            with contextlib.suppress(Exception):  # Spark is between jobs or stopping: the next poll reads again
                self.reach(source())
        self._show()
        self._flush()

    def close(self) -> None:
        """The run ended (published, idle or failed): stop following and remove the object."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bar is not None:
            self._show()
            if self._row is not None and self._row[0] == STAGES[-1]:
                self._end_row()  # the run's last stage; a failed run's bar stays where it stopped
            self._bar.stop()
        if self.uri:
            try:
                with self._write_lock:
                    storage.delete_files([self.uri])
            except Exception as exc:
                self.log(f"the run's progress object was not deleted ({type(exc).__name__}: {exc}); "
                         "report.json supersedes it, and the next launched run removes it")  # fmt: skip

    def _remove_stale(self) -> None:
        """Progress objects of other launch ids: their runs ended (at most one launched run is active), if killed
        before their own cleanup."""
        try:
            stale = [uri for uri, _ in storage.list_prefix(storage.join(self.output, FOLDER)) if uri != self.uri]
            storage.delete_files(stale)
        except Exception as exc:
            self.log(f"progress objects of earlier runs were not all removed ({type(exc).__name__}: {exc}); "
                     "the next launched run tries again")  # fmt: skip

    def _follow(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.tick()
            except Exception as exc:  # never the run's failure
                self._warn(exc)

    def _flush(self) -> None:
        """Write the state if it changed and PROGRESS_EVERY_S have passed since the last write (or if HEARTBEAT_S
        have passed, changed or not)."""
        with self._write_lock:
            now = self.clock()
            since = None if self._last_write is None else now - self._last_write
            changed = self._version != self._written
            if since is not None and not (changed and since >= PROGRESS_EVERY_S) and since < HEARTBEAT_S:
                return
            # The first write waits for the first stage past planning, or PROGRESS_EVERY_S: the featurize stage of
            # a short run is then written at once, not throttled behind a write of "plan"
            if since is None and self._stage == STAGES[0] and now - self._opened < PROGRESS_EVERY_S:
                return
            self._written, self._last_write = self._version, now
            snap = self.snapshot(now)
            if self.uri:
                try:
                    storage.write_bytes(self.uri, json.dumps(snap).encode(), "application/json")
                except Exception as exc:
                    self._warn(exc)
            if not self._bar and snap["stage"] == "featurize" and snap["images_total"]:
                self._say(snap)

    def _say(self, snap: dict) -> None:
        said = (snap["stage"], snap["images_done"], snap["images_total"])
        if said != self._said:  # the stage's outcome may have just been said by the throttled path
            self._said = said
            self.log(line(snap))

    def _warn(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            self.log(f"the run's progress was not written ({type(exc).__name__}: {exc}); the run goes on")

    def _show(self, snap: Optional[dict] = None) -> None:
        """Redraw the bar: a row per stage, counted in images while featurizing."""
        if self._bar is None:
            return
        snap = snap or self.snapshot()
        stage, total = snap["stage"], snap["images_total"]
        counted = stage == "featurize" and total > 0
        with self._bar_lock:  # the poller and the job's thread both draw
            if self._row is None or self._row[0] != stage:
                self._end_row()
                self._row = (stage, self._bar.add_task(stage, total=total if counted else None, detail=""))
            if counted:
                self._bar.update(self._row[1], completed=snap["images_done"], detail=line(snap).split(": ", 1)[1])

    def _end_row(self) -> None:
        if self._row is not None:
            self._bar.update(self._row[1], total=1, completed=1)  # a full bar, and its clock stops


def line(snap: dict) -> str:
    """'featurize: 1,200 of 5,000 images (24%), 85.3 images/s, about 45 s left'"""
    done, total = snap["images_done"], snap["images_total"]
    text = f"{snap['stage']}: {done:,} of {total:,} images ({done / max(total, 1):.0%})"
    if snap["rate"]:
        text += f", {snap['rate']:,.1f} images/s"
    if snap["eta_s"]:
        text += f", about {duration(snap['eta_s'])} left"
    return text


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{math.ceil(seconds)} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def spark_images(sc, group: str, images: int) -> Callable[[], int]:
    """Images done by the Spark jobs of a job group, from their completed tasks: each task holds an even share of
    the images (job._map deals them round-robin), so a run has as many steps as tasks."""
    tracker = sc.statusTracker()

    def done() -> int:
        completed = tasks = 0
        for job_id in tracker.getJobIdsForGroup(group):
            job = tracker.getJobInfo(job_id)
            for stage_id in job.stageIds if job else ():
                info = tracker.getStageInfo(stage_id)
                if info:
                    completed, tasks = completed + info.numCompletedTasks, tasks + info.numTasks
        return images * min(completed, tasks) // tasks if tasks else 0

    return done


def _open_bar():
    """A rich progress bar on stderr; None where rich is missing (the plain lines then, as off a terminal)."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar
    except ImportError:
        return None
    columns = (
        TextColumn("{task.description:<9}"),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}"),
    )
    bar = Bar(*columns, console=Console(stderr=True))
    bar.start()
    return bar


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="seconds")


def at_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())
