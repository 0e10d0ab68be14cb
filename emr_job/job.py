"""One run: snapshot the images, featurize what is new, refit PCA, publish results atomically."""

from __future__ import annotations

import json
import math
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from typing import Optional

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from emr_job import model, report
from emr_job.featurize import FAILED, GONE, IN_SCHEMA, OK, OUT_SCHEMA, featurize_partition, prepare_worker
from emr_job.pca import (
    FILES_SCHEMA,
    MOMENTS_SCHEMA,
    PROJECTION_SCHEMA,
    PcaError,
    file_moments,
    file_projection,
    fit_from_moments,
)
from emr_job.storage import Image, Manifest, Output, label_of, list_images, read_manifest

RESULTS = ("features", "pca", "failures")
IMAGES_PER_TASK = 4000  # long tasks amortise per-task set-up; more tasks than cores only past this size
# Parquet buffers a whole row group per writing task (128 MB by default): smaller groups keep the JVM's
# memory flat in the number of images.
PARQUET = {"parquet.block.size": str(16 * 1024 * 1024)}
ROWS_PER_FILE = 10000  # ~50 MB of features per file: the unit of parallelism of the PCA passes
# Failures worth retrying next run even if the file did not change.
TRANSIENT_REASONS = ("read error",)


@dataclass
class JobConfig:
    input: str
    output: str
    manifest: Optional[str] = None
    weights: str = "random"
    variance: Optional[float] = 0.95
    k: Optional[int] = None
    batch_size: int = 32
    io_threads: int = 8


@dataclass
class Plan:
    """What this run does to the store, decided on the driver from paths and versions alone."""

    featurize: list  # Image
    drop: set = field(default_factory=set)  # paths whose old features/failures go (changed, removed)
    early_failures: list = field(default_factory=list)  # (Image, reason) known without reading
    removed: int = 0
    ignored: int = 0


class Timer:
    def __init__(self):
        self.start = self.mark = time.monotonic()
        self.stages: dict = {}

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.stages[name] = round(self.stages.get(name, 0.0) + now - self.mark, 3)
        self.mark = now


def _previous(spark: SparkSession, out: Output, name: str) -> Optional[DataFrame]:
    path = out.path(name)
    return spark.read.parquet(path) if out.exists(path) else None


def plan_run(cfg: JobConfig, manifest: Optional[Manifest], store: dict, failures: dict, fingerprint: str) -> Plan:
    """store: path -> (version, weights fingerprint); failures: path -> (version, reason, label)."""
    if manifest is not None:
        added = list(dict.fromkeys(manifest.added))
        removed = set(manifest.removed) - set(added)  # an add in the same manifest is newer (or GONE at read)
        plan = Plan(featurize=[], drop=removed | set(added))
        plan.removed = len(removed & (store.keys() | failures.keys()))
        root = cfg.input.rstrip("/") + "/"
        for uri in added:
            if not uri.startswith(root):
                plan.early_failures.append((Image(uri, None, None), f"outside the input prefix {root}"))
            else:
                plan.featurize.append(Image(uri, label_of(cfg.input, uri), None))
        # Rows computed with other weights are recomputed, whatever the manifest says.
        stale = [p for p, (v, w) in store.items() if w != fingerprint and p not in plan.drop]
        plan.featurize += [Image(p, label_of(cfg.input, p), None) for p in stale]
        plan.drop |= set(stale)
        return plan
    images, ignored = list_images(cfg.input)
    current = {img.path for img in images}
    plan = Plan(featurize=[], ignored=ignored)
    for img in images:
        if store.get(img.path) == (img.version, fingerprint):
            continue
        old_failure = failures.get(img.path)
        if old_failure and old_failure[0] == img.version and not old_failure[1].startswith(TRANSIENT_REASONS):
            continue
        plan.featurize.append(img)
        plan.drop.add(img.path)
    gone = (store.keys() | failures.keys()) - current
    plan.drop |= gone
    plan.removed = len(gone)
    return plan


def run(spark: SparkSession, cfg: JobConfig, log=print, weights_loading=None) -> dict:
    """weights_loading: (Weights, Future of their arrays) started before the session, or None to load here."""
    timer = Timer()
    out = Output(spark, cfg.output)
    manifest = read_manifest(cfg.manifest) if cfg.manifest else None
    run_id = (manifest.run_id if manifest else "") or (
        datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
    )
    staging = out.path("_staging", run_id)
    out.delete(out.path("_staging"))  # left over by a run that died before publishing
    if weights_loading is None:
        weights, arrays = model.resolve_weights(cfg.weights, tempfile.mkdtemp(prefix="emr_job-")), None
    else:
        weights, arrays = weights_loading

    old_features, old_failures = _previous(spark, out, "features"), _previous(spark, out, "failures")
    store, failures = {}, {}
    if old_features is not None:
        store = {r.path: (r.version, r.weights) for r in old_features.select("path", "version", "weights").collect()}
    if old_failures is not None:
        failures = {r.path: (r.version, r.reason, r.label) for r in old_failures.collect()}
    plan = plan_run(cfg, manifest, store, failures, weights.fingerprint)
    timer.lap("list")
    log(f"{len(plan.featurize)} images to featurize, {len(store)} in the store, {plan.removed} removed")

    new = spark.createDataFrame([], OUT_SCHEMA)
    if plan.featurize:
        slices = task_count(spark, len(plan.featurize), cfg.batch_size)
        warm_workers(spark, cfg.batch_size, min(slices, spark.sparkContext.defaultParallelism))
        arrays = arrays.result() if arrays is not None else model.load_arrays(weights)  # loaded meanwhile
        timer.lap("load_weights")
        new = featurize(spark, cfg, plan, weights, arrays, f"{staging}/new", slices)
    timer.lap("featurize")

    # Every input row gives one output row, so the small non-ok part tells all the counts.
    not_ok = new.filter(F.col("status") != OK).select("path", "label", "version", "status", "reason").collect()
    new_failures = [(r.path, r.reason, r.label, r.version) for r in not_ok if r.status == FAILED]
    featurized = len(plan.featurize) - len(not_ok)
    kept = [(p, reason, label, version) for p, (version, reason, label) in failures.items() if p not in plan.drop]
    early = [(img.path, reason, img.label, img.version) for img, reason in plan.early_failures]
    failure_rows = kept + new_failures + early
    n_ok = len(store.keys() - plan.drop) + featurized
    write_features(spark, old_features, new, plan.drop, weights.fingerprint, n_ok, f"{staging}/features")
    failures_df = spark.createDataFrame(failure_rows, "path string, reason string, label string, version string")
    failures_df.coalesce(1).write.options(**PARQUET).parquet(f"{staging}/failures")
    timer.lap("write")

    rpt = {
        "run_id": run_id,
        "finished_at": None,
        "input": cfg.input,
        "output": cfg.output,
        "manifest": cfg.manifest,
        "weights": weights.description,
        "images_total": n_ok + len(failure_rows),
        "images_ok": n_ok,
        "images_failed": len(failure_rows),
        "images_featurized": featurized,
        "images_failed_this_run": len(new_failures) + len(early),
        "images_reused": n_ok - featurized,
        "images_removed": plan.removed + sum(r.status == GONE for r in not_ok),
        "files_ignored": plan.ignored,
        "failures_by_reason": dict(Counter(reason.split(":")[0] for _, reason, _, _ in failure_rows)),
        "variance_target": cfg.variance if cfg.k is None else None,
        "k": None,
        "explained_variance_ratio": [],
        "explained_variance_total": None,
        "pca_skipped": None,
        "plots": [],
    }
    plots = fit_and_project(spark, out, cfg, rpt, f"{staging}/features", f"{staging}/pca", n_ok, log)
    timer.lap("pca")

    for name, data in plots.items():
        out.write_bytes(f"{staging}/{name}", data)
    rpt["plots"] = sorted(plots)
    rpt["timings_s"] = {**timer.stages, "total": round(time.monotonic() - timer.start, 3)}
    rpt["images_per_second"] = round(rpt["images_featurized"] / max(timer.stages["featurize"], 1e-9), 2)
    rpt["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out.write_bytes(f"{staging}/report.json", json.dumps(rpt, indent=2).encode())
    publish(out, staging, [*plots, "report.json"])
    out.delete(out.path("_staging"))
    return rpt


def featurize(spark, cfg: JobConfig, plan: Plan, weights, arrays: list, path: str, slices: int) -> DataFrame:
    """The model pass, written once to staging: everything after it reads the result, never recomputes."""
    weights_bc = spark.sparkContext.broadcast(arrays)
    tasks = task_frame(spark, [(img.path, img.label, img.version) for img in plan.featurize], slices)
    body = partial(
        featurize_partition,
        weights=weights_bc,
        fingerprint=weights.fingerprint,
        batch_size=cfg.batch_size,
        io_threads=cfg.io_threads,
    )
    tasks.mapInArrow(body, OUT_SCHEMA).write.options(**PARQUET).parquet(path)
    weights_bc.unpersist()
    return spark.read.parquet(path)


def write_features(spark, old_features, new: DataFrame, drop: set, fingerprint: str, n_rows: int, path: str):
    """The store: old rows still valid plus the new ones, in files of about ROWS_PER_FILE rows."""
    features = new.filter(F.col("status") == OK).select(
        "path", "label", "features", "version", F.lit(fingerprint).alias("weights")
    )
    if old_features is not None:
        gone = spark.createDataFrame([(p,) for p in drop], "path string")
        kept = old_features.join(F.broadcast(gone), "path", "left_anti").select(features.columns)
        features = kept.unionByName(features)
    features.coalesce(max(1, math.ceil(n_rows / ROWS_PER_FILE))).write.options(**PARQUET).parquet(path)


def fit_and_project(spark, out: Output, cfg: JobConfig, rpt: dict, features_path: str, pca_path: str, n_ok: int, log):
    """Fit PCA on the whole store, write the projections, update the report; returns the plots as PNG bytes."""
    files = out.list_files(features_path, ".parquet")
    tasks = spark.createDataFrame([(f,) for f in files], FILES_SCHEMA)  # a few names: one per slice already
    try:
        moments = tasks.mapInArrow(file_moments, MOMENTS_SCHEMA).collect()
        pca = fit_from_moments(moments, cfg.variance if cfg.k is None else None, cfg.k)
    except PcaError as exc:
        if cfg.k is not None and n_ok >= 2:
            raise  # the user asked for a k this data cannot give
        rpt["pca_skipped"] = str(exc)
        log(f"PCA skipped: {exc}")
        spark.createDataFrame([], PROJECTION_SCHEMA).write.options(**PARQUET).parquet(pca_path)
        return {}
    rpt.update(
        k=pca.k,
        explained_variance_ratio=[float(x) for x in pca.explained_variance_ratio],
        explained_variance_total=float(pca.explained_variance_ratio.sum()),
    )
    with ThreadPoolExecutor(1) as pool:  # matplotlib draws while Spark writes the projections
        variance_png = pool.submit(report.variance_plot, pca.all_ratios, pca.k, rpt["variance_target"])
        body = partial(file_projection, mean=pca.mean, components=pca.components)
        tasks.mapInArrow(body, PROJECTION_SCHEMA).write.options(**PARQUET).parquet(pca_path)
        sample = spark.read.parquet(pca_path).limit(report.MAX_SCATTER_POINTS).collect()
        coords = np.array([r.pca[:2] for r in sample], dtype=np.float32).reshape(len(sample), -1)
        return {
            "explained_variance.png": variance_png.result(),
            "pca_scatter.png": report.scatter_plot(coords, [r.label for r in sample]),
        }


def task_count(spark: SparkSession, images: int, batch_size: int) -> int:
    """A multiple of the cores for real work; fewer tasks (and TensorFlow starts) for a small increment."""
    parallelism = spark.sparkContext.defaultParallelism
    if images < parallelism * batch_size * 4:
        return max(1, min(parallelism, math.ceil(images / (batch_size * 4))))
    return parallelism * max(1, math.ceil(images / IMAGES_PER_TASK / parallelism))


def task_frame(spark: SparkSession, rows: list, slices: int) -> DataFrame:
    """Images to featurize in evenly sized partitions.

    The round-robin repartition runs in the JVM on a few KB of paths. Without it, parallelize() (which
    createDataFrame(list) uses) slices by 1024-row serialization batches: one task gets the remainder and
    a core idles while it finishes."""
    return spark.createDataFrame(rows, IN_SCHEMA).repartition(slices)


def warm_workers(spark: SparkSession, batch_size: int, n: int) -> None:
    """Build and trace the network (~4 s) in n Python workers now, while the driver loads the weights.

    Through mapInArrow like the real work: Spark reuses those workers for it, not the RDD API's."""
    cells = spark.createDataFrame([(i,) for i in range(n)], "i int").repartition(n)
    cells.mapInArrow(partial(prepare_worker, batch_size=batch_size), "ok boolean").collect()


def publish(out: Output, staging: str, files: list) -> None:
    """Swap staged results in only after every one of them was written: a failed run leaves the old ones."""
    trash = f"{staging}/_previous"
    for name in [*RESULTS, *files]:
        final = out.path(name)
        if out.exists(final):
            out.rename(final, f"{trash}/{name}")
        out.rename(f"{staging}/{name}", final)
