"""Per-file moments of the features table, cached beside each data file: what a PCA refit merges instead of reading
every row again.

  tables/features/moments/<data file stem>.npz   the data file's name and rows, n, the mean (1280,) and the
                                                 upper triangle of the centred scatter sum((x - mean)(x - mean)^T),
                                                 float64, and the rows per label
  runs/<run_id>/moments.npz                      the same for every row the run published, and the data files
                                                 they are in: a run that only adds files merges theirs into it,
                                                 reading no other entry

An entry is keyed to its data file (immutable, its name unique) by name, and by row count where the reader knows
it. One that is missing, unreadable or another file's is recomputed from the data file: correctness never depends
on the cache. It holds no object key (labels are folder names, which report.json lists anyway). Orphan removal
keeps an entry exactly as long as its data file (store.remove_orphans): erasure, expiry and orphan removal take
them together.

Partial moments merge exactly (Chan et al.'s pairwise update): the merged mean and scatter equal those of the rows
to float64 rounding, whatever the split."""

from __future__ import annotations

import io
import json
import zipfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa

from emr_job import storage
from emr_job.model import FEATURE_DIM

FORMAT = 1
UPPER = np.triu_indices(FEATURE_DIM)
ROW_SCHEMA = pa.schema([("n", pa.int64()), ("mean", pa.binary()), ("scatter", pa.binary()), ("labels", pa.string()),
                        ("cached", pa.int64()), ("computed", pa.int64())])  # fmt: skip


@dataclass
class Moments:
    n: int
    mean: np.ndarray  # (d,) float64
    scatter: np.ndarray  # (d, d) float64, symmetric: the centred sum of squares and cross-products
    labels: dict = field(default_factory=dict)  # label -> rows

    @property
    def covariance(self) -> np.ndarray:
        return self.scatter / (self.n - 1)


def empty() -> Moments:
    return Moments(0, np.zeros(FEATURE_DIM), np.zeros((FEATURE_DIM, FEATURE_DIM)), {})


def of_batches(batches: Iterable[pa.RecordBatch]) -> Moments:
    """Moments of the rows of RecordBatches with a "features" column (and "label", if present). Accumulated around
    a shift (the first slice's mean): X^T X - n mean mean^T on raw features would cancel catastrophically wherever
    features vary little compared with their mean."""
    n, shift, labels = 0, None, Counter()
    total, xtx = np.zeros(FEATURE_DIM), np.zeros((FEATURE_DIM, FEATURE_DIM))
    for batch in batches:
        if batch.num_rows == 0:
            continue
        x = batch.column("features").flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, -1)
        x = x.astype(np.float64)
        if shift is None:
            shift = x.mean(axis=0)
        x -= shift
        n += len(x)
        total += x.sum(axis=0)
        xtx += x.T @ x  # numpy sees the transpose pair and uses BLAS syrk: half the work
        if "label" in batch.schema.names:
            labels.update(batch.column("label").to_pylist())
    if not n:
        return empty()
    mean = shift + total / n
    return Moments(n, mean, xtx - np.outer(total, total) / n, dict(labels))


def merge(parts: Iterable[Moments]) -> Moments:
    """The moments of the union of the parts' rows."""
    parts = [p for p in parts if p.n]
    if not parts:
        return empty()
    n = sum(p.n for p in parts)
    mean = sum(p.n * p.mean for p in parts) / n
    scatter = np.zeros((FEATURE_DIM, FEATURE_DIM))
    labels: Counter = Counter()
    for p in parts:
        gap = p.mean - mean
        scatter += p.scatter + p.n * np.outer(gap, gap)  # each part's spread, and its mean's spread around the mean
        labels.update(p.labels)
    return Moments(n, mean, scatter, dict(labels))


# --- the cache ---------------------------------------------------------------------------------------------
def cache_path(data_file: str) -> str:
    """Where a features data file's moments are cached: tables/features/moments/<stem>.npz."""
    folder, name = data_file.rsplit("/", 1)
    return f"{folder.rsplit('/', 1)[0]}/moments/{storage.stem(name)}.npz"


def data_file_of(cache: str) -> Optional[str]:
    """The data file a cache entry belongs to, or None for other paths."""
    folder, _, name = cache.rpartition("/")
    if not folder.endswith("/moments") or not name.endswith(".npz"):
        return None
    return f"{folder[: -len('moments')]}data/{name[: -len('.npz')]}.parquet"


def to_bytes(m: Moments, data_file: str) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, format=FORMAT, data_file=storage.basename(data_file), n=m.n, mean=m.mean, scatter=m.scatter[UPPER],
             labels=json.dumps(m.labels, sort_keys=True))  # fmt: skip
    return buf.getvalue()


def from_bytes(data: bytes, data_file: str, rows: Optional[int]) -> Optional[Moments]:
    """The cached moments, or None when the entry is not this data file's (name, rows) or is damaged."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            fields = {name: npz[name] for name in ("format", "data_file", "n", "mean", "scatter", "labels")}
        n = int(fields["n"])
        ok = (int(fields["format"]) == FORMAT and str(fields["data_file"]) == storage.basename(data_file)
              and (rows is None or n == rows) and fields["mean"].shape == (FEATURE_DIM,)
              and fields["scatter"].shape == (len(UPPER[0]),))  # fmt: skip
        if not ok or not (np.isfinite(fields["mean"]).all() and np.isfinite(fields["scatter"]).all()):
            return None
        labels = json.loads(str(fields["labels"]))
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):  # truncated, not npz, wrong types
        return None
    return Moments(n, fields["mean"].astype(np.float64), _symmetric(fields["scatter"]), labels)


def load(data_file: str, rows: Optional[int]) -> Optional[Moments]:
    try:
        data = storage.read_bytes(cache_path(data_file))[0]
    except FileNotFoundError:
        return None
    return from_bytes(data, data_file, rows)


def save(data_file: str, m: Moments) -> None:
    storage.write_bytes(cache_path(data_file), to_bytes(m, data_file))


# --- the published run's total: what an adding run merges its new files' moments into ------------------------
def total_to_bytes(m: Moments, data_files: list) -> bytes:
    """The moments of every row of these data files, in one file (runs/<run_id>/moments.npz)."""
    buf = io.BytesIO()
    np.savez(buf, format=FORMAT, n=m.n, mean=m.mean, scatter=m.scatter[UPPER], labels=json.dumps(m.labels),
             files=np.array(sorted(storage.basename(f) for f in data_files), dtype=str))  # fmt: skip
    return buf.getvalue()


def total_from_bytes(data: bytes) -> Optional[tuple]:
    """(Moments, the data file names they cover), or None when damaged."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            if int(npz["format"]) != FORMAT or npz["scatter"].shape != (len(UPPER[0]),):
                return None
            mean, upper, n = npz["mean"].astype(np.float64), npz["scatter"], int(npz["n"])
            labels, files = json.loads(str(npz["labels"])), {str(f) for f in npz["files"]}
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        return None
    if mean.shape != (FEATURE_DIM,) or not (np.isfinite(mean).all() and np.isfinite(upper).all()):
        return None
    return Moments(n, mean, _symmetric(upper), labels), files


# --- between Spark tasks and the driver -----------------------------------------------------------------------
def to_row(m: Moments, cached: int = 0, computed: int = 0) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {"n": [m.n], "mean": [m.mean.tobytes()], "scatter": [m.scatter[UPPER].tobytes()],
         "labels": [json.dumps(m.labels)], "cached": [cached], "computed": [computed]},
        schema=ROW_SCHEMA,
    )  # fmt: skip


def from_row(row: dict) -> Moments:
    return Moments(row["n"], np.frombuffer(row["mean"]).copy(), _symmetric(np.frombuffer(row["scatter"])),
                   json.loads(row["labels"]))  # fmt: skip


def _symmetric(upper: np.ndarray) -> np.ndarray:
    """The (d, d) scatter matrix from its upper triangle (what is stored and shipped: half the bytes)."""
    scatter = np.zeros((FEATURE_DIM, FEATURE_DIM))
    scatter[UPPER] = upper
    return scatter + np.triu(scatter, 1).T
