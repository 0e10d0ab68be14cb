"""One run: snapshot the images, featurize what is new, refit PCA, publish results atomically."""

from __future__ import annotations

import json
import math
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from typing import Optional

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from emr_job import model, report
from emr_job.featurize import FAILED, IN_SCHEMA, OK, OUT_SCHEMA, featurize_partition
from emr_job.pca import (
    MOMENTS_SCHEMA,
    PROJECTION_SCHEMA,
    PcaError,
    fit_from_moments,
    partition_moments,
    project_partition,
)
from emr_job.storage import Image, Output, label_of, list_images, read_manifest

RESULTS = ("features", "pca", "failures")
IMAGES_PER_TASK = 2000  # tasks long enough to amortise the per-worker model build, short enough to balance
ROWS_PER_FILE = 20000
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


def plan_run(cfg: JobConfig, store: dict, failures: dict, fingerprint: str) -> Plan:
    """store: path -> (version, weights fingerprint); failures: path -> (version, reason)."""
    if cfg.manifest:
        manifest = read_manifest(cfg.manifest)
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


def run(spark: SparkSession, cfg: JobConfig, log=print) -> dict:
    timer = Timer()
    out = Output(spark, cfg.output)
    run_id = (read_manifest(cfg.manifest).run_id if cfg.manifest else "") or (
        datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
    )
    staging = out.path("_staging", run_id)
    out.delete(out.path("_staging"))  # left over by a run that died before publishing
    workdir = tempfile.mkdtemp(prefix="emr_job-")
    weights = model.resolve_weights(cfg.weights, workdir)

    old_features, old_failures = _previous(spark, out, "features"), _previous(spark, out, "failures")
    store = {}
    if old_features is not None:
        store = {r.path: (r.version, r.weights) for r in old_features.select("path", "version", "weights").collect()}
    failures = {}
    if old_failures is not None:
        failures = {r.path: (r.version, r.reason) for r in old_failures.select("path", "version", "reason").collect()}
    plan = plan_run(cfg, store, failures, weights.fingerprint)
    timer.lap("list")
    log(f"{len(plan.featurize)} images to featurize, {len(store)} in the store, {plan.removed} removed")

    new_path = f"{staging}/new"
    if plan.featurize:
        arrays = model.load_arrays(weights)
        timer.lap("load_weights")
        weights_bc = spark.sparkContext.broadcast(arrays)
        parallelism = spark.sparkContext.defaultParallelism
        slices = parallelism * max(1, math.ceil(len(plan.featurize) / IMAGES_PER_TASK / parallelism))
        rows = [(img.path, img.label, img.version) for img in plan.featurize]
        tasks = spark.createDataFrame(spark.sparkContext.parallelize(rows, slices), IN_SCHEMA)
        body = partial(
            featurize_partition,
            weights=weights_bc,
            fingerprint=weights.fingerprint,
            batch_size=cfg.batch_size,
            io_threads=cfg.io_threads,
        )
        tasks.mapInArrow(body, OUT_SCHEMA).write.parquet(new_path)
        weights_bc.unpersist()
        new = spark.read.parquet(new_path)
    else:
        new = spark.createDataFrame([], OUT_SCHEMA)
    timer.lap("featurize")

    drop = spark.createDataFrame([(p,) for p in plan.drop], "path string")
    kept_features = old_features.join(F.broadcast(drop), "path", "left_anti") if old_features is not None else None
    new_ok = new.filter(F.col("status") == OK).select(
        "path", "label", "features", "version", F.lit(weights.fingerprint).alias("weights")
    )
    features_df = new_ok if kept_features is None else kept_features.select(new_ok.columns).unionByName(new_ok)
    n_features_rows = features_df.count()
    features_df.coalesce(max(1, math.ceil(n_features_rows / ROWS_PER_FILE))).write.parquet(f"{staging}/features")

    early = spark.createDataFrame(
        [(img.path, reason, img.label, img.version) for img, reason in plan.early_failures],
        "path string, reason string, label string, version string",
    )
    new_failed = new.filter(F.col("status") == FAILED).select("path", "reason", "label", "version")
    failures_df = new_failed.unionByName(early)
    if old_failures is not None:
        failures_df = (
            old_failures.join(F.broadcast(drop), "path", "left_anti")
            .select(failures_df.columns)
            .unionByName(failures_df)
        )
    failures_df.coalesce(1).write.parquet(f"{staging}/failures")
    failure_rows = spark.read.parquet(f"{staging}/failures").select("reason").collect()
    counts = {r.status: r["count"] for r in new.groupBy("status").count().collect()}
    timer.lap("write")

    features = spark.read.parquet(f"{staging}/features")
    rpt = {
        "run_id": run_id,
        "finished_at": None,
        "input": cfg.input,
        "output": cfg.output,
        "manifest": cfg.manifest,
        "weights": weights.description,
        "images_total": n_features_rows + len(failure_rows),
        "images_ok": n_features_rows,
        "images_failed": len(failure_rows),
        "images_featurized": counts.get(OK, 0),
        "images_failed_this_run": counts.get(FAILED, 0) + len(plan.early_failures),
        "images_reused": n_features_rows - counts.get(OK, 0),
        "images_removed": plan.removed + counts.get("gone", 0),
        "files_ignored": plan.ignored,
        "failures_by_reason": dict(Counter(r.reason.split(":")[0] for r in failure_rows)),
        "variance_target": cfg.variance if cfg.k is None else None,
        "k": None,
        "explained_variance_ratio": [],
        "explained_variance_total": None,
        "pca_skipped": None,
        "plots": [],
    }
    plots = {}
    try:
        moments = features.select("features").mapInArrow(partition_moments, MOMENTS_SCHEMA).collect()
        pca = fit_from_moments(moments, cfg.variance if cfg.k is None else None, cfg.k)
        body = partial(project_partition, mean=pca.mean, components=pca.components)
        coords = features.select("path", "label", "features").mapInArrow(body, PROJECTION_SCHEMA)
        coords.write.parquet(f"{staging}/pca")
        rpt.update(
            k=pca.k,
            explained_variance_ratio=[float(x) for x in pca.explained_variance_ratio],
            explained_variance_total=float(pca.explained_variance_ratio.sum()),
        )
        sample = spark.read.parquet(f"{staging}/pca").limit(report.MAX_SCATTER_POINTS).collect()
        plots["explained_variance.png"] = report.variance_plot(pca.all_ratios, pca.k, rpt["variance_target"])
        plots["pca_scatter.png"] = report.scatter_plot(
            np.array([r.pca[:2] for r in sample], dtype=np.float32), [r.label for r in sample]
        )
    except PcaError as exc:
        if cfg.k is not None and n_features_rows >= 2:
            raise  # the user asked for a k this data cannot give
        rpt["pca_skipped"] = str(exc)
        log(f"PCA skipped: {exc}")
        spark.createDataFrame([], PROJECTION_SCHEMA).write.parquet(f"{staging}/pca")
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


def publish(out: Output, staging: str, files: list) -> None:
    """Swap staged results in only after every one of them was written: a failed run leaves the old ones."""
    trash = f"{staging}/_previous"
    for name in [*RESULTS, *files]:
        final = out.path(name)
        if out.exists(final):
            out.rename(final, f"{trash}/{name}")
        out.rename(f"{staging}/{name}", final)
