"""Executor side: image rows in, feature rows (or failure rows) out, streaming and in fixed model batches."""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from emr_job import model
from emr_job.images import ImageError, decode_image
from emr_job.storage import read_bytes

IN_SCHEMA = "path string, label string, version string"
OUT_SCHEMA = "path string, label string, version string, features array<float>, status string, reason string"
OK, FAILED, GONE = "ok", "failed", "gone"  # GONE: deleted before we could read it, i.e. erased, not failed
PROGRESS_EVERY_S = 10.0

_ARROW_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("version", pa.string()),
        ("features", pa.list_(pa.float32())),
        ("status", pa.string()),
        ("reason", pa.string()),
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
        row = {**row, "version": etag}
    try:
        return row, decode_image(data), OK, None
    except ImageError as exc:
        return row, None, FAILED, str(exc)


def _rows(batches: Iterable[pa.RecordBatch]) -> Iterator[dict]:
    for batch in batches:
        yield from batch.to_pylist()


def _failed_batch(rows: list[tuple[dict, str, str]]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [
            pa.array([r["path"] for r, _, _ in rows], pa.string()),
            pa.array([r["label"] for r, _, _ in rows], pa.string()),
            pa.array([r["version"] for r, _, _ in rows], pa.string()),
            pa.nulls(len(rows), pa.list_(pa.float32())),
            pa.array([s for _, s, _ in rows], pa.string()),
            pa.array([why for _, _, why in rows], pa.string()),
        ],
        schema=_ARROW_SCHEMA,
    )


def _ok_batch(rows: list[dict], features: np.ndarray) -> pa.RecordBatch:
    n, dim = features.shape
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    values = pa.array(np.ascontiguousarray(features, dtype=np.float32).reshape(-1))
    return pa.RecordBatch.from_arrays(
        [
            pa.array([r["path"] for r in rows], pa.string()),
            pa.array([r["label"] for r in rows], pa.string()),
            pa.array([r["version"] for r in rows], pa.string()),
            pa.ListArray.from_arrays(offsets, values),
            pa.array([OK] * n, pa.string()),
            pa.nulls(n, pa.string()),
        ],
        schema=_ARROW_SCHEMA,
    )


def _task() -> tuple[int, int]:
    """(cores, partition id) of the running Spark task; (1, 0) outside Spark."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    return (ctx.cpus(), ctx.partitionId()) if ctx is not None else (1, 0)


def prepare_worker(batches: Iterable[pa.RecordBatch], batch_size: int) -> Iterator[pa.RecordBatch]:
    """mapInArrow body of the warm-up: build and trace the network in this Python worker, ahead of the work."""
    for _ in batches:
        pass
    model.compiled(batch_size, _task()[0])
    yield pa.RecordBatch.from_pydict({"ok": [True]})


def featurize_partition(
    batches: Iterable[pa.RecordBatch], weights, fingerprint: str, batch_size: int, io_threads: int
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body. Reads and decodes run ahead in threads while the model works on the previous batch."""
    threads, part = _task()
    run, ready = None, 0.0
    done, last_report, started = 0, time.monotonic(), time.monotonic()
    ok_rows: list[dict] = []
    ok_pixels: list[np.ndarray] = []
    failed: list[tuple[dict, str, str]] = []
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
                    run = model.featurizer(weights, fingerprint, batch_size, threads)
                    ready = time.monotonic() - started
                features = model.features_for(run, np.stack(ok_pixels), batch_size)
                yield _ok_batch(ok_rows, features)
                done += len(ok_rows)
                ok_rows, ok_pixels = [], []
            if len(failed) >= batch_size or (failed and not pending and exhausted):
                yield _failed_batch(failed)
                done += len(failed)
                failed = []
            now = time.monotonic()
            if now - last_report > PROGRESS_EVERY_S:
                rate = done / (now - started)
                print(f"  partition {part}: {done} images, {rate:.0f}/s", file=sys.stderr, flush=True)
                last_report = now
    took = time.monotonic() - started
    print(f"  partition {part}: {done} images in {took:.1f}s (model ready after {ready:.1f}s)", file=sys.stderr)
