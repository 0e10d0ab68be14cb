"""Executor side: image rows in; feature rows written to the features table's data files here; small rows out.

Features never travel through the JVM or the driver: each task writes its own Parquet files (the Iceberg data
files the driver then commits) and returns their names, plus one row per image that failed or vanished."""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from emr_job import model
from emr_job.images import ImageError, decode_image
from emr_job.storage import read_bytes, write_parquet

IN_ARROW = pa.schema([("path", pa.string()), ("label", pa.string()), ("version", pa.string())])
OK, FAILED, GONE, FILE = "ok", "failed", "gone", "file"  # GONE: deleted before it could be read, i.e. erased
PROGRESS_EVERY_S = 10.0
ROWS_PER_FILE = 10000  # ~50 MB of features per data file: the unit of parallelism of the PCA passes

# One row per failed or vanished image, and one per data file written (status "file", its rows in `count`).
_OUT_ARROW = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("version", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("count", pa.int64()),
    ]
)


def load_one(row: dict) -> tuple[dict, np.ndarray | None, str, str | None]:
    """Fetch and decode one image -> (row with version, pixels or None, status, reason). Never raises."""
    if row["label"] is None:
        return row, None, FAILED, "not inside a <label>/ folder under the input"
    try:
        data, etag = read_bytes(row["path"])
    except FileNotFoundError:
        return row, None, GONE, "deleted before it could be read"
    except Exception as exc:
        return row, None, FAILED, f"read error: {type(exc).__name__}: {exc}"
    if etag is not None:
        row = {**row, "version": etag}  # the version actually featurized, should it differ from the listing's
    try:
        return row, decode_image(data), OK, None
    except ImageError as exc:
        return row, None, FAILED, str(exc)


def _rows(batches: Iterable[pa.RecordBatch]) -> Iterator[dict]:
    for batch in batches:
        yield from batch.to_pylist()


def _status_batch(rows: list[tuple[dict, str, str]]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(
        [{**row, "status": status, "reason": why, "count": None} for row, status, why in rows], schema=_OUT_ARROW
    )


def feature_rows(rows: list[dict], features: np.ndarray, weights: str, schema: pa.Schema) -> pa.Table:
    """Rows of the features table: path, label, features (1280 float32), version, weights."""
    n, dim = features.shape
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    values = pa.array(np.ascontiguousarray(features, dtype=np.float32).reshape(-1))
    columns = [
        pa.array([r["path"] for r in rows], pa.string()),
        pa.array([r["label"] for r in rows], pa.string()),
        pa.ListArray.from_arrays(offsets, values, type=schema.field("features").type),
        pa.array([r["version"] for r in rows], pa.string()),
        pa.array([weights] * n, pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


class FileRoller:
    """Rows of one task into data files of at most ROWS_PER_FILE rows, each written once full."""

    def __init__(self, data_dir: str, run_id: str, part: int):
        self.data_dir, self.run_id, self.part = data_dir, run_id, part
        self.pending: list = []
        self.rows = 0
        self.written = 0

    def add(self, table: pa.Table) -> list:
        self.pending.append(table)
        self.rows += table.num_rows
        return self.flush() if self.rows >= ROWS_PER_FILE else []

    def flush(self) -> list:
        """Write what is pending; returns the status row naming the file (none if nothing was pending)."""
        if not self.rows:
            return []
        path = f"{self.data_dir}/{self.run_id}-{self.part}-{self.written}-{uuid.uuid4().hex[:12]}.parquet"
        write_parquet(path, pa.concat_tables(self.pending))
        done = pa.RecordBatch.from_pylist([{"path": path, "status": FILE, "count": self.rows}], schema=_OUT_ARROW)
        self.pending, self.rows, self.written = [], 0, self.written + 1
        return [done]


def _task() -> tuple[int, int]:
    """(cores, partition id) of the running Spark task; in the driver, its cores (at most 4: a driver's share
    of a cluster node is small, and a machine's count would oversubscribe it) and partition 0."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    return (ctx.cpus(), ctx.partitionId()) if ctx is not None else (min(4, len(os.sched_getaffinity(0))), 0)


def prepare_worker(batches: Iterable[pa.RecordBatch], batch_size: int) -> Iterator[pa.RecordBatch]:
    """Task body of the warm-up: build and trace the network in this Python worker, ahead of the work."""
    for _ in batches:
        pass
    model.compiled(batch_size, _task()[0])
    yield pa.RecordBatch.from_pydict({"ok": [True]})


def featurize_partition(
    batches: Iterable[pa.RecordBatch],
    weights,
    fingerprint: str,
    engine: str,
    batch_size: int,
    io_threads: int,
    data_dir: str,
    run_id: str,
    schema: pa.Schema,
) -> Iterator[pa.RecordBatch]:
    """Task body. Reads and decodes run ahead in threads while the model works on the previous batch."""
    threads, part = _task()
    run, ready = None, 0.0
    done, last_report, started = 0, time.monotonic(), time.monotonic()
    ok_rows: list[dict] = []
    ok_pixels: list[np.ndarray] = []
    failed: list[tuple[dict, str, str]] = []
    files = FileRoller(data_dir, run_id, part)
    with ThreadPoolExecutor(io_threads) as pool:
        pending: deque = deque()
        rows = _rows(batches)
        exhausted = False
        while pending or not exhausted:
            # Bounded look-ahead keeps memory flat however large the partition is.
            while not exhausted and len(pending) < 2 * batch_size:
                try:
                    pending.append(pool.submit(load_one, next(rows)))
                except StopIteration:
                    exhausted = True
            if pending:
                row, pixels, status, reason = pending.popleft().result()
                if status == OK:
                    ok_rows.append(row)
                    ok_pixels.append(pixels)
                else:
                    failed.append((row, status, reason))
            if len(ok_rows) == batch_size or (ok_rows and not pending and exhausted):
                if run is None:
                    run = model.featurizer(weights, fingerprint, engine, batch_size, threads)
                    ready = time.monotonic() - started
                features = run(np.stack(ok_pixels))
                yield from files.add(feature_rows(ok_rows, features, fingerprint, schema))
                done += len(ok_rows)
                ok_rows, ok_pixels = [], []
            if len(failed) >= batch_size or (failed and not pending and exhausted):
                yield _status_batch(failed)
                done += len(failed)
                failed = []
            now = time.monotonic()
            if now - last_report > PROGRESS_EVERY_S:
                rate = done / (now - started)
                print(f"  partition {part}: {done} images, {rate:.0f}/s", file=sys.stderr, flush=True)
                last_report = now
    yield from files.flush()
    took = time.monotonic() - started
    print(f"  partition {part}: {done} images in {took:.1f}s (model ready after {ready:.1f}s)", file=sys.stderr)
