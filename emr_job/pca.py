"""PCA as sklearn computes it, from per-file moments: each features data file's mean and centred scatter (cached
beside it, emr_job/moments.py, or computed by a task), merged exactly and decomposed (one eigh) on the driver."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa

from emr_job.model import FEATURE_DIM

ROWS_PER_READ = 1024  # float64 slices that stay in cache: 1.6x faster X^T X than 4096-row slices


class PcaError(ValueError):
    """PCA cannot be fitted as asked (too few images, k too large)."""


@dataclass
class PcaModel:
    mean: np.ndarray  # (d,)
    components: np.ndarray  # (k, d), rows are principal axes, sklearn's components_
    explained_variance_ratio: np.ndarray  # (k,)
    all_ratios: np.ndarray  # (min(n, d),), for the cumulative-variance plot
    n: int

    @property
    def k(self) -> int:
        return len(self.components)


def _matrix(batch: pa.RecordBatch, column: str) -> np.ndarray:
    values = batch.column(column).flatten().to_numpy(zero_copy_only=False)
    return values.reshape(batch.num_rows, -1)


def read_files(file_batches: Iterable[pa.RecordBatch], columns: list) -> Iterator[pa.RecordBatch]:
    """Executor side: the live rows of the table data files named in a "file" column, a slice at a time,
    without the positions listed in its "deleted" column (the rows a rewrite drops).

    Far cheaper than letting Spark hand array<float> rows to Python: its JVM converts them value by value."""
    import pyarrow.parquet as pq

    from emr_job.storage import filesystem

    for tasks in file_batches:
        for name, deleted in zip(tasks.column("file").to_pylist(), tasks.column("deleted").to_pylist()):
            fs, where = filesystem(name)
            gone = np.asarray(deleted or [], dtype=np.int64)
            start = 0
            with fs.open_input_file(where) as fh:
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=ROWS_PER_READ, columns=columns):
                    rows = batch.num_rows
                    if len(gone):
                        batch = batch.filter(pa.array(~np.isin(np.arange(start, start + rows), gone)))
                    start += rows
                    if batch.num_rows:
                        yield batch


def file_moments(file_batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Task body over feature files: one row with the merged moments of their rows (moments.to_row). Each file's
    come from its cache entry when that is valid; otherwise from its rows, and are then cached."""
    from emr_job import moments

    parts, cached, computed = [], 0, 0
    for tasks in file_batches:
        for name, deleted in zip(tasks.column("file").to_pylist(), tasks.column("deleted").to_pylist()):
            part = None if deleted else moments.load(name, None)
            if part is None:
                one = pa.RecordBatch.from_pydict({"file": [name], "deleted": [deleted]}, schema=tasks.schema)
                part = moments.of_batches(read_files([one], ["label", "features"]))
                if not deleted:  # only a whole file's moments are its own
                    moments.save(name, part)
                computed += 1
            else:
                cached += 1
            parts.append(part)
    yield moments.to_row(moments.merge(parts), cached, computed)


PCA_OF = "--pca-"  # a pca data file is named <its features data file's stem>--pca-<run id>.parquet


def pca_file_name(features_file: str, run_id: str) -> str:
    from emr_job.storage import stem

    return f"{stem(features_file)}{PCA_OF}{run_id}.parquet"


def features_stem(pca_file: str) -> Optional[str]:
    """The stem of the features data file a pca data file projects, or None for files of the older layout."""
    name = pca_file.rsplit("/", 1)[-1]
    return name.split(PCA_OF)[0] if PCA_OF in name else None


def file_projection(file_batches: Iterable[pa.RecordBatch], mean, components, data_dir: str, run_id: str, schema):
    """Task body over feature files: each file's rows projected on the principal axes, written here as one pca
    data file named after it (so a run that keeps the basis projects only new files); yields (path, count)."""
    from emr_job.storage import write_parquet

    for tasks in file_batches:
        for name, deleted in zip(tasks.column("file").to_pylist(), tasks.column("deleted").to_pylist()):
            one = pa.RecordBatch.from_pydict({"file": [name], "deleted": [deleted]}, schema=tasks.schema)
            rows = read_files([one], ["path", "label", "features"])
            parts = [pa.Table.from_batches([b]).cast(schema) for b in project_partition(rows, mean, components)]
            if not parts:
                continue
            path = f"{data_dir}/{pca_file_name(name, run_id)}"
            table = pa.concat_tables(parts)
            write_parquet(path, table)
            yield pa.RecordBatch.from_pydict(
                {"path": [path], "count": [table.num_rows]},
                schema=pa.schema([("path", pa.string()), ("count", pa.int64())]),
            )


def rewrite_files(file_batches: Iterable[pa.RecordBatch], data_dir: str, run_id: str, schema):
    """Task body of compaction: data files with deleted rows -> new files with only the live rows."""
    from emr_job.featurize import FileRoller

    files = FileRoller(data_dir, run_id, _partition())
    for batch in read_files(file_batches, schema.names):
        for written in files.add(pa.Table.from_batches([batch]).cast(schema)):
            yield written.select(["path", "count"])
    for written in files.flush():
        yield written.select(["path", "count"])


def _partition() -> int:
    from pyspark import TaskContext

    ctx = TaskContext.get()
    return ctx.partitionId() if ctx is not None else 0


def fit(merged, variance: Optional[float], k: Optional[int]) -> PcaModel:
    """sklearn's PCA(n_components=variance or k, svd_solver="full") of the rows whose moments are merged
    (moments.Moments)."""
    n = merged.n
    if n < 2:
        raise PcaError(f"PCA needs at least 2 images with features; there {'is' if n == 1 else 'are'} {n}")
    eigvals, eigvecs = np.linalg.eigh(merged.covariance)
    order = np.argsort(eigvals)[::-1]
    eigvals, eigvecs = np.clip(eigvals[order], 0.0, None), eigvecs[:, order]
    rank_limit = min(n, FEATURE_DIM)  # sklearn: n_components <= min(n_samples, n_features)
    total_var = eigvals.sum()
    ratios = eigvals[:rank_limit] / total_var if total_var > 0 else np.zeros(rank_limit)
    if k is not None:
        if not 1 <= k <= rank_limit:
            raise PcaError(f"--k {k} is out of range: {n} images with {FEATURE_DIM} features allow 1..{rank_limit}")
    else:
        # sklearn's rule for a float n_components: the first k whose cumulative ratio exceeds the target.
        k = int(np.searchsorted(np.cumsum(ratios), variance, side="right") + 1)
        k = min(k, rank_limit)
    components = eigvecs[:, :k].T
    # sklearn's svd_flip(u_based_decision=False): the largest |loading| of each axis is positive.
    signs = np.sign(components[np.arange(k), np.argmax(np.abs(components), axis=1)])
    components = components * np.where(signs == 0, 1.0, signs)[:, None]
    return PcaModel(merged.mean, components, ratios[:k], ratios, n)


def project(features: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """(features - mean) @ components.T in float64, as float32: the stored rows and a query's alike."""
    return ((np.asarray(features, np.float64) - mean) @ components.T).astype(np.float32)


def project_partition(batches: Iterable[pa.RecordBatch], mean: np.ndarray, components: np.ndarray):
    """Task body: features -> their projection (project), as float32 arrays."""
    k = len(components)
    for batch in batches:
        if batch.num_rows == 0:
            continue
        coords = project(_matrix(batch, "features"), mean, components)
        offsets = pa.array(np.arange(0, (batch.num_rows + 1) * k, k, dtype=np.int32))
        yield pa.RecordBatch.from_arrays(
            [
                batch.column("path"),
                batch.column("label"),
                pa.ListArray.from_arrays(offsets, pa.array(coords.reshape(-1))),
            ],
            names=["path", "label", "pca"],
        )
