"""The moments cached beside each features data file: a refit merges them instead of reading every row, they equal
the rows' own, and an entry that is missing, damaged or another file's is recomputed."""

from pathlib import Path

import numpy as np
import pyarrow as pa

from emr_job import fitted, moments
from emr_job.store import Results, live_files
from tests.job.images import encoded, make_tree, rgb, write


def data_files(out) -> list:
    return [f.path for f in live_files(Results(str(out)).table("features"))]


def of_rows(out) -> moments.Moments:
    table = Results(str(out)).read("features", ("label", "features"))
    return moments.of_batches(table.to_batches())


def moments_of(rpt: dict) -> tuple:
    """(entries read, entries computed, files covered by the published total) of a run."""
    m = rpt["moments"]
    return m["files_cached"], m["files_computed"], m["files_in_total"]


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_a_refit_merges_each_files_cached_moments_and_they_equal_the_rows_own(job, tmp_path):
    # Given published results, made by two runs: two data files
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("a", "b", "c"), per_label=4)
    first = job(src, out, k=2, refit="always")
    assert (first["moments"]["files_computed"], first["moments"]["files_in_total"]) == (1, 0)
    write(f"{src}/c/new.jpg", encoded(rgb(89), "JPEG"))
    assert moments_of(job(src, out, k=2, refit="always")) == (0, 1, 1)  # the new file's, added to the total
    write(f"{src}/a/new.jpg", encoded(rgb(90), "JPEG"))
    write(f"{src}/b/new.jpg", encoded(rgb(91), "JPEG"))

    # When the next run refits
    third = job(src, out, k=2, refit="always")

    # Then it computed only the new file's moments, and every file's entry merges to the moments of all the rows,
    # as does the run's total
    files = data_files(out)
    assert len(files) == 3 and moments_of(third) == (0, 1, 2)
    total, covered = moments.total_from_bytes((out / third["moments"]["total"]).read_bytes())
    assert covered == {f.rsplit("/", 1)[1] for f in files}
    rows = of_rows(out)
    assert relative(total.scatter, rows.scatter) <= 1e-9 and total.labels == rows.labels
    merged = moments.merge(moments.load(f, None) for f in files)
    assert merged.n == rows.n == 15 and merged.labels == rows.labels == {"a": 5, "b": 5, "c": 5}
    assert relative(merged.mean, rows.mean) <= 1e-9 and relative(merged.scatter, rows.scatter) <= 1e-9
    np.testing.assert_allclose(fitted.load(Results(str(out))).mean, rows.mean, rtol=1e-9)

    # And a run after an image was replaced (its file rewritten) merges the other files' own entries
    write(f"{src}/a/new.jpg", encoded(rgb(99), "JPEG"))
    assert moments_of(job(src, out, k=2, refit="always")) == (2, 2, 0)  # the rewritten file and the new one


def test_a_missing_damaged_or_foreign_cache_entry_is_recomputed(job, tmp_path):
    from sklearn.decomposition import PCA

    # Given published results whose three data files' entries are then damaged: one truncated, one replaced by
    # another file's entry, one deleted
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("a", "b"), per_label=4)
    job(src, out, k=2, refit="always")
    for i in range(2):  # a data file per run
        write(f"{src}/a/new{i}.jpg", encoded(rgb(92 + i), "JPEG"))
        job(src, out, k=2, refit="always")
    truncated, foreign, deleted = data_files(out)[:3]
    caches = {f: Path(moments.cache_path(f)) for f in (truncated, foreign, deleted)}
    caches[truncated].write_bytes(caches[truncated].read_bytes()[:1000])
    caches[foreign].write_bytes(caches[deleted].read_bytes())
    caches[deleted].unlink()
    (out / Results(str(out)).report["moments"]["total"]).write_bytes(b"damaged")  # the run's total too
    assert moments.load(truncated, None) is None and moments.load(foreign, None) is None

    # When a change makes the next run refit
    write(f"{src}/b/new.jpg", encoded(rgb(95), "JPEG"))
    rpt = job(src, out, k=2, refit="always")

    # Then every damaged entry was recomputed from its rows (and is whole again), and PCA is sklearn's on the rows
    assert moments_of(rpt) == (0, len(data_files(out)), 0) and len(data_files(out)) == 4
    assert all(moments.load(f, None) is not None for f in data_files(out))
    x = np.array(Results(str(out)).read("features").column("features").to_pylist(), np.float64)
    ref = PCA(n_components=2, svd_solver="full").fit(x)
    np.testing.assert_allclose(rpt["explained_variance_ratio"], ref.explained_variance_ratio_, rtol=1e-6)


def test_moments_merge_exactly_however_the_rows_are_split():
    rng = np.random.default_rng(3)
    x = (50.0 + 0.01 * rng.normal(size=(500, 1280))).astype(np.float32)  # little spread around a large mean
    labels = [f"l{i % 3}" for i in range(500)]

    def batch(lo, hi):
        return pa.RecordBatch.from_pydict({"features": pa.array(list(x[lo:hi])), "label": labels[lo:hi]})

    whole = moments.of_batches([batch(0, 500)])
    split = moments.merge([moments.of_batches([batch(0, 7)]), moments.of_batches([batch(7, 300), batch(300, 301)]),
                           moments.empty(), moments.of_batches([batch(301, 500)])])  # fmt: skip
    ref = np.cov(x.astype(np.float64), rowvar=False) * 499
    assert relative(split.scatter, ref) <= 1e-9 and relative(whole.scatter, ref) <= 1e-9
    assert relative(split.mean, x.astype(np.float64).mean(axis=0)) <= 1e-12
    assert split.labels == whole.labels == {"l0": 167, "l1": 167, "l2": 166}
    data = moments.to_bytes(split, "s3://b/r/tables/features/data/x.parquet")
    back = moments.from_bytes(data, "s3://b/r/tables/features/data/x.parquet", 500)
    assert back is not None and np.array_equal(back.scatter, split.scatter) and back.labels == split.labels
    assert moments.from_bytes(data, "s3://b/r/tables/features/data/y.parquet", 500) is None  # another file's
    assert moments.from_bytes(data, "s3://b/r/tables/features/data/x.parquet", 499) is None  # other rows
    assert moments.data_file_of(moments.cache_path("s3://b/r/tables/features/data/x.parquet")).endswith(
        "data/x.parquet"
    )
