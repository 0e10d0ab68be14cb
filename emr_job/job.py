"""One run: list the input, diff it with the published store, featurize what is new or changed, drop what is
gone, refit PCA, and publish every table at once (emr_job/store.py). Safe to repeat, to run late, and to crash."""

from __future__ import annotations

import importlib
import io
import math
import os
import tempfile
import time
import uuid
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from types import SimpleNamespace
from typing import Callable, Optional

import numpy as np
import pyarrow as pa

from emr_job import basis, catalog, fitted, model, moments, network, quality, report, storage
from emr_job.cost import PRICE_GB_HOUR, PRICE_VCPU_HOUR, ResourceMeter
from emr_job.featurize import (
    FAILED,
    FILE,
    GONE,
    IN_ARROW,
    ROWS_PER_FILE,
    featurize_partition,
    prepare_worker,
)
from emr_job.inputs import inputs_digest
from emr_job.pca import (
    PcaError,
    PcaModel,
    features_stem,
    file_moments,
    file_projection,
    rewrite_files,
)
from emr_job.pca import fit as fit_pca
from emr_job.plan import Plan, make_plan
from emr_job.progress import Progress, at_terminal, spark_images
from emr_job.store import (
    TABLE_NAMES,
    CommitError,
    Results,
    RunCommit,
    TableChange,
    arrow_schema,
    live_files,
    mark_running,
    read_live,
    remove_orphans,
)

IMAGES_PER_TASK = 4000  # long tasks amortise per-task set-up; more tasks than cores only past this size
FILE_TASKS_ARROW = pa.schema([("file", pa.string()), ("deleted", pa.list_(pa.int64()))])
SMALL_FILES_TO_COMPACT = 16  # more data files than this under ROWS_PER_FILE / 4 rows are merged
NO_LABEL = "(no label folder)"  # failures of files directly under the input
CLEANUP_MARGIN_S = 60  # past the snapshot window, so the cleanup run finds the snapshots expirable
CLOCK: Callable[[], float] = time.time  # tests move it to age snapshots and files


@dataclass
class JobConfig:
    input: str
    output: str
    weights: str = "random"
    variance: Optional[float] = 0.95
    k: Optional[int] = None
    batch_size: int = 32
    io_threads: int = 8
    # Superseded snapshots (and the files only they reach) live this long for readers in mid-query; then the
    # next run deletes them. A run that erased rows records when that is due (report.json's maintenance
    # cleanup_due_at) and the pipeline starts one then, so erased rows leave every file within the hour.
    keep_snapshots_hours: float = 0.5
    launch_id: Optional[str] = None  # the pipeline run that launched this job (markers of earlier ones are dead)
    price_vcpu_hour: float = PRICE_VCPU_HOUR  # what the report's estimated price is computed with
    price_gb_hour: float = PRICE_GB_HOUR
    glue_database: Optional[str] = None  # Glue database whose tables follow the published ones
    engine: str = "onnx"  # what runs the network: "onnx" (ONNX Runtime) or "tensorflow" (the reference)
    refit: str = "auto"  # keep the published PCA basis until the data drifts (emr_job/basis.py), or always, never
    # Work this small runs in the driver: a Spark job costs seconds to start (JVM, Python workers) on any
    # cluster, more than featurizing this many images or reading this many feature rows (a pass over one file at a
    # time: memory stays flat); each table pass (rewrite, moments, projection) counts the rows it reads.
    driver_max_images: int = 256
    driver_max_rows: int = 50000


class Timer:
    def __init__(self):
        self.start = self.mark = time.monotonic()
        self.stages: dict = {}

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.stages[name] = round(self.stages.get(name, 0.0) + now - self.mark, 3)
        self.mark = now

    def total(self) -> dict:
        return {**self.stages, "total": round(time.monotonic() - self.start, 3)}


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


# --- one run, as its stages -------------------------------------------------------------------------------
@dataclass
class RunContext:
    """What the stages of one run share. Each stage reads what earlier ones set and adds its own part."""

    cfg: JobConfig
    log: Callable
    run_id: str
    timer: Timer
    results: Results  # the published state the run started from
    weights: object
    files: list  # the published features table's data files (store.LiveFile)
    plan: Plan
    session: Optional[Callable] = None
    fail_at: Optional[str] = None
    compact: bool = False  # small files to merge, or position deletes left by an older version of the job
    outdated_model: bool = False  # the published run has a fitted model but no model.onnx (an older version)
    commit: Optional[RunCommit] = None
    spark: object = None
    network: object = None  # future of the network's payload, prepared while the JVM starts
    status: list = field(default_factory=list)  # the featurize tasks' rows: files written, failures, vanished
    report: dict = field(default_factory=dict)
    failure_rows: list = field(default_factory=list)  # the failures table as this run publishes it
    run_files: dict = field(default_factory=dict)  # name -> bytes, under runs/<run_id>/
    run_copies: dict = field(default_factory=dict)  # name -> a published file copied under runs/<run_id>/
    live_rows: dict = field(default_factory=dict)  # features data file -> its rows, once this run's change is applied
    meter: ResourceMeter = field(default_factory=ResourceMeter)  # vCPU and GB over time, for the run's cost
    progress: Optional[Progress] = None  # stage and images done, for status and the terminal

    @property
    def live(self) -> list:
        """The features data files once this run's change is applied."""
        return list(self.live_rows)

    def step(self, name: str) -> None:
        if self.fail_at == name:
            raise RuntimeError(f"injected failure at step {name!r}")


def run(cfg: JobConfig, log=print, session=None, fail_at: Optional[str] = None) -> dict:
    """One reconciliation of the output with the input. Returns the published report, or the previous one
    (with "published": False) when nothing changed. session: a function returning the SparkSession, called
    only if there is work for Spark. fail_at: a step name where tests inject a crash."""
    # A launched run's progress goes where status finds it from the launch id; the run removes it as it ends.
    progress = Progress(new_run_id(), log, cfg.output, cfg.launch_id, tty=at_terminal(), wall=lambda: CLOCK())
    try:
        progress.start()
        ctx = plan(cfg, log, session, fail_at, progress)
        if ctx.results.report is not None and not (ctx.plan.changes or ctx.compact or ctx.outdated_model):
            return idle(ctx)
        marker = mark_running(ctx.results, ctx.run_id, cfg.launch_id)
        try:
            featurize(ctx)
            commit_features(ctx)
            fit(ctx)
            publish(ctx)
            return clean(ctx)
        finally:
            _unmark(ctx, marker)
    finally:
        progress.close()


def plan(cfg: JobConfig, log, session=None, fail_at: Optional[str] = None,
         progress: Optional[Progress] = None) -> RunContext:  # fmt: skip
    """List the input, read the published store, and decide what to featurize and what to drop. progress: the
    run's (it names the run), or a silent one."""
    progress = progress or Progress(new_run_id(), log=lambda _: None)
    timer, meter = Timer(), ResourceMeter()
    if session and "PYSPARK_GATEWAY_PORT" in os.environ:  # spark-submit made the session already: it is billed
        meter.attach(session())
    results = Results(cfg.output)
    weights = model.resolve_weights(cfg.weights, tempfile.mkdtemp(prefix="emr_job-"))
    files = live_files(results.table("features"))
    store_index = read_live(files, ["path", "version", "weights"])
    listing, ignored = storage.list_images(cfg.input)
    made = make_plan(listing, ignored, store_index, files, results.read("failures"), weights.fingerprint)
    made.inputs = _listed_inputs(cfg.input, listing)
    timer.lap("plan")
    log(f"{made.featurize.num_rows} images to featurize, {made.reused} unchanged in the store, "
        f"{made.removed} removed")  # fmt: skip
    ctx = RunContext(cfg, log, progress.job_run_id, timer, results, weights, files, made, session, fail_at, meter=meter,
                     progress=progress)  # fmt: skip
    ctx.compact = any(len(f.deleted) for f in files) or (
        sum(f.rows - len(f.deleted) < ROWS_PER_FILE // 4 for f in files) > SMALL_FILES_TO_COMPACT
    )
    published = results.report or {}
    ctx.outdated_model = bool(published.get("model")) and not published.get("model_onnx")
    if ctx.outdated_model:
        log(f"run {published['run_id']} published no model.onnx (an older version of the job): publishing again")
    return ctx


def idle(ctx: RunContext) -> dict:
    """Nothing changed: publish no results, but expire old snapshots (their files may hold erased rows), delete
    what nothing reaches any more, and keep report.json's bookkeeping (inputs digest, cleanup time) current."""
    cfg, previous = ctx.cfg, dict(ctx.results.report)
    ctx.log(f"nothing changed since run {previous['run_id']}; no new results")
    ctx.progress.stage("clean")
    commit = _new_commit(ctx)
    marker = None
    if any(commit.expirable(name) for name in TABLE_NAMES):
        marker = mark_running(ctx.results, ctx.run_id, cfg.launch_id)  # its new metadata files are not orphans
    try:
        expired = sum(commit.expire(name) for name in TABLE_NAMES) if marker else 0
        maintenance = {**(previous.get("maintenance") or {}), "snapshots_expired": expired}
        maintenance["cleanup_due_at"] = _cleanup_due(cfg, commit, erased=False,
                                                     pending=bool(maintenance.get("cleanup_due_at")))  # fmt: skip
        updated = {**previous, "maintenance": maintenance}
        if ctx.plan.inputs:
            updated["inputs"] = ctx.plan.inputs  # a report from before inputs digests, on a store that matches
        if commit.tables or _bookkeeping(updated) != _bookkeeping(previous):
            try:
                previous = commit.publish(updated)
                ctx.log(f"report.json updated: {expired} old snapshots expired, cleanup due "
                        f"{maintenance['cleanup_due_at'] or 'never'}")  # fmt: skip
            except CommitError:
                ctx.log("another run published meanwhile; it did this run's bookkeeping")
        removed, failed = _remove_orphans(ctx)
    finally:
        if marker:
            _unmark(ctx, marker)
    done = {**previous, "published": False, "orphans_removed": removed, "timings_s": ctx.timer.total()}
    return _after_swap(ctx, done, failed)


def featurize(ctx: RunContext) -> None:
    """Start what the work needs (Spark only past the driver's limits) and run the model over the new images."""
    cfg, made = ctx.cfg, ctx.plan
    ctx.progress.stage("featurize", total=made.featurize.num_rows)
    featurize_here = made.featurize.num_rows <= cfg.driver_max_images
    with ThreadPoolExecutor(2) as pool:
        if made.featurize.num_rows:  # the network is prepared in the background while the JVM starts
            ctx.network = pool.submit(model.payload, ctx.weights, cfg.engine)
        # pyiceberg's catalog modules (SQLAlchemy: about a second) load meanwhile; the commit is made after
        pool.submit(importlib.import_module, "pyiceberg.catalog.memory")
        if not featurize_here:  # the table passes start Spark later only if their rows need it (_spark_for)
            ctx.spark = ctx.session() if ctx.session else _local_session()
            ctx.meter.attach(ctx.spark)
        ctx.timer.lap("start")
        ctx.step("start")
        ctx.status = _featurize(ctx)
    ctx.commit = _new_commit(ctx)
    ctx.commit.table("features")  # created now if this is the first run
    ctx.step("featurized")


def commit_features(ctx: RunContext) -> None:
    """Stage the features snapshot: new files in; every file holding a row that goes rewritten without it
    (copy-on-write: an erased image leaves the current files in this run); small files merged if due."""
    ctx.progress.stage("write")
    new_files = [r["path"] for r in ctx.status if r["status"] == FILE]
    drops = {f.path: np.union1d(f.deleted, ctx.plan.deletes.get(f.path, [])).astype(np.int64) for f in ctx.files}
    change = TableChange(added=new_files)
    rewrite = []
    for f in ctx.files:
        if len(drops[f.path]) == f.rows:
            change.removed.add(f.path)  # every row goes: dropped, not rewritten
        elif len(drops[f.path]) or (ctx.compact and f.rows - len(drops[f.path]) < ROWS_PER_FILE // 4):
            rewrite.append((f.path, drops[f.path], f.rows - len(drops[f.path])))
    written = rewrite_features(_spark_for(ctx, sum(n for _, _, n in rewrite)), ctx.commit, ctx.run_id, rewrite)
    change.added += [r["path"] for r in written]
    change.removed |= {path for path, _, _ in rewrite} | {d for f in ctx.files for d in f.delete_files}
    kept = [f for f in ctx.files if f.path not in change.removed]
    ctx.live_rows = {**{f.path: f.rows - len(f.deleted) for f in kept},
                     **{r["path"]: r["count"] for r in ctx.status if r["status"] == FILE},
                     **{r["path"]: r["count"] for r in written}}  # fmt: skip
    maintenance = dict((ctx.results.report or {}).get("maintenance") or {})
    maintenance.pop("oldest_uncompacted_delete", None)  # written by versions that masked rows for a while
    if rewrite:
        maintenance["rewritten_at"] = _iso(CLOCK())
    ctx.report["maintenance"] = maintenance
    ctx.report["rows_rewritten"] = int(sum(n for _, _, n in rewrite))
    ctx.report["files_rewritten"] = len(rewrite)
    if change.added or change.removed:
        ctx.commit.apply("features", change)
    ctx.timer.lap("write")
    ctx.step("features")


def rewrite_features(spark, commit: RunCommit, run_id: str, rewrite: list) -> list:
    """Data files -> new files with only the rows kept (rewrite: (path, positions dropped, rows kept)), merged
    into files of up to ROWS_PER_FILE rows; returns them (path, count). In Spark tasks, or here when spark is None."""
    if not rewrite:
        return []
    schema = arrow_schema("features")
    data_dir = storage.join(commit.results.table_location("features"), "data")
    body = partial(rewrite_files, data_dir=data_dir, run_id=f"{run_id}-rewrite", schema=schema)
    slices = max(1, math.ceil(sum(n for _, _, n in rewrite) / ROWS_PER_FILE))
    rows = [{"file": path, "deleted": [int(p) for p in dropped]} for path, dropped, _ in rewrite]
    return _map(spark, rows, FILE_TASKS_ARROW, body, slices)


def fit(ctx: RunContext) -> None:
    """Refit PCA on every live feature row, stage the pca table, and assemble the run's report."""
    ctx.progress.stage("pca")
    cfg, made = ctx.cfg, ctx.plan
    new_failures = [r for r in ctx.status if r["status"] == FAILED]
    featurized = sum(r["count"] for r in ctx.status if r["status"] == FILE)
    gone = sum(r["status"] == GONE for r in ctx.status)
    n_ok = made.reused + featurized
    failure_rows = made.kept_failures.to_pylist() + [
        {"path": r["path"], "label": r["label"], "reason": r["reason"], "version": r["version"]} for r in new_failures
    ]
    ctx.report = {
        "run_id": ctx.run_id,
        # The pipeline's run that launched this job: its settle tells from this that the run published, whatever
        # its exit status (a step after the swap may fail it)
        "launch_id": cfg.launch_id,
        "finished_at": None,
        "input": storage.normalize(cfg.input),
        "output": ctx.results.root,
        "weights": ctx.weights.description,
        "weights_fingerprint": ctx.weights.fingerprint,
        "engine": model.describe(cfg.engine),
        "images_total": n_ok + len(failure_rows),
        "images_ok": n_ok,
        "images_failed": len(failure_rows),
        "images_featurized": featurized,
        "images_failed_this_run": len(new_failures),
        "images_reused": made.reused,
        "images_removed": made.removed + gone,
        "images_recomputed_for_new_weights": made.restale,
        "files_ignored": made.ignored,
        "inputs": made.inputs,
        "failures_by_reason": dict(Counter(r["reason"].split(":")[0] for r in failure_rows)),
        "variance_target": cfg.variance if cfg.k is None else None,
        "k": None,
        "explained_variance_ratio": [],
        "explained_variance_total": None,
        "pca_skipped": None,
        "quality": None,
        "labels": {},
        "plots": [],
        **ctx.report,  # what commit_features recorded
    }
    ctx.failure_rows = failure_rows
    ctx.run_files, ok_by_label = _pca(ctx, n_ok)
    failed_by_label = Counter(r["label"] or NO_LABEL for r in failure_rows)
    ctx.report["labels"] = {name: {"images": ok_by_label.get(name, 0), "failed": failed_by_label.get(name, 0)}
                            for name in sorted(set(ok_by_label) | set(failed_by_label))}  # fmt: skip
    ctx.timer.lap("pca")
    ctx.step("pca")


def publish(ctx: RunContext) -> None:
    """Stage the failures, write the run's folder, and swap report.json: every table at once, or nothing."""
    ctx.progress.stage("publish")
    commit, rpt = ctx.commit, ctx.report
    failures_files = []
    if ctx.failure_rows:  # an empty table has no data file at all
        failures_files.append(commit.data_file_path("failures", "0"))
        storage.write_parquet(failures_files[0], pa.Table.from_pylist(ctx.failure_rows,
                                                                      schema=arrow_schema("failures")))  # fmt: skip
    commit.apply("failures", TableChange(added=failures_files, replace_all=True))
    ctx.step("failures")

    # Rows dropped (images deleted, replaced, or featurized with other weights) live on in the superseded snapshots
    erased = rpt["images_removed"] > 0 or bool(ctx.plan.deletes)
    pending = bool(rpt["maintenance"].get("cleanup_due_at"))
    rpt["maintenance"]["cleanup_due_at"] = _cleanup_due(ctx.cfg, commit, erased=erased, pending=pending)
    rpt["maintenance"]["snapshots_expired"] = commit.expired
    rpt["plots"] = [f"runs/{ctx.run_id}/{name}" for name in sorted(ctx.run_files) if name.endswith(".png")]
    saved = set(ctx.run_files) | set(ctx.run_copies)
    rpt["model"] = f"runs/{ctx.run_id}/{fitted.MODEL_JSON}" if fitted.MODEL_JSON in saved else None
    rpt["model_onnx"] = f"runs/{ctx.run_id}/{fitted.MODEL_ONNX}" if fitted.MODEL_ONNX in saved else None
    rpt["sample"] = f"runs/{ctx.run_id}/{SAMPLE}" if SAMPLE in saved else None
    rpt["sample_of"] = rpt["images_ok"] if SAMPLE in saved else None
    rpt["html"] = f"runs/{ctx.run_id}/report.html"
    rpt["timings_s"] = ctx.timer.total()
    rpt["images_per_second"] = round(rpt["images_featurized"] / max(ctx.timer.stages.get("featurize", 0.0), 1e-9), 2)
    rpt["resources"] = ctx.meter.summary(ctx.cfg.price_vcpu_hour, ctx.cfg.price_gb_hour)
    rpt["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    ctx.run_files["report.html"] = report.html(rpt, ctx.run_files, ctx.failure_rows)
    run_dir = storage.join(ctx.results.root, "runs", ctx.run_id)
    with ThreadPoolExecutor(8) as pool:  # written before the swap: published with the tables, or orphaned
        list(pool.map(lambda kv: storage.write_bytes(storage.join(run_dir, kv[0]), kv[1], _content_type(kv[0])),
                      ctx.run_files.items()))  # fmt: skip
        list(pool.map(lambda kv: storage.copy(kv[1], storage.join(run_dir, kv[0])), ctx.run_copies.items()))
    ctx.step("publish")
    ctx.report = commit.publish(rpt)
    ctx.step("published")


def clean(ctx: RunContext) -> dict:
    """After the swap: delete what the published state no longer reaches, and bring the Glue tables along."""
    ctx.progress.stage("clean")
    ctx.report["maintenance"]["orphans_removed"], failed = _remove_orphans(ctx)
    return _after_swap(ctx, {**ctx.report, "published": True}, failed)


class AfterSwapError(RuntimeError):
    """What was published stays published, but a step after the swap failed: the run fails, and the next run (every
    run does both steps) does it again. Carries the run's result for the summary."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


def _remove_orphans(ctx: RunContext) -> tuple:
    """(files removed, why not) : a failure is reported after the catalog sync, which it must not skip."""
    cfg = ctx.cfg
    try:
        return remove_orphans(cfg.output, grace_s=_grace(cfg), run_id=ctx.run_id, launch_id=cfg.launch_id,
                              clock=CLOCK), None  # fmt: skip
    except storage.DeleteError as exc:
        return 0, f"files the published tables no longer reach were not all deleted: {exc}"


def _after_swap(ctx: RunContext, result: dict, failed: Optional[str]) -> dict:
    """Sync the Glue tables whatever orphan removal did, then fail the run if either step failed."""
    errors = [failed] if failed else []
    try:
        result = {**result, **_sync_catalog(ctx.cfg, ctx.log)}
    except catalog.CatalogError as exc:
        errors.append(str(exc))
    if errors:
        what = "results published" if result.get("published") else "nothing new published"
        raise AfterSwapError(f"{what} (run {result['run_id']}), but " + "; and ".join(errors) +
                             "; the next run does it again", result)  # fmt: skip
    return result


def _unmark(ctx: RunContext, marker: str) -> None:
    """The run's marker goes; one S3 would not delete never hides the run's own outcome: the next launched run
    takes it for dead, and any marker is stale after a day (store.MAX_RUN_S)."""
    try:
        storage.delete_files([marker])
    except storage.DeleteError as exc:
        ctx.log(f"the run's marker was not deleted ({exc}); the next run removes it")


def _new_commit(ctx: RunContext) -> RunCommit:
    return RunCommit(ctx.results, ctx.run_id, keep_snapshots_s=ctx.cfg.keep_snapshots_hours * 3600, clock=CLOCK)


def _cleanup_due(cfg: JobConfig, commit: RunCommit, erased: bool, pending: bool) -> Optional[str]:
    """When a run must start to delete the files of superseded snapshots that may hold erased rows: once the
    newest of them is older than keep_snapshots_hours. None when nothing erased waits in an old snapshot."""
    if not (erased or pending):
        return None
    newest = commit.superseded_since()
    return None if newest is None else _iso(newest + cfg.keep_snapshots_hours * 3600 + CLEANUP_MARGIN_S)


def _bookkeeping(rpt: dict) -> tuple:
    return rpt.get("inputs"), (rpt.get("maintenance") or {}).get("cleanup_due_at")


def _listed_inputs(input_root: str, listing: pa.Table) -> Optional[dict]:
    """The digest of an S3 listing, whose versions are ETags (what the daily pass lists too); None for folders."""
    root = storage.normalize(input_root)
    if not storage.is_s3(root):
        return None
    bucket = f"s3://{storage.split_s3_uri(root)[0]}/"
    keys = (path[len(bucket) :] for path in listing.column("path").to_pylist())
    return inputs_digest(zip(keys, listing.column("version").to_pylist(), listing.column("size").to_pylist()))


def _sync_catalog(cfg: JobConfig, log) -> dict:
    """Glue follows report.json. A failure fails the run (its results stay published): the next run, even a
    no-change one, syncs again."""
    if not cfg.glue_database:
        return {}
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        done = catalog.sync_glue(cfg.output, cfg.glue_database)
    except (BotoCoreError, ClientError) as exc:
        raise catalog.CatalogError(f"the Glue tables of {cfg.glue_database} were not updated: {exc}") from None
    log(f"Glue database {cfg.glue_database}: " + ", ".join(f"{name} {what}" for name, what in done.items()))
    return {"catalog": {"glue_database": cfg.glue_database, "tables": done}}


def _content_type(name: str) -> str:
    return {"png": "image/png", "json": "application/json", "html": "text/html; charset=utf-8"}.get(
        name.rsplit(".", 1)[-1], "application/octet-stream"
    )


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="seconds")


def _grace(cfg: JobConfig) -> float:
    """Orphans younger than this may belong to a run still writing (never to a published one)."""
    return min(600.0, cfg.keep_snapshots_hours * 3600)


def _local_session():
    from emr_job.session import spark_session

    return spark_session()


def _map(spark, rows: list, schema: pa.Schema, body, slices: Optional[int] = None,
         progress: Optional[Progress] = None, ahead: int = 0) -> list:  # fmt: skip
    """Apply a task body (RecordBatches of rows in, RecordBatches out) to rows (dicts): in `slices` Spark tasks
    (default one per core, at most one per row), each dealt an even share of the rows; or here in the
    driver, as one task, when spark is None. Returns the body's output rows as dicts. progress: counts the
    rows done, from the Spark tasks completed, or from the rows the driver's task has taken (less `ahead`).

    Through the RDD API, not DataFrames: the rows are a few KB, and the first DataFrame job of a session costs
    about 5 s of JVM planning and warm-up (createDataFrame, a shuffle to repartition, mapInArrow) where this
    costs 1.5 (docs/PERFORMANCE.md, "The change: Spark's tasks through the RDD API")."""
    if spark is None:
        if progress is None:
            outs = list(body(iter([pa.RecordBatch.from_pylist(rows, schema=schema)])))
        else:
            outs = list(body(_counted(rows, schema, progress, ahead)))
    else:
        n = max(1, min(len(rows), slices or spark.sparkContext.defaultParallelism))
        # Dealt round-robin: costs follow the folders (a label of large PNGs), so contiguous slices are uneven.
        parts = [pa.RecordBatch.from_pylist(rows[i::n], schema=schema) for i in range(n)]
        # One element per slice: parallelize() then gives each task exactly one part.
        mapped = spark.sparkContext.parallelize(parts, n).mapPartitions(body)
        if progress is None:
            outs = mapped.collect()
        else:
            outs = _collect_following(spark.sparkContext, mapped, progress, len(rows))
    return [row for out in outs for row in out.to_pylist()]


def _counted(rows: list, schema: pa.Schema, progress: Progress, ahead: int):
    """The driver's one task, fed its rows in about 100 batches: the rows it has taken, less the `ahead` it reads
    before they are done, are its progress."""
    step, taken = max(1, len(rows) // 100), 0
    for start in range(0, len(rows), step):
        part = rows[start : start + step]
        yield pa.RecordBatch.from_pylist(part, schema=schema)
        taken += len(part)  # the task asked for more: it has taken these
        progress.reach(taken - ahead)


def _collect_following(sc, rdd, progress: Progress, rows: int) -> list:
    """rdd.collect(), its progress read from Spark's status tracker by the progress thread: a step per task."""
    group = f"emr_job-{uuid.uuid4().hex[:8]}"
    sc.setJobGroup(group, "featurize")  # this thread's jobs: the Spark UI shows the description too
    progress.follow(spark_images(sc, group, rows))
    try:
        return rdd.collect()
    finally:
        progress.follow(None)
        for name in ("spark.jobGroup.id", "spark.job.description"):  # later jobs are not the featurize pass
            sc.setLocalProperty(name, None)


def _map_files(spark, paths: list, body) -> list:
    """_map over feature data files (all live rows: copy-on-write leaves no deleted positions), one row each."""
    return _map(spark, [{"file": path, "deleted": []} for path in paths], FILE_TASKS_ARROW, body)


def _featurize(ctx: RunContext) -> list:
    """The model pass over the images to (re)compute; returns the tasks' status rows as dicts."""
    spark, cfg, plan, weights, timer = ctx.spark, ctx.cfg, ctx.plan, ctx.weights, ctx.timer
    if not plan.featurize.num_rows:
        return []
    slices = task_count(spark, plan.featurize.num_rows, cfg.batch_size) if spark else 1
    if spark and cfg.engine == "tensorflow":  # ONNX Runtime needs no warm-up: its session starts in milliseconds
        warm_workers(spark, cfg.batch_size, min(slices, spark.sparkContext.defaultParallelism))
    network = ctx.network.result()  # prepared meanwhile
    timer.lap("load_weights")
    weights_bc = spark.sparkContext.broadcast(network) if spark else SimpleNamespace(value=network)
    body = partial(
        featurize_partition,
        weights=weights_bc,
        fingerprint=weights.fingerprint,
        engine=cfg.engine,
        batch_size=cfg.batch_size,
        io_threads=cfg.io_threads,
        data_dir=storage.join(ctx.results.table_location("features"), "data"),
        run_id=ctx.run_id,
        schema=arrow_schema("features"),
    )
    ctx.progress.count_from_now()
    # featurize_partition reads up to two model batches ahead of the model
    status = _map(spark, plan.featurize.to_pylist(), IN_ARROW, body, slices, ctx.progress, 2 * cfg.batch_size)
    ctx.progress.reach(plan.featurize.num_rows)  # every image is accounted for: written, failed or gone
    if spark:
        weights_bc.unpersist()
    timer.lap("featurize")
    return status


def _pca(ctx: RunContext, n_ok: int):
    """Refit PCA or keep the published basis (emr_job/basis.py), write the projections that basis needs, update the
    report (basis, variance, labels, quality); returns the run's files (plots, the model) and the rows per label."""
    cfg, commit, run_id, rpt, weights = ctx.cfg, ctx.commit, ctx.run_id, ctx.report, ctx.weights
    variance = cfg.variance if cfg.k is None else None
    published, pca_files, forced = _published_basis(ctx)
    merged = _merged_moments(ctx)
    try:
        if merged.n < 2:
            forced = forced or "fewer than 2 images"
        decision = basis.decide(cfg.refit, merged.covariance if merged.n >= 2 else None,
                                published.components if published else None, variance, forced)  # fmt: skip
        if decision.refit:
            pca = fit_pca(merged, variance, cfg.k)
        else:
            pca = PcaModel(published.mean, published.components, decision.kept_ratios, decision.ratios, merged.n)
    except PcaError as exc:
        if cfg.k is not None and n_ok >= 2:
            raise  # the user asked for a k this data cannot give
        rpt["pca_skipped"] = str(exc)
        ctx.log(f"PCA skipped: {exc}")
        commit.apply("pca", TableChange(replace_all=True))
        return {}, Counter()
    basis_run = run_id if decision.refit else published.run_id
    rpt["basis"] = {"run_id": basis_run, "refit": decision.refit, "why": decision.why, "policy": cfg.refit,
                    "captured": decision.captured, "refit_would_capture": decision.best,
                    "epsilon": basis.EPSILON}  # fmt: skip
    ctx.log(f"PCA basis {'refit' if decision.refit else 'kept'} ({basis_run}): {decision.why}")
    rpt.update(
        k=pca.k,
        explained_variance_ratio=[float(x) for x in pca.explained_variance_ratio],
        explained_variance_total=float(pca.explained_variance_ratio.sum()),
    )
    schema = arrow_schema("pca")
    data_dir = storage.join(commit.results.table_location("pca"), "data")
    if decision.refit:  # every row moves to the new basis
        to_project, removed = list(ctx.live), set()
    else:  # rows stay where they are: only files without their pca file are projected
        have = {features_stem(f.path): f.path for f in pca_files}
        stems = {storage.stem(f): f for f in ctx.live}
        to_project = [f for stem, f in stems.items() if stem not in have]
        removed = {p for stem, p in have.items() if stem not in stems}
    with ThreadPoolExecutor(1) as pool:  # matplotlib draws while the projections are written
        variance_png = pool.submit(report.variance_plot, pca.all_ratios, pca.k, rpt["variance_target"])
        body = partial(file_projection, mean=pca.mean, components=pca.components, data_dir=data_dir,
                       run_id=run_id, schema=schema)  # fmt: skip
        spark = _spark_for(ctx, sum(ctx.live_rows.get(f, 0) for f in to_project))
        written = _map_files(spark, to_project, body) if to_project else []
        if written or removed or decision.refit:
            commit.apply("pca", TableChange(added=[r["path"] for r in written], removed=removed,
                                            replace_all=decision.refit))  # fmt: skip
        if decision.refit:
            coords, labels = _sample(written, report.MAX_SCATTER_POINTS)
        else:
            coords, labels = _kept_sample(ctx, pca_files, written, report.MAX_SCATTER_POINTS)
        counts = Counter(merged.labels)
        scatter_png = pool.submit(report.scatter_plot, coords[:, :2], labels)  # drawn while the 5-NN runs
        loo = quality.loo_accuracy(coords[: quality.MAX_SAMPLE], labels[: quality.MAX_SAMPLE])
        rpt["quality"] = {**loo, "of": n_ok, "sample": len(labels),
                          "caveat": quality.caveat(weights.spec, len(counts))}  # fmt: skip
        files = {
            "explained_variance.png": variance_png.result(),
            "pca_scatter.png": scatter_png.result(),
            SAMPLE: _sample_bytes(coords, labels),
            MOMENTS: moments.total_to_bytes(merged, ctx.live),
        }
        rpt["moments"]["total"] = f"runs/{run_id}/{MOMENTS}"
        if decision.refit:
            files.update(fitted.files(pca, weights, run_id, _network_onnx(ctx)))
        else:  # the basis's model, as its run saved it: copied server-side into this run's folder
            source = storage.join(ctx.results.root, ctx.results.report["model"]).rsplit("/", 1)[0]
            ctx.run_copies = {name: storage.join(source, name) for name in fitted.MODEL_FILES}
        return files, counts


def _merged_moments(ctx: RunContext) -> moments.Moments:
    """The moments of every live features row. A run that only added files merges theirs into the published run's
    total (runs/<id>/moments.npz), reading no other entry; otherwise each file's cached entry, or its rows."""
    previous = ctx.results.report or {}
    total, covered = None, set()
    if (previous.get("moments") or {}).get("total"):
        try:
            found = moments.total_from_bytes(
                storage.read_bytes(storage.join(ctx.results.root, previous["moments"]["total"]))[0]
            )
        except FileNotFoundError:
            found = None
        live = {storage.basename(f) for f in ctx.live}
        if found is not None and found[1] <= live:  # nothing it covers has left: add the new files to it
            total, covered = found
    rest = [f for f in ctx.live if storage.basename(f) not in covered]
    cached_before = bool(previous.get("moments"))  # the published files' own entries were written then
    published_files = {f.path for f in ctx.files}
    rows = sum(ctx.live_rows.get(f, 0) for f in rest if not cached_before or f not in published_files)
    parts = _map_files(_spark_for(ctx, rows), rest, file_moments) if rest else []
    merged = moments.merge([total] * (total is not None) + [moments.from_row(p) for p in parts])
    ctx.report["moments"] = {"files_cached": sum(p["cached"] for p in parts),
                             "files_computed": sum(p["computed"] for p in parts),
                             "files_in_total": len(covered)}  # fmt: skip
    return merged


MOMENTS = "moments.npz"  # the moments of every row the run publishes (emr_job/moments.py)


def _published_basis(ctx: RunContext) -> tuple:
    """(the published fitted model or None, the published pca table's data files (store.LiveFile), why a refit
    is due whatever --refit says, or None)."""
    cfg, published = ctx.cfg, ctx.results.report or {}
    pca_files = live_files(ctx.results.table("pca"))
    if not published.get("model"):
        return None, pca_files, None
    try:
        fit = fitted.load(ctx.results)
    except fitted.ModelError as exc:
        return None, pca_files, f"the published model cannot be used ({exc})"
    if fit.weights_fingerprint != ctx.weights.fingerprint:
        return fit, pca_files, "the weights changed"
    if ctx.outdated_model:
        return fit, pca_files, "the published run has no model.onnx"
    if ctx.plan.deletes or ctx.plan.removed:  # a kept mean and axes would still carry what left
        return fit, pca_files, "images were erased or replaced"
    if cfg.k is not None and cfg.k != fit.k:
        return fit, pca_files, f"--k {cfg.k}, the basis has {fit.k}"
    if any(features_stem(f.path) is None for f in pca_files):
        return fit, pca_files, "the pca table predates one pca file per features file"
    return fit, pca_files, None


def _spark_for(ctx: RunContext, rows: int):
    """The Spark session for a table pass over this many rows: the one running, else one started now if the rows
    are more than the driver reads alone, else None (the driver does it)."""
    if ctx.spark is None and rows > ctx.cfg.driver_max_rows:
        ctx.spark = ctx.session() if ctx.session else _local_session()
        ctx.meter.attach(ctx.spark)
    return ctx.spark


SAMPLE = "sample.npz"  # the report's bounded sample of pca rows (coordinates and labels), for the next kept run


def _sample_bytes(coords: np.ndarray, labels: list) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, coords=coords.astype(np.float32), labels=np.array(labels, dtype=str))
    return buf.getvalue()


def _kept_sample(ctx: RunContext, pca_files: list, written: list, size: int) -> tuple:
    """A uniform sample of the rows after a run that kept the basis (it only adds rows): the published sample
    merged with the new rows, each side drawn hypergeometrically. Without a readable published sample, one is
    drawn from every pca file."""
    previous = ctx.results.report or {}
    new_files = {storage.stem(r["path"]) for r in ctx.status if r["status"] == FILE}
    fresh = [r for r in written if features_stem(r["path"]) in new_files]
    try:
        with np.load(io.BytesIO(storage.read_bytes(storage.join(ctx.results.root, previous["sample"]))[0])) as npz:
            old_coords, old_labels = npz["coords"], [str(x) for x in npz["labels"]]
        population = int(previous["sample_of"])
    except (KeyError, TypeError, ValueError, OSError, zipfile.BadZipFile):  # none (an older run), or unreadable
        everything = [r for r in written if r not in fresh]
        kept = {features_stem(r["path"]) for r in everything}
        everything += [{"path": f.path, "count": f.rows} for f in pca_files if features_stem(f.path) not in kept]
        return _sample(everything + fresh, size)
    new_coords, new_labels = _sample(fresh, size) if fresh else (np.zeros((0, old_coords.shape[1])), [])
    added = sum(r["count"] for r in fresh)
    rng = np.random.default_rng(int(ctx.run_id.rsplit("-", 1)[-1], 16))  # the run id's random part
    take = min(size, population + added)
    from_new = int(rng.hypergeometric(added, population, take)) if added and population else min(take, added)
    old_pick = rng.choice(len(old_labels), min(take - from_new, len(old_labels)), replace=False)
    new_pick = np.arange(min(from_new, len(new_labels)))  # _sample's rows are in random order already
    coords = np.concatenate([old_coords[old_pick], new_coords[new_pick]])
    labels = [old_labels[i] for i in old_pick] + [new_labels[i] for i in new_pick]
    order = rng.permutation(len(labels))
    return coords[order], [labels[i] for i in order]


def _network_onnx(ctx: RunContext) -> bytes:
    """The features-only ONNX graph of the run's weights: the one prepared for featurizing, else made now."""
    if ctx.network is None:
        return model.payload(ctx.weights, "onnx")
    prepared = ctx.network.result()
    return prepared if ctx.cfg.engine == "onnx" else network.onnx_model(prepared)


def _sample(written: list, size: int) -> tuple:
    """A uniform random sample (seeded) of up to `size` rows of these pca files, in random order: (coords,
    labels)."""
    import pyarrow.parquet as pq

    total = sum(r["count"] for r in written)
    rng = np.random.default_rng(0)
    picked = np.sort(rng.choice(total, size=min(size, total), replace=False))
    starts = np.cumsum([0] + [r["count"] for r in written])

    def one(i):
        mine = picked[(picked >= starts[i]) & (picked < starts[i + 1])] - starts[i]
        if not len(mine):
            return None
        fs, where = storage.filesystem(written[i]["path"])
        part = pq.read_table(where, columns=["label", "pca"], filesystem=fs)
        return part.take(pa.array(mine, pa.int64()))

    with ThreadPoolExecutor(8) as pool:
        parts = [p for p in pool.map(one, range(len(written))) if p is not None]
    if not parts:
        return np.zeros((0, 2), np.float32), []
    rows = pa.concat_tables(parts)
    order = rng.permutation(len(picked))
    coords = np.array(rows.column("pca").to_pylist(), np.float32).reshape(len(picked), -1)[order]
    all_labels = rows.column("label").to_pylist()
    return coords, [all_labels[i] for i in order]


def task_count(spark, images: int, batch_size: int) -> int:
    """A multiple of the cores for real work; fewer tasks (and worker starts) for a small increment."""
    parallelism = spark.sparkContext.defaultParallelism
    if images < parallelism * batch_size * 4:
        return max(1, min(parallelism, math.ceil(images / (batch_size * 4))))
    return parallelism * max(1, math.ceil(images / IMAGES_PER_TASK / parallelism))


def warm_workers(spark, batch_size: int, n: int) -> None:
    """Build and trace the network (~4 s) in n Python workers now, while the driver loads the weights; Spark
    reuses those workers for the real work."""
    _map(spark, [{}] * n, pa.schema([]), partial(prepare_worker, batch_size=batch_size), n)
