"""The reconciliation at scale, without the model: synthetic feature rows, a real Iceberg store, real planning.

  python tests/bench/scale.py build DIR N         a published store of N feature rows (1280 float32 each)
  python tests/bench/scale.py plan DIR N          plan a run with 1% changed; prints wall time and peak RSS
  python tests/bench/scale.py rewrite DIR N       commit that run's writes; prints bytes written vs the store
  python tests/bench/scale.py query-store DIR N   published results of N images (pca, model) to query
  python tests/bench/scale.py trickle DIR N WEIGHTS IMAGES
                                                  a run adding IMAGES to N stored rows: bytes read vs the store

`make bench` runs these (planning in a fresh process, so its peak RSS is the planner's own)."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

ROWS_PER_FILE = 10000
LABELS = 131  # Fruits-360 has 131 labels
K = 50  # PCA width used for the pca table's size; it scales linearly with k


def path_of(i: int) -> str:
    return f"s3://bench/images/label{i % LABELS:03d}/{i:07d}.jpg"


def version_of(i: int, generation: int = 0) -> str:
    return f"{(int(i) * 2654435761 + generation) % 2**64:032x}"


def feature_table(ids: np.ndarray, rng, weights: str = "sha256:bench") -> pa.Table:
    from emr_job.featurize import feature_rows

    rows = [{"path": path_of(i), "label": f"label{i % LABELS:03d}", "version": version_of(i)} for i in ids.tolist()]
    features = np.abs(rng.normal(size=(len(ids), 1280))).astype(np.float32)  # incompressible, as a worst case
    from emr_job.store import arrow_schema

    return feature_rows(rows, features, weights, arrow_schema("features"))


def build(out: str, n: int, weights: str = "sha256:bench") -> dict:
    from emr_job import storage
    from emr_job.store import Results, RunCommit, TableChange

    rng = np.random.default_rng(0)
    commit = RunCommit(Results(out), "bench-build")
    files = []
    for start in range(0, n, ROWS_PER_FILE):
        path = commit.data_file_path("features", str(start // ROWS_PER_FILE))
        storage.write_parquet(path, feature_table(np.arange(start, min(n, start + ROWS_PER_FILE)), rng, weights))
        files.append(path)
    commit.apply("features", TableChange(added=files))
    commit.publish({"run_id": "bench-build"})
    return {"rows": n, "files": len(files), "store_bytes": store_bytes(out)}


def store_bytes(out: str, table: str = "features") -> int:
    return sum(p.stat().st_size for p in (Path(out) / "tables" / table / "data").glob("*.parquet"))


def changed_listing(n: int) -> tuple[pa.Table, dict]:
    """The input after 1% changed: 0.25% deleted, 0.5% rewritten (new ETag), 0.25% new."""
    rng = np.random.default_rng(1)
    ids = np.arange(n)
    deleted = rng.choice(n, n // 400, replace=False)
    keep = np.setdiff1d(ids, deleted)
    modified = set(rng.choice(keep, n // 200, replace=False).tolist())
    new = np.arange(n, n + n // 400)
    all_ids = np.concatenate([keep, new])
    paths = [path_of(i) for i in all_ids]
    versions = [version_of(i, 1 if i in modified else 0) for i in all_ids]
    labels = [f"label{i % LABELS:03d}" for i in all_ids]
    listing = pa.table({"path": paths, "label": labels, "version": versions})
    return listing, {"deleted": len(deleted), "modified": len(modified), "new": len(new)}


def plan(out: str, n: int) -> dict:
    listing, changes = changed_listing(n)  # S3 LIST's side, measured apart: this is the planner's
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    from emr_job.plan import make_plan
    from emr_job.store import Results, live_files, read_live

    results = Results(out)
    files = live_files(results.table("features"))
    index = read_live(files, ["path", "version", "weights"])
    made = make_plan(listing, 0, index, files, results.read("failures"), "sha256:bench")
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "stored": n,
        "changes": changes,
        "to_featurize": made.featurize.num_rows,
        "rows_deleted": int(sum(len(p) for p in made.deletes.values())),
        "files_touched": len(made.deletes),
        "plan_wall_s": round(wall, 2),
        "peak_rss_mb": round(peak / 1024),
        "listing_rss_mb": round(before / 1024),
    }


def write_pca(commit, n: int, k: int = K) -> None:
    """A pca table of n rows of k random coordinates, committed whole."""
    from emr_job import storage
    from emr_job.store import TableChange, arrow_schema

    rng = np.random.default_rng(3)
    schema = arrow_schema("pca")
    files = []
    for start in range(0, n, ROWS_PER_FILE):
        rows = min(ROWS_PER_FILE, n - start)
        coords = rng.normal(size=(rows, k)).astype(np.float32)
        offsets = pa.array(np.arange(0, (rows + 1) * k, k, dtype=np.int32))
        table = pa.Table.from_arrays([
            pa.array([path_of(i) for i in range(start, start + rows)]),
            pa.array([f"label{i % LABELS:03d}" for i in range(start, start + rows)]),
            pa.ListArray.from_arrays(offsets, pa.array(coords.reshape(-1)), type=schema.field("pca").type),
        ], schema=schema)  # fmt: skip
        files.append(commit.data_file_path("pca", str(start // ROWS_PER_FILE)))
        storage.write_parquet(files[-1], table)
    commit.apply("pca", TableChange(added=files, replace_all=True))


def query_store(out: str, n: int, weights_file: str = "random") -> dict:
    """Published results a query can use: a pca table of n rows (k=K) and a fitted model for these weights."""
    from emr_job import fitted, storage
    from emr_job.model import FEATURE_DIM, payload, resolve_weights
    from emr_job.pca import PcaModel
    from emr_job.store import Results, RunCommit

    rng = np.random.default_rng(4)
    components = np.linalg.qr(rng.normal(size=(FEATURE_DIM, K)))[0].T  # orthonormal axes
    pca = PcaModel(rng.normal(size=FEATURE_DIM), components, np.full(K, 1.0 / K), np.full(K, 1.0 / K), n)
    commit = RunCommit(Results(out), "bench-query")
    write_pca(commit, n)
    weights = resolve_weights(weights_file, out)
    for name, data in fitted.files(pca, weights, "bench-query", payload(weights, "onnx")).items():
        storage.write_bytes(f"{out}/runs/bench-query/{name}", data)
    commit.publish({"run_id": "bench-query", "model": f"runs/bench-query/{fitted.MODEL_JSON}",
                    "model_onnx": f"runs/bench-query/{fitted.MODEL_ONNX}",
                    "weights_fingerprint": weights.fingerprint})  # fmt: skip
    return {"stored": n, "k": K}


def rewrite(out: str, n: int) -> dict:
    """Commit what a 1%-changed run writes, as the job does (copy-on-write: every data file holding a row that
    goes is rewritten without it, in the driver here), and count the bytes of every file it created."""
    from emr_job import storage
    from emr_job.job import rewrite_features
    from emr_job.plan import make_plan
    from emr_job.store import Results, RunCommit, TableChange, live_files, read_live

    listing, _ = changed_listing(n)
    results = Results(out)
    files = live_files(results.table("features"))
    made = make_plan(listing, 0, read_live(files, ["path", "version", "weights"]), files,
                     results.read("failures"), "sha256:bench")  # fmt: skip
    existing = {p for p in Path(out).rglob("*") if p.is_file()}
    store = store_bytes(out)  # before the run: afterwards the superseded snapshot's files are still there
    commit = RunCommit(results, "bench-rewrite")
    new_file = commit.data_file_path("features", "0")
    ids = np.array([int(p.rsplit("/", 1)[1][:7]) for p in made.featurize.column("path").to_pylist()])
    storage.write_parquet(new_file, feature_table(ids, np.random.default_rng(2)))
    start = time.perf_counter()
    touched = [
        (f.path, made.deletes[f.path], f.rows - len(made.deletes[f.path])) for f in files if f.path in made.deletes
    ]
    written = rewrite_features(None, commit, "bench-rewrite", touched)
    commit.apply("features", TableChange(added=[new_file, *written], removed={p for p, _, _ in touched}))
    rewrite_s = time.perf_counter() - start
    features_written = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file() and p not in existing)

    # Rows dropped force a refit (an erased image leaves the basis too): the pca table is rewritten whole.
    write_pca(commit, listing.num_rows)  # every listed image has a row once the run is done
    commit.publish({"run_id": "bench-rewrite"})
    pca = store_bytes(out, "pca")
    return {
        "store_bytes": store,
        "files_touched": len(touched),
        "files_in_store": len(files),
        "rewrite_wall_s": round(rewrite_s, 2),
        "features_bytes_written": features_written,
        "features_fraction": round(features_written / store, 4),
        "pca_bytes_written": pca,
        "pca_k": K,
        "all_fraction": round((features_written + pca) / store, 4),
    }


def trickle(out: str, n: int, weights_file: str, images: str) -> dict:
    """A store of n synthetic rows (their moments cached, one pca file per features file, a fitted model: what
    the job leaves), then the job in this process with the images under `images` added to the listing: bytes this
    process read during that run (Linux's rchar: every read(), an upper bound of what it read from the store)
    against the store's bytes (features, moments cache and pca)."""
    from unittest import mock

    from emr_job import job as job_module
    from emr_job import storage
    from emr_job.job import JobConfig, run
    from emr_job.model import resolve_weights

    fingerprint = resolve_weights(weights_file, out).fingerprint
    built = build(out, n, fingerprint)
    ids = np.arange(n)
    columns = [[path_of(i) for i in ids], [f"label{i % LABELS:03d}" for i in ids], [version_of(i) for i in ids]]
    stored = pa.table([*columns, np.full(n, 4000, np.int64)], schema=storage.LISTING_SCHEMA)
    stored = stored.slice(1)  # one image erased: the first run publishes, and refits
    new, _ = storage.list_images(images)
    config = dict(input="s3://bench/images/", output=out, weights=weights_file, k=K, driver_max_rows=10**9)
    with mock.patch.object(job_module.storage, "list_images", lambda root: (stored, 0)):
        start = time.perf_counter()
        run(JobConfig(**config, refit="always"), log=lambda _: None)  # what the job leaves: caches, pca, model
        first_s = time.perf_counter() - start
    store = sum(p.stat().st_size for p in Path(out, "tables").rglob("*") if p.is_file())
    with mock.patch.object(job_module.storage, "list_images", lambda root: (pa.concat_tables([stored, new]), 0)):
        before, start = _rchar(), time.perf_counter()
        rpt = run(JobConfig(**config), log=lambda _: None)
        wall, read = time.perf_counter() - start, _rchar() - before
    return {"stored": n, "store_bytes": store, "features_files": built["files"], "first_run_s": round(first_s, 1),
            "added": rpt["images_featurized"], "basis": rpt["basis"], "moments": rpt["moments"],
            "wall_s": round(wall, 2), "bytes_read": read, "fraction_read": round(read / store, 4)}  # fmt: skip


def _rchar() -> int:
    with open("/proc/self/io") as fh:
        return int(next(line for line in fh if line.startswith("rchar:")).split()[1])


if __name__ == "__main__":
    command, folder, count, *more = sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:]
    steps = {"build": build, "plan": plan, "rewrite": rewrite, "query-store": query_store, "trickle": trickle}
    print(json.dumps(steps[command](folder, count, *more)))
