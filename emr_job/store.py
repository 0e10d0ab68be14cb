"""The published results: three Apache Iceberg tables, committed together by one conditional write of report.json.

  <output>/report.json      the published run: its report, and the Iceberg metadata file of each table it wrote
  <output>/tables/<name>/   Iceberg tables (metadata/, data/): features, pca, failures; features/moments/ caches
                            each features data file's moments (emr_job/moments.py)
  <output>/runs/<run_id>/   plots and other files of that run
  <output>/_running/<id>    one marker per run writing files (its body: the launch id of a pipeline run, if any)

A run writes immutable files only: data files, manifests and new metadata files that nothing points to yet.
Then one compare-and-swap of report.json (S3 If-Match, a lock file locally) publishes all tables at once. Until
then readers see the previous run, whole; a crash anywhere before leaves it as it was; a run that loses the swap
(another published meanwhile) publishes nothing. Per-table catalogs commit one table at a time, which would let a
crash publish one run's features beside another's PCA: so catalogs (Glue, a local SQL catalog) are projections
of report.json, re-synced after each swap, not the commit point.

Rows leave by copy-on-write: a data file holding a row that goes is rewritten without it in the same snapshot,
so an erased image is in no file of the current snapshot. Older snapshots (a reader in mid-query may still use
them) expire after keep_snapshots_s, and orphan removal then deletes the files only they reached.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from emr_job import iceberg, moments, storage

TABLE_NAMES = ("features", "pca", "failures")
FORMAT = 1  # of report.json's "commit" block
TABLE_PROPERTIES = {
    "format-version": "2",
    "write.delete.mode": "copy-on-write",  # erased rows must leave the current files (other writers too)
    "write.update.mode": "copy-on-write",
    "commit.retry.num-retries": "0",  # the commit point is report.json; a lost swap is never retried blindly
    **iceberg.NO_BOUNDS,
}


def schemas() -> dict:
    from pyiceberg.schema import Schema
    from pyiceberg.types import FloatType, ListType, NestedField, StringType

    # Ids as Iceberg assigns them on create (top-level fields first, then list elements), so files written
    # with these schemas match the tables'.
    path, label = NestedField(1, "path", StringType(), required=True), NestedField(2, "label", StringType())
    return {
        "features": Schema(
            path,
            label,
            NestedField(3, "features", ListType(6, FloatType(), element_required=False), required=True),
            NestedField(4, "version", StringType()),
            NestedField(5, "weights", StringType(), required=True),
        ),
        "pca": Schema(
            path, label, NestedField(3, "pca", ListType(4, FloatType(), element_required=False), required=True)
        ),
        "failures": Schema(
            path, label, NestedField(3, "reason", StringType(), required=True), NestedField(4, "version", StringType())
        ),
    }


def arrow_schema(name: str) -> pa.Schema:
    """The Arrow schema of a table's data files, field ids included (what Athena and Spark resolve columns by)."""
    from pyiceberg.io.pyarrow import schema_to_pyarrow

    return small_types(schema_to_pyarrow(schemas()[name]))


def small_types(schema: pa.Schema) -> pa.Schema:
    """string and list, not pyiceberg's large_string and large_list (Arrow joins need one or the other);
    field ids kept."""

    def small(t: pa.DataType) -> pa.DataType:
        if pa.types.is_large_string(t):
            return pa.string()
        if pa.types.is_large_list(t) or pa.types.is_list(t):
            return pa.list_(t.value_field.with_type(small(t.value_type)))
        return t

    return pa.schema([f.with_type(small(f.type)) for f in schema], metadata=schema.metadata)


def new_file_name(run_id: str, part: str = "0") -> str:
    return f"{run_id}-{part}-{uuid.uuid4().hex[:12]}.parquet"


# --- reading -------------------------------------------------------------------------------------------
@dataclass
class LiveFile:
    """A data file of a table and the positions of its rows that deletes removed."""

    path: str
    rows: int
    deleted: np.ndarray  # int64 positions (only in stores written before erasure became copy-on-write)
    delete_files: tuple = ()  # paths of the position delete files that apply to it


class Results:
    """What readers see: the published report.json and the table snapshots it names."""

    def __init__(self, output: str):
        self.root = storage.normalize(output)
        raw, self.token = storage.read_versioned(self.report_uri)
        self.report: Optional[dict] = json.loads(raw) if raw else None
        self._tables: dict = {}

    @property
    def report_uri(self) -> str:
        return storage.join(self.root, "report.json")

    def table_location(self, name: str) -> str:
        return storage.join(self.root, "tables", name)

    def metadata_location(self, name: str) -> Optional[str]:
        if not self.report:
            return None
        return self.report.get("commit", {}).get("tables", {}).get(name)

    def table(self, name: str):
        """The published snapshot of a table (pyiceberg StaticTable), or None before the first run."""
        if name not in self._tables:
            location = self.metadata_location(name)
            if location is None:
                self._tables[name] = None
            else:
                from pyiceberg.table import StaticTable

                self._tables[name] = StaticTable.from_metadata(location, properties=storage.io_properties())
        return self._tables[name]

    def read(self, name: str, columns: Optional[tuple] = None) -> pa.Table:
        """The live rows of a published table (deletes applied), as Arrow."""
        table = self.table(name)
        if table is None:
            schema = arrow_schema(name)
            return schema.empty_table() if columns is None else schema.empty_table().select(list(columns))
        scan = table.scan(selected_fields=columns) if columns else table.scan()
        data = scan.to_arrow()
        return data.cast(small_types(data.schema))


def live_files(table) -> list:
    """The data files of a table snapshot with, for each, the row positions its delete files remove."""
    if table is None or table.current_snapshot() is None:
        return []
    tasks = list(table.scan().plan_files())
    deleted = iceberg.deleted_positions(table.io, tasks) if any(t.delete_files for t in tasks) else {}
    none = np.array([], np.int64)
    return [LiveFile(t.file.file_path, t.file.record_count, deleted.get(t.file.file_path, none),
                     tuple(d.file_path for d in t.delete_files)) for t in tasks]  # fmt: skip


def read_live(files: list, columns: list, threads: int = 16) -> pa.Table:
    """Selected columns of the live rows of data files, plus _file (index into files) and _pos (row position)."""

    def one(item):
        i, live = item
        fs, where = storage.filesystem(live.path)
        data = pq.read_table(where, columns=columns, filesystem=fs)
        data = data.cast(small_types(data.schema))
        positions = np.arange(data.num_rows, dtype=np.int64)
        keep = ~np.isin(positions, live.deleted)
        data = data.append_column("_file", pa.array(np.full(data.num_rows, i, np.int32)))
        data = data.append_column("_pos", pa.array(positions))
        return data.filter(pa.array(keep))

    if not files:
        return pa.table({**{c: pa.array([], pa.string()) for c in columns}, "_file": pa.array([], pa.int32()),
                         "_pos": pa.array([], pa.int64())})  # fmt: skip
    with ThreadPoolExecutor(threads) as pool:
        parts = list(pool.map(one, enumerate(files)))
    return pa.concat_tables(parts, promote_options="permissive")


# --- writing -------------------------------------------------------------------------------------------
class CommitError(RuntimeError):
    """This run's results were not published (another run published first, or a step failed before the swap)."""


@dataclass
class TableChange:
    """One snapshot: the parent's files minus `removed` (or all of them), plus new data files."""

    added: list = field(default_factory=list)  # paths of data files written by this run
    removed: set = field(default_factory=set)  # data or delete file paths to drop (rewritten, replaced)
    replace_all: bool = False


class RunCommit:
    """Prepares the snapshots of one run on the published state it started from, then publishes them."""

    def __init__(self, results: Results, run_id: str, keep_snapshots_s: float = 1800.0,
                 clock: Callable[[], float] = time.time):  # fmt: skip
        from pyiceberg.catalog.memory import InMemoryCatalog

        self.results, self.run_id, self.keep_snapshots_s, self.clock = results, run_id, keep_snapshots_s, clock
        # A throwaway catalog for this process only: it writes each table's new metadata file.
        self.catalog = InMemoryCatalog(
            f"run-{uuid.uuid4().hex[:8]}", warehouse=storage.join(results.root, "tables"), **storage.io_properties()
        )
        self.catalog.create_namespace("results")
        self.tables: dict = {}
        self.expired = 0  # snapshots this run expired

    def table(self, name: str):
        if name not in self.tables:
            ident = ("results", name)
            location = self.results.metadata_location(name)
            if location:
                self.tables[name] = self.catalog.register_table(ident, location)
            else:
                self.tables[name] = self.catalog.create_table(
                    ident, schemas()[name], location=self.results.table_location(name), properties=TABLE_PROPERTIES
                )
        return self.tables[name]

    def data_file_path(self, name: str, part: str) -> str:
        return storage.join(self.results.table_location(name), "data", new_file_name(self.run_id, part))

    def apply(self, name: str, change: TableChange, summary: Optional[dict] = None) -> None:
        """Stage one snapshot of a table (new metadata file, not yet published), and expire old snapshots."""
        table = self.table(name)
        data_files = [iceberg.data_file(table.io, table.metadata, path) for path in change.added]
        outdated = {k: v for k, v in TABLE_PROPERTIES.items()
                    if k != "format-version" and table.metadata.properties.get(k) != v}  # fmt: skip
        with table.transaction() as tx:
            if outdated:  # a table made by an earlier version (merge-on-read, path bounds): other writers follow these
                tx.set_properties(outdated)
            producer = iceberg.ReplaceFiles(tx, table.io, data_files, change.removed, change.replace_all,
                                            {"run-id": self.run_id, **(summary or {})})  # fmt: skip
            producer.commit()
            self.expired += iceberg.expire_older_than(tx, self.clock() - self.keep_snapshots_s)
        self.tables[name] = self.catalog.load_table(("results", name))

    def expirable(self, name: str) -> bool:
        """Whether the published table has a snapshot that expire() would remove (by the same clock and window)."""
        table = self.results.table(name)
        cutoff_ms = (self.clock() - self.keep_snapshots_s) * 1000
        current = table.metadata.current_snapshot_id if table is not None else None
        return table is not None and any(s.timestamp_ms < cutoff_ms and s.snapshot_id != current
                                         for s in table.metadata.snapshots)  # fmt: skip

    def expire(self, name: str) -> int:
        """Stage only the expiry of a table's old snapshots (a run that changes no rows); how many expired."""
        if self.results.metadata_location(name) is None:
            return 0
        table = self.table(name)
        with table.transaction() as tx:
            count = iceberg.expire_older_than(tx, self.clock() - self.keep_snapshots_s)
        if count:
            self.tables[name] = self.catalog.load_table(("results", name))
            self.expired += count
        else:
            del self.tables[name]  # nothing staged: publish keeps the published metadata
        return count

    def superseded_since(self) -> Optional[float]:
        """When the newest snapshot that is not current was made (epoch seconds), over every table as this
        commit leaves it; None when only current snapshots are left."""
        newest = None
        for name in TABLE_NAMES:
            table = self.tables.get(name) or self.results.table(name)
            if table is None:
                continue
            current = table.metadata.current_snapshot_id
            for snapshot in table.metadata.snapshots:
                if snapshot.snapshot_id != current:
                    newest = max(newest or 0.0, snapshot.timestamp_ms / 1000)
        return newest

    def publish(self, report: dict) -> dict:
        """The swap: report.json names every table's new metadata. Raises CommitError if another run won."""
        tables = {}
        for name in TABLE_NAMES:
            if name in self.tables:
                tables[name] = self.tables[name].metadata_location
            elif self.results.metadata_location(name):
                tables[name] = self.results.metadata_location(name)
        snapshots = dict(((self.results.report or {}).get("commit") or {}).get("snapshots") or {})
        for name, table in self.tables.items():
            snapshot = table.current_snapshot()
            snapshots[name] = snapshot.snapshot_id if snapshot else None
        report = {**report, "commit": {"format": FORMAT, "tables": tables, "snapshots": snapshots}}
        body = json.dumps(report, indent=2).encode()
        try:
            storage.write_if(self.results.report_uri, body, self.results.token)
        except storage.ConflictError as exc:
            raise CommitError(f"not published: {exc}; another run published results meanwhile") from None
        return report


# --- after publishing ------------------------------------------------------------------------------------
def referenced_files(table) -> set:
    """Every file a table's metadata still reaches: itself, manifest lists, manifests, data and delete files."""
    files = {table.metadata_location}
    for snapshot in table.metadata.snapshots:
        files.add(snapshot.manifest_list)
        for manifest in snapshot.manifests(io=table.io):
            files.add(manifest.manifest_path)
            files.update(
                e.data_file.file_path for e in manifest.fetch_manifest_entry(io=table.io, discard_deleted=False)
            )
    return files


RUN_MARKERS = "_running"
RUN_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{8}")  # job.new_run_id(): data files and run folders carry it
MAX_RUN_S = 24 * 3600  # a marker of a run started by hand is stale after this; runs time out long before
SKEW_S = 5.0  # S3's LastModified (1 s resolution) against this machine's clock


def mark_running(results: Results, run_id: str, launch_id: Optional[str] = None) -> str:
    """Announce a run that writes files: while its marker lives, nothing it wrote counts as an orphan. A run the
    pipeline launched records its launch id: at most one launched run is active, so the next one knows it dead."""
    marker = storage.join(results.root, RUN_MARKERS, run_id)
    storage.write_bytes(marker, (launch_id or "").encode())
    return marker


def _live_runs(root: str, now: float, run_id: Optional[str], launch_id: Optional[str]) -> tuple:
    """(run ids whose files are protected, the earliest of their markers' times, markers of dead runs)."""
    live, earliest, dead = set(), now, []
    for marker, modified in storage.list_prefix(storage.join(root, RUN_MARKERS)):
        other = storage.basename(marker)
        if other == run_id:
            live.add(other)
            continue
        try:
            launched = bool(storage.read_bytes(marker)[0].strip())
        except FileNotFoundError:
            continue  # it ended meanwhile
        if (launch_id and launched) or now - modified >= MAX_RUN_S:
            dead.append(marker)  # an earlier launched run (its EMR job ended before this one started), or stale
        else:
            live.add(other)
            earliest = min(earliest, modified)
    return live, earliest, dead


def remove_orphans(output: str, grace_s: float = 600.0, run_id: Optional[str] = None,
                   launch_id: Optional[str] = None, clock: Callable[[], float] = time.time) -> int:  # fmt: skip
    """Delete table files and run folders that the published state no longer reaches: files of expired
    snapshots, of rewritten files, of runs that crashed or lost the swap, and every run folder but the published
    one. Returns how many. run_id, launch_id: the caller's own.

    The published state is read here, never taken from the caller: a run that read it earlier would miss what
    another run published since, and delete that run's files. Then the files are listed, then the run markers,
    then report.json is read again: a run whose file was listed either still has its marker (kept), or ended
    before that listing, by publishing (report.json moved: this looks again) or by crashing (its files go).
    Files named without a run id (Iceberg metadata and manifests) are also kept for grace_s, and while an
    older run is live. A features data file's cached moments (emr_job/moments.py) go when the data file goes."""
    for _ in range(3):
        now = clock()
        results = Results(output)
        keep: set = set()
        for name in TABLE_NAMES:
            table = results.table(name)
            if table is not None:
                keep |= {storage.normalize(f) if not storage.is_s3(f) else f for f in referenced_files(table)}
        listed = [f for folder in ("tables", "runs") for f in storage.list_prefix(storage.join(results.root, folder))]
        live, earliest_live, dead_markers = _live_runs(results.root, now, run_id, launch_id)
        if storage.read_versioned(results.report_uri)[1] == results.token:
            break
    else:
        return 0  # runs keep publishing: the last of them cleans up
    current_run = storage.join(results.root, "runs", results.report["run_id"]) if results.report else None
    doomed = []
    for uri, modified in listed:
        if uri in keep or uri.endswith(".lock") or (current_run and uri.startswith(current_run + "/")):
            continue
        if moments.data_file_of(uri) in keep:
            continue  # a data file's cached moments live as long as it does
        run_ids = set(RUN_ID.findall(uri))
        if run_ids & live:
            continue  # a file of a run still writing
        if not run_ids and (modified > now - grace_s or (live and modified >= earliest_live - SKEW_S)):
            continue  # metadata (named without a run id) that a run still writing may publish
        doomed.append(uri)
    storage.delete_files(doomed + dead_markers)
    return len(doomed)
