"""One run: list the input, diff it with the published store, featurize what is new or changed, drop what is
gone, refit PCA, and publish every table at once (emr_job/store.py). Safe to repeat, to run late, and to crash."""

from __future__ import annotations

import json
import math
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from types import SimpleNamespace
from typing import Callable, Optional

import numpy as np
import pyarrow as pa

from emr_job import catalog, fitted, model, quality, report, storage
from emr_job.featurize import (
    FAILED,
    FILE,
    GONE,
    IN_ARROW,
    IN_SCHEMA,
    OUT_SCHEMA,
    ROWS_PER_FILE,
    featurize_partition,
    prepare_worker,
)
from emr_job.inputs import inputs_digest
from emr_job.pca import (
    FILE_ROWS_SCHEMA,
    MOMENTS_SCHEMA,
    PcaError,
    file_moments,
    file_projection,
    fit_from_moments,
    rewrite_files,
)
from emr_job.plan import Plan, make_plan
from emr_job.store import (
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
FILE_TASKS_SCHEMA = "file string, deleted array<long>"
FILE_TASKS_ARROW = pa.schema([("file", pa.string()), ("deleted", pa.list_(pa.int64()))])
SMALL_FILES_TO_COMPACT = 16  # more data files than this under ROWS_PER_FILE / 4 rows are merged
NO_LABEL = "(no label folder)"  # failures of files directly under the input
CLOCK: Callable[[], float] = time.time  # tests move it to age deletes and snapshots


@dataclass
class JobConfig:
    input: str
    output: str
    weights: str = "random"
    variance: Optional[float] = 0.95
    k: Optional[int] = None
    batch_size: int = 32
    io_threads: int = 8
    compact_after_hours: float = 12.0  # erased rows leave the table files at the first run after this
    keep_snapshots_hours: float = 1.0  # older snapshots (and the files only they reach) are removed
    glue_database: Optional[str] = None  # Glue database whose tables follow the published ones
    engine: str = "onnx"  # what runs the network: "onnx" (ONNX Runtime) or "tensorflow" (the reference)
    # Work this small runs in the driver: a Spark job costs seconds to start (JVM, Python workers) on any
    # cluster, more than featurizing this many images or reading this many feature rows.
    driver_max_images: int = 256
    driver_max_rows: int = 20000


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


def run(cfg: JobConfig, log=print, session=None, fail_at: Optional[str] = None) -> dict:
    """One reconciliation of the output with the input. Returns the published report, or the previous one
    (with "published": False) when nothing changed. session: a function returning the SparkSession, called
    only if there is work for Spark. fail_at: a step name where tests inject a crash."""
    timer = Timer()
    results = Results(cfg.output)
    run_id = new_run_id()
    weights = model.resolve_weights(cfg.weights, tempfile.mkdtemp(prefix="emr_job-"))
    files = live_files(results.table("features"))
    store_index = read_live(files, ["path", "version", "weights"])
    listing, ignored = storage.list_images(cfg.input)
    plan = make_plan(listing, ignored, store_index, files, results.read("failures"), weights.fingerprint)
    plan.inputs = _listed_inputs(cfg.input, listing)
    timer.lap("plan")
    log(f"{plan.featurize.num_rows} images to featurize, {plan.reused} unchanged in the store, "
        f"{plan.removed} removed")  # fmt: skip
    compact = _compaction(cfg, results, files, plan)
    if results.report is not None and not plan.changes and not compact:
        removed = remove_orphans(results, grace_s=_grace(cfg))
        log(f"nothing changed since run {results.report['run_id'] if results.report else '-'}; nothing published")
        previous = dict(results.report or {})
        if plan.inputs and previous.get("inputs") != plan.inputs:
            previous = _stamp_inputs(results, previous, plan.inputs, log)
        catalog = _sync_catalog(cfg, log)
        return {**previous, "published": False, "orphans_removed": removed, "timings_s": timer.total(), **catalog}

    marker = mark_running(results, run_id)
    try:
        return _reconcile(cfg, log, session, fail_at, timer, results, run_id, weights, files, plan, compact)
    finally:
        storage.delete_files([marker])


def _reconcile(cfg, log, session, fail_at, timer, results, run_id, weights, files, plan, compact) -> dict:
    """The part of a run that writes: featurize, commit each table, publish, clean up."""
    network, spark = None, None
    featurize_here = plan.featurize.num_rows <= cfg.driver_max_images
    tables_here = plan.reused + plan.featurize.num_rows <= cfg.driver_max_rows  # PCA passes, compaction
    with ThreadPoolExecutor(1) as pool:
        if plan.featurize.num_rows:  # the network is prepared in the background while the JVM starts
            network = pool.submit(model.payload, weights, cfg.engine)
        if not (featurize_here and tables_here):
            spark = session() if session else _local_session()
        timer.lap("start")
        commit = RunCommit(results, run_id, keep_snapshots_s=cfg.keep_snapshots_hours * 3600)
        _step(fail_at, "start")
        status = _featurize(None if featurize_here else spark, cfg, plan, weights, network, commit, run_id, timer)
        spark = None if tables_here else spark
    new_files = [r["path"] for r in status if r["status"] == FILE]
    new_failures = [r for r in status if r["status"] == FAILED]
    gone = sum(r["status"] == GONE for r in status)
    featurized = sum(r["count"] for r in status if r["status"] == FILE)
    _step(fail_at, "featurized")

    change = TableChange(added=new_files, deletes=dict(plan.deletes))
    live = _live_after(files, change)
    for old in files:  # files whose every row goes are dropped, not masked
        if old.path in change.deletes and len(np.union1d(old.deleted, change.deletes[old.path])) == old.rows:
            change.removed.add(old.path)
            del change.deletes[old.path]
    maintenance = dict((results.report or {}).get("maintenance") or {})
    if compact:
        live = _compact(spark, commit, run_id, live, change, files)
        maintenance["compacted_at"] = _iso(CLOCK())
        maintenance["oldest_uncompacted_delete"] = None
    elif change.deletes and not maintenance.get("oldest_uncompacted_delete"):
        maintenance["oldest_uncompacted_delete"] = _iso(CLOCK())
    if change.added or change.deletes or change.removed:
        commit.apply("features", change)
    timer.lap("write")
    _step(fail_at, "features")

    n_ok = plan.reused + featurized
    failure_rows = plan.kept_failures.to_pylist() + [
        {"path": r["path"], "label": r["label"], "reason": r["reason"], "version": r["version"]} for r in new_failures
    ]
    rpt = {
        "run_id": run_id,
        "finished_at": None,
        "input": storage.normalize(cfg.input),
        "output": results.root,
        "weights": weights.description,
        "weights_fingerprint": weights.fingerprint,
        "engine": model.describe(cfg.engine),
        "images_total": n_ok + len(failure_rows),
        "images_ok": n_ok,
        "images_failed": len(failure_rows),
        "images_featurized": featurized,
        "images_failed_this_run": len(new_failures),
        "images_reused": plan.reused,
        "images_removed": plan.removed + gone,
        "images_recomputed_for_new_weights": plan.restale,
        "files_ignored": plan.ignored,
        "inputs": plan.inputs,
        "failures_by_reason": dict(Counter(r["reason"].split(":")[0] for r in failure_rows)),
        "variance_target": cfg.variance if cfg.k is None else None,
        "k": None,
        "explained_variance_ratio": [],
        "explained_variance_total": None,
        "pca_skipped": None,
        "quality": None,
        "labels": {},
        "plots": [],
        "maintenance": maintenance,
    }
    run_files, ok_by_label = _pca(spark, cfg, commit, run_id, live, rpt, n_ok, weights, log)
    failed_by_label = Counter(r["label"] or NO_LABEL for r in failure_rows)
    rpt["labels"] = {name: {"images": ok_by_label.get(name, 0), "failed": failed_by_label.get(name, 0)}
                     for name in sorted(set(ok_by_label) | set(failed_by_label))}  # fmt: skip
    timer.lap("pca")
    _step(fail_at, "pca")

    failures_files = []
    if failure_rows:  # an empty table has no data file at all
        failures_files.append(commit.data_file_path("failures", "0"))
        storage.write_parquet(failures_files[0], pa.Table.from_pylist(failure_rows, schema=arrow_schema("failures")))
    commit.apply("failures", TableChange(added=failures_files, replace_all=True))
    _step(fail_at, "failures")

    rpt["plots"] = [f"runs/{run_id}/{name}" for name in sorted(run_files) if name.endswith(".png")]
    rpt["model"] = f"runs/{run_id}/{fitted.MODEL_JSON}" if fitted.MODEL_JSON in run_files else None
    rpt["html"] = f"runs/{run_id}/report.html"
    rpt["timings_s"] = timer.total()
    rpt["images_per_second"] = round(featurized / max(timer.stages.get("featurize", 0.0), 1e-9), 2)
    rpt["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run_files["report.html"] = report.html(rpt, run_files, failure_rows)
    run_dir = storage.join(results.root, "runs", run_id)
    with ThreadPoolExecutor(8) as pool:  # written before the swap: published with the tables, or orphaned
        list(pool.map(lambda kv: storage.write_bytes(storage.join(run_dir, kv[0]), kv[1], _content_type(kv[0])),
                      run_files.items()))  # fmt: skip
    _step(fail_at, "publish")
    published = commit.publish(rpt)
    _step(fail_at, "published")
    published["maintenance"]["orphans_removed"] = remove_orphans(Results(cfg.output), grace_s=_grace(cfg))
    return {**published, "published": True, **_sync_catalog(cfg, log)}


def _listed_inputs(input_root: str, listing: pa.Table) -> Optional[dict]:
    """The digest of an S3 listing, whose versions are ETags (what the daily pass lists too); None for folders."""
    root = storage.normalize(input_root)
    if not storage.is_s3(root):
        return None
    bucket = f"s3://{storage.split_s3_uri(root)[0]}/"
    keys = (path[len(bucket) :] for path in listing.column("path").to_pylist())
    return inputs_digest(zip(keys, listing.column("version").to_pylist(), listing.column("size").to_pylist()))


def _stamp_inputs(results: Results, previous: dict, inputs: dict, log) -> dict:
    """A report from before inputs digests, on a store that matches the listing: record the digest, or the daily
    pass would start a run that publishes nothing every day. Losing the swap is fine: that run recorded its own."""
    stamped = {**previous, "inputs": inputs}
    try:
        storage.write_if(results.report_uri, json.dumps(stamped, indent=2).encode(), results.token)
    except storage.ConflictError:
        return previous
    log("recorded the inputs digest in the published report")
    return stamped


def _sync_catalog(cfg: JobConfig, log) -> dict:
    """Glue follows report.json. A failure fails the run (its results stay published): the retry, a no-change
    run, syncs again."""
    if not cfg.glue_database:
        return {}
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        done = catalog.sync_glue(cfg.output, cfg.glue_database)
    except (BotoCoreError, ClientError) as exc:
        raise catalog.CatalogError(
            f"results published, but the Glue tables of {cfg.glue_database} were not updated: {exc}"
        ) from None
    log(f"Glue database {cfg.glue_database}: " + ", ".join(f"{name} {what}" for name, what in done.items()))
    return {"catalog": {"glue_database": cfg.glue_database, "tables": done}}


def _content_type(name: str) -> str:
    return {"png": "image/png", "json": "application/json", "html": "text/html; charset=utf-8"}.get(
        name.rsplit(".", 1)[-1], "application/octet-stream"
    )


def _step(fail_at: Optional[str], name: str) -> None:
    if fail_at == name:
        raise RuntimeError(f"injected failure at step {name!r}")


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="seconds")


def _grace(cfg: JobConfig) -> float:
    """Orphans younger than this may belong to a run still writing (never to a published one)."""
    return min(600.0, cfg.keep_snapshots_hours * 3600)


def _local_session():
    from emr_job.session import spark_session

    return spark_session()


def _compaction(cfg: JobConfig, results: Results, files: list, plan: Plan) -> bool:
    """Rewrite files holding deleted rows once the oldest delete is old enough, or when small files pile up."""
    oldest = ((results.report or {}).get("maintenance") or {}).get("oldest_uncompacted_delete")
    if oldest and CLOCK() - datetime.fromisoformat(oldest).timestamp() >= cfg.compact_after_hours * 3600:
        return True
    return sum(f.rows - len(f.deleted) < ROWS_PER_FILE // 4 for f in files) > SMALL_FILES_TO_COMPACT


def _live_after(files: list, change: TableChange) -> list:
    """(path, deleted positions) of every data file of the features table once `change` is applied."""
    live = []
    for f in files:
        deleted = np.union1d(f.deleted, change.deletes.get(f.path, np.array([], np.int64))).astype(np.int64)
        if len(deleted) < f.rows:
            live.append((f.path, deleted, f.rows))
    return live + [(path, np.array([], np.int64), None) for path in change.added]


def _map(spark, rows: list, schema: pa.Schema, ddl: str, body, out_schema: str, arrange=None) -> list:
    """Apply a mapInArrow body to rows (dicts): in Spark tasks, the frame laid out by `arrange`; or here in the
    driver, as one task, when spark is None. Returns the body's output rows as dicts."""
    if spark is None:
        batch = pa.RecordBatch.from_pylist(rows, schema=schema)
        return [row for out in body(iter([batch])) for row in out.to_pylist()]
    frame = spark.createDataFrame([tuple(r[name] for name in schema.names) for r in rows], ddl)
    frame = arrange(frame) if arrange else frame
    return [r.asDict() for r in frame.mapInArrow(body, out_schema).collect()]


def _map_files(spark, live: list, body, out_schema: str, arrange=None) -> list:
    """_map over feature data files: one row per file, with the positions deleted in it."""
    rows = [{"file": path, "deleted": [int(p) for p in deleted]} for path, deleted, _ in live]
    return _map(spark, rows, FILE_TASKS_ARROW, FILE_TASKS_SCHEMA, body, out_schema, arrange)


def _compact(spark, commit: RunCommit, run_id: str, live: list, change: TableChange, files: list) -> list:
    """Files with deleted rows, and small files, rewritten into full files without those rows."""
    old = [(p, d, n) for p, d, n in live if n is not None and (len(d) or n < ROWS_PER_FILE // 4)]
    if not old:
        return live
    schema = arrow_schema("features")
    data_dir = storage.join(commit.results.table_location("features"), "data")
    body = partial(rewrite_files, data_dir=data_dir, run_id=f"{run_id}-compact", schema=schema)
    slices = max(1, math.ceil(sum(n - len(d) for _, d, n in old) / ROWS_PER_FILE))
    written = _map_files(spark, old, body, FILE_ROWS_SCHEMA, lambda frame: frame.coalesce(slices))
    rewritten = {p for p, _, _ in old}
    change.added += [r["path"] for r in written]
    change.removed |= rewritten
    change.removed |= {d for f in files for d in f.delete_files}  # every delete now points at a removed file
    change.deletes = {}
    return [x for x in live if x[0] not in rewritten] + [(r["path"], np.array([], np.int64), None) for r in written]


def _featurize(spark, cfg: JobConfig, plan: Plan, weights, network, commit: RunCommit, run_id: str, timer) -> list:
    """The model pass over the images to (re)compute; returns the tasks' status rows as dicts."""
    if not plan.featurize.num_rows:
        return []
    slices = task_count(spark, plan.featurize.num_rows, cfg.batch_size) if spark else 1
    if spark and cfg.engine == "tensorflow":  # ONNX Runtime needs no warm-up: its session starts in milliseconds
        warm_workers(spark, cfg.batch_size, min(slices, spark.sparkContext.defaultParallelism))
    network = network.result()  # prepared meanwhile
    timer.lap("load_weights")
    commit.table("features")  # created now if this is the first run
    weights_bc = spark.sparkContext.broadcast(network) if spark else SimpleNamespace(value=network)
    body = partial(
        featurize_partition,
        weights=weights_bc,
        fingerprint=weights.fingerprint,
        engine=cfg.engine,
        batch_size=cfg.batch_size,
        io_threads=cfg.io_threads,
        data_dir=storage.join(commit.results.table_location("features"), "data"),
        run_id=run_id,
        schema=arrow_schema("features"),
    )
    # Evenly sized partitions: parallelize() alone slices by 1024-row serialization batches, leaving one task
    # with the remainder while a core idles. The round-robin repartition runs in the JVM on a few KB of paths.
    status = _map(spark, plan.featurize.to_pylist(), IN_ARROW, IN_SCHEMA, body, OUT_SCHEMA,
                  lambda frame: frame.repartition(slices))  # fmt: skip
    if spark:
        weights_bc.unpersist()
    timer.lap("featurize")
    return status


def _pca(spark, cfg: JobConfig, commit: RunCommit, run_id: str, live: list, rpt: dict, n_ok: int, weights, log):
    """Fit PCA on every live feature row, write the projections, update the report (variance, labels, quality);
    returns the run's files (plots, the fitted model) and the rows per label."""
    try:
        moments = _map_files(spark, live, file_moments, MOMENTS_SCHEMA) if live else []
        pca = fit_from_moments(moments, cfg.variance if cfg.k is None else None, cfg.k)
    except PcaError as exc:
        if cfg.k is not None and n_ok >= 2:
            raise  # the user asked for a k this data cannot give
        rpt["pca_skipped"] = str(exc)
        log(f"PCA skipped: {exc}")
        commit.apply("pca", TableChange(replace_all=True))
        return {}, Counter()
    rpt.update(
        k=pca.k,
        explained_variance_ratio=[float(x) for x in pca.explained_variance_ratio],
        explained_variance_total=float(pca.explained_variance_ratio.sum()),
    )
    schema = arrow_schema("pca")
    data_dir = storage.join(commit.results.table_location("pca"), "data")
    with ThreadPoolExecutor(1) as pool:  # matplotlib draws while Spark writes the projections
        variance_png = pool.submit(report.variance_plot, pca.all_ratios, pca.k, rpt["variance_target"])
        body = partial(file_projection, mean=pca.mean, components=pca.components, data_dir=data_dir,
                       run_id=run_id, schema=schema)  # fmt: skip
        written = _map_files(spark, live, body, FILE_ROWS_SCHEMA)
        commit.apply("pca", TableChange(added=[r["path"] for r in written], replace_all=True))
        coords, labels, counts = _sample(written, report.MAX_SCATTER_POINTS)
        loo = quality.loo_accuracy(coords[: quality.MAX_SAMPLE], labels[: quality.MAX_SAMPLE])
        rpt["quality"] = {**loo, "of": n_ok, "caveat": quality.caveat(weights.spec, len(counts))}
        files = {
            "explained_variance.png": variance_png.result(),
            "pca_scatter.png": report.scatter_plot(coords[:, :2], labels),
            **fitted.files(pca, weights, run_id),
        }
        return files, counts


def _sample(written: list, size: int) -> tuple:
    """A uniform random sample (seeded) of up to `size` rows of the new pca files, in random order: (coords,
    labels); and the rows per label of the whole table."""
    import pyarrow.parquet as pq

    total = sum(r["count"] for r in written)
    rng = np.random.default_rng(0)
    picked = np.sort(rng.choice(total, size=min(size, total), replace=False))
    starts = np.cumsum([0] + [r["count"] for r in written])

    def one(i):
        fs, where = storage.filesystem(written[i]["path"])
        part = pq.read_table(where, columns=["label", "pca"], filesystem=fs)
        mine = picked[(picked >= starts[i]) & (picked < starts[i + 1])] - starts[i]
        return Counter(part.column("label").to_pylist()), part.take(pa.array(mine, pa.int64()))

    with ThreadPoolExecutor(8) as pool:
        parts = list(pool.map(one, range(len(written))))
    counts = sum((c for c, _ in parts), Counter())
    rows = pa.concat_tables([t for _, t in parts]) if parts else None
    order = rng.permutation(len(picked))
    coords = np.array(rows.column("pca").to_pylist(), np.float32).reshape(len(picked), -1)[order]
    all_labels = rows.column("label").to_pylist()
    labels = [all_labels[i] for i in order]
    return coords, labels, counts


def task_count(spark, images: int, batch_size: int) -> int:
    """A multiple of the cores for real work; fewer tasks (and worker starts) for a small increment."""
    parallelism = spark.sparkContext.defaultParallelism
    if images < parallelism * batch_size * 4:
        return max(1, min(parallelism, math.ceil(images / (batch_size * 4))))
    return parallelism * max(1, math.ceil(images / IMAGES_PER_TASK / parallelism))


def warm_workers(spark, batch_size: int, n: int) -> None:
    """Build and trace the network (~4 s) in n Python workers now, while the driver loads the weights.

    Through mapInArrow like the real work: Spark reuses those workers for it, not the RDD API's."""
    cells = spark.createDataFrame([(i,) for i in range(n)], "i int").repartition(n)
    cells.mapInArrow(partial(prepare_worker, batch_size=batch_size), "ok boolean").collect()
