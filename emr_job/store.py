"""The published results: three Apache Iceberg tables, committed together by one conditional write of report.json.

  <output>/report.json      the published run: its report, and the Iceberg metadata file of each table it wrote
  <output>/tables/<name>/   Iceberg tables (metadata/, data/): features, pca, failures
  <output>/runs/<run_id>/   plots and other files of that run

A run writes immutable files only: data files, delete files, manifests and new metadata files that nothing
points to yet. Then one compare-and-swap of report.json (S3 If-Match, a lock file locally) publishes all
tables at once. Until then readers see the previous run, whole; a crash anywhere before leaves it as it
was; a run that loses the swap (another published meanwhile) publishes nothing. Per-table catalogs commit one
table at a time, which would let a crash publish one run's features beside another's PCA: so catalogs (Glue,
a local SQL catalog) are projections of report.json, re-synced after each swap, not the commit point.

Row-level deletes are Iceberg position deletes (merge-on-read): a run that changes 1% of a million images
writes about 1% of the features' bytes. Compaction later rewrites the data files holding deleted rows, and
snapshot expiry plus orphan removal delete the old files, so erased rows leave the table files too.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyiceberg.manifest import (
    DataFileContent,
    ManifestContent,
    ManifestEntry,
    ManifestEntryStatus,
    ManifestWriterV2,
)
from pyiceberg.table.snapshots import Operation
from pyiceberg.table.update.snapshot import _SnapshotProducer

from emr_job import storage

TABLE_NAMES = ("features", "pca", "failures")
FORMAT = 1  # of report.json's "commit" block
DELETE_FILE_PATH_ID, DELETE_POS_ID = 2147483546, 2147483545  # reserved field ids of the Iceberg spec
TABLE_PROPERTIES = {
    "format-version": "2",
    "write.delete.mode": "merge-on-read",
    "commit.retry.num-retries": "0",  # the commit point is report.json; a lost swap is never retried blindly
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


DELETE_SCHEMA = pa.schema(
    [
        pa.field("file_path", pa.string(), nullable=False, metadata={b"PARQUET:field_id": str(DELETE_FILE_PATH_ID)}),
        pa.field("pos", pa.int64(), nullable=False, metadata={b"PARQUET:field_id": str(DELETE_POS_ID)}),
    ]
)


def new_file_name(run_id: str, part: str = "0") -> str:
    return f"{run_id}-{part}-{uuid.uuid4().hex[:12]}.parquet"


# --- reading -------------------------------------------------------------------------------------------
@dataclass
class LiveFile:
    """A data file of a table and the positions of its rows that deletes removed."""

    path: str
    rows: int
    deleted: np.ndarray  # int64 positions
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
    from pyiceberg.io.pyarrow import _read_all_delete_files

    tasks = list(table.scan().plan_files())
    deletes = _read_all_delete_files(table.io, tasks)
    out = []
    for task in tasks:
        chunks = [c for arr in deletes.get(task.file.file_path, []) for c in arr.chunks]
        positions = np.unique(np.concatenate([c.to_numpy() for c in chunks])) if chunks else np.array([], np.int64)
        out.append(LiveFile(task.file.file_path, task.file.record_count, positions.astype(np.int64),
                            tuple(d.file_path for d in task.delete_files)))  # fmt: skip
    return out


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
    """One snapshot: the parent's files minus `removed`, plus new data files and new position delete files."""

    added: list = field(default_factory=list)  # paths of data files written by this run
    deletes: dict = field(default_factory=dict)  # data file path -> positions to delete
    removed: set = field(default_factory=set)  # data or delete file paths to drop (compaction, replacement)
    replace_all: bool = False


class RunCommit:
    """Prepares the snapshots of one run on the published state it started from, then publishes them."""

    def __init__(self, results: Results, run_id: str, keep_snapshots_s: float = 3600.0):
        from pyiceberg.catalog.memory import InMemoryCatalog

        self.results, self.run_id, self.keep_snapshots_s = results, run_id, keep_snapshots_s
        # A throwaway catalog for this process only: it writes each table's new metadata file.
        self.catalog = InMemoryCatalog(
            f"run-{uuid.uuid4().hex[:8]}", warehouse=storage.join(results.root, "tables"), **storage.io_properties()
        )
        self.catalog.create_namespace("results")
        self.tables: dict = {}
        self.changed: set = set()

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
        """Stage one snapshot of a table (new metadata file, not yet published)."""
        table = self.table(name)
        data_files = [data_file(table.io, table.metadata, path) for path in change.added]
        delete_files = [self._write_deletes(name, change.deletes)] if change.deletes else []
        with table.transaction() as tx:
            producer = _ReplaceFiles(
                tx, table.io, data_files + delete_files, change, {"run-id": self.run_id, **(summary or {})}
            )
            producer.commit()
            self._expire(tx)
        self.tables[name] = self.catalog.load_table(("results", name))
        self.changed.add(name)

    def _expire(self, tx) -> None:
        from datetime import datetime, timezone

        from pyiceberg.table.update.snapshot import ExpireSnapshots

        cutoff = datetime.fromtimestamp(time.time() - self.keep_snapshots_s, tz=timezone.utc)
        expire = ExpireSnapshots(tx)
        expire._snapshot_ids_to_expire = set()  # pyiceberg 0.10 shares one set between instances (class attribute)
        expire.older_than(cutoff)
        if expire._snapshot_ids_to_expire:
            expire.commit()

    def _write_deletes(self, name: str, deletes: dict) -> object:
        from pyiceberg.io.pyarrow import (
            compute_statistics_plan,
            data_file_statistics_from_parquet_metadata,
            parquet_path_to_id_mapping,
        )
        from pyiceberg.manifest import DataFile, FileFormat
        from pyiceberg.schema import Schema
        from pyiceberg.typedef import Record
        from pyiceberg.types import LongType, NestedField, StringType

        # The spec's position delete schema (pyiceberg's own constant types pos as int, not long).
        delete_schema = Schema(
            NestedField(DELETE_FILE_PATH_ID, "file_path", StringType(), required=True),
            NestedField(DELETE_POS_ID, "pos", LongType(), required=True),
        )

        paths = sorted(deletes)
        file_paths = [p for p in paths for _ in range(len(deletes[p]))]
        positions = np.concatenate([np.sort(np.asarray(deletes[p], np.int64)) for p in paths])
        rows = pa.table([pa.array(file_paths, pa.string()), pa.array(positions, pa.int64())], schema=DELETE_SCHEMA)
        path = storage.join(self.results.table_location(name), "data", f"deletes-{new_file_name(self.run_id)}")
        size = storage.write_parquet(path, rows)
        fs, where = storage.filesystem(path)
        stats = data_file_statistics_from_parquet_metadata(
            pq.read_metadata(where, filesystem=fs),
            compute_statistics_plan(delete_schema, {}),
            parquet_path_to_id_mapping(delete_schema),
        )
        return DataFile.from_args(
            content=DataFileContent.POSITION_DELETES,
            file_path=path,
            file_format=FileFormat.PARQUET,
            partition=Record(),
            file_size_in_bytes=size,
            sort_order_id=None,
            spec_id=0,
            equality_ids=None,
            key_metadata=None,
            **stats.to_serialized_dict(),
        )

    def publish(self, report: dict) -> dict:
        """The swap: report.json names every table's new metadata. Raises CommitError if another run won."""
        tables = {}
        for name in TABLE_NAMES:
            if name in self.tables:
                tables[name] = self.tables[name].metadata_location
            elif self.results.metadata_location(name):
                tables[name] = self.results.metadata_location(name)
        snapshots = {}
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


class _DeleteManifestWriter(ManifestWriterV2):
    def content(self) -> ManifestContent:
        return ManifestContent.DELETES

    @property
    def _meta(self) -> dict:
        return {**super()._meta, "content": "deletes"}


def _is_data(data_file) -> bool:
    return data_file.content == DataFileContent.DATA


def data_file(io, metadata, path: str):
    """A Parquet file this run wrote with the table's schema (field ids included) -> its Iceberg DataFile.
    pyiceberg's parquet_file_to_data_file, less its refusal of files that carry field ids (before 0.11 it only
    took foreign files for add_files); the EMR runtime's Python 3.9 has pyiceberg 0.10."""
    import pyarrow.parquet as pq
    from pyiceberg.io.pyarrow import (
        _check_pyarrow_schema_compatible,
        compute_statistics_plan,
        data_file_statistics_from_parquet_metadata,
        parquet_path_to_id_mapping,
    )
    from pyiceberg.manifest import DataFile, DataFileContent, FileFormat

    source = io.new_input(path)
    with source.open() as stream:
        parquet = pq.read_metadata(stream)
    schema = metadata.schema()
    _check_pyarrow_schema_compatible(schema, parquet.schema.to_arrow_schema(), format_version=metadata.format_version)
    statistics = data_file_statistics_from_parquet_metadata(
        parquet_metadata=parquet,
        stats_columns=compute_statistics_plan(schema, metadata.properties),
        parquet_column_mapping=parquet_path_to_id_mapping(schema),
    )
    return DataFile.from_args(
        content=DataFileContent.DATA, file_path=path, file_format=FileFormat.PARQUET,
        partition=statistics.partition(metadata.spec(), schema), file_size_in_bytes=len(source), sort_order_id=None,
        spec_id=metadata.default_spec_id, equality_ids=None, key_metadata=None, **statistics.to_serialized_dict(),
    )  # fmt: skip


class _ReplaceFiles(_SnapshotProducer):
    """A snapshot written as complete manifests: kept files as EXISTING entries, new ones as ADDED.

    pyiceberg itself writes copy-on-write deletes only; this snapshot adds position delete files
    (merge-on-read) and drops files (compaction, replacement) at once. Manifests are rewritten whole each
    time: a few KB per hundred files, in exchange for no manifest merging logic."""

    def __init__(self, tx, io, added: list, change: TableChange, properties: dict):
        only_adds = not change.deletes and not change.removed and not change.replace_all
        operation = Operation.APPEND if only_adds else Operation.OVERWRITE
        super().__init__(operation, tx, io, snapshot_properties=properties)
        self._added_data_files = list(added)
        self._change = change

    def _existing_manifests(self) -> list:
        return []

    def _deleted_entries(self) -> list:
        return []

    def _kept_entries(self) -> list:
        parent = self._transaction.table_metadata.snapshot_by_id(self._parent_snapshot_id or -1)
        if parent is None:
            return []
        kept = []
        for manifest in parent.manifests(io=self._io):
            for entry in manifest.fetch_manifest_entry(io=self._io, discard_deleted=True):
                if self._change.replace_all or entry.data_file.file_path in self._change.removed:
                    self._deleted_data_files.add(entry.data_file)  # counted in the snapshot summary
                else:
                    kept.append(entry)
        return kept

    def _manifests(self) -> list:
        kept = self._kept_entries()
        manifests = []
        for data in (True, False):
            old = [e for e in kept if _is_data(e.data_file) == data]
            new = [f for f in self._added_data_files if _is_data(f) == data]
            if not old and not new:
                continue
            writer_class = ManifestWriterV2 if data else _DeleteManifestWriter
            spec = self._transaction.table_metadata.spec()
            schema = self._transaction.table_metadata.schema()
            writer = writer_class(spec, schema, self.new_manifest_output(), self._snapshot_id, self._compression)
            with writer:
                for entry in old:
                    writer.existing(entry)
                for data_file in new:
                    writer.add(
                        ManifestEntry.from_args(
                            status=ManifestEntryStatus.ADDED,
                            snapshot_id=self._snapshot_id,
                            sequence_number=None,
                            file_sequence_number=None,
                            data_file=data_file,
                        )
                    )
            manifests.append(writer.to_manifest_file())
        return manifests


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
MAX_RUN_S = 24 * 3600  # a run marker older than this belongs to a run that died; runs time out long before


def mark_running(results: Results, run_id: str) -> str:
    """Announce a run that writes files: while its marker lives, nothing it wrote counts as an orphan."""
    marker = storage.join(results.root, RUN_MARKERS, run_id)
    storage.write_bytes(marker, b"")
    return marker


def remove_orphans(results: Results, grace_s: float = 600.0) -> int:
    """Delete table files and run folders the published state no longer reaches (expired snapshots, runs
    that crashed or lost the swap). Files younger than grace_s, or than any run still marked running, are
    left: that run may still be writing them, and would publish them."""
    keep: set = set()
    for name in TABLE_NAMES:
        table = results.table(name)
        if table is not None:
            keep |= {storage.normalize(f) if not storage.is_s3(f) else f for f in referenced_files(table)}
    current_run = storage.join(results.root, "runs", results.report["run_id"]) if results.report else None
    now = time.time()
    cutoff = now - grace_s
    live_runs, dead_markers, earliest_live = set(), [], now
    for marker, modified in storage.list_prefix(storage.join(results.root, RUN_MARKERS)):
        if now - modified < MAX_RUN_S:
            live_runs.add(storage.basename(marker))
            earliest_live = min(earliest_live, modified)
        else:
            dead_markers.append(marker)
    doomed = []
    for folder in ("tables", "runs"):
        for uri, modified in storage.list_prefix(storage.join(results.root, folder)):
            if modified > cutoff or uri in keep or uri.endswith(".lock"):
                continue
            if current_run and uri.startswith(current_run + "/"):
                continue
            run_ids = set(RUN_ID.findall(uri))
            if run_ids & live_runs:
                continue  # a data file of a run still writing
            if not run_ids and live_runs and modified >= earliest_live - 2:
                continue  # metadata (named without a run id) written since a live run began (1 s resolution)
            doomed.append(uri)
    storage.delete_files(doomed + dead_markers)
    return len(doomed)
