"""Every use of pyiceberg's private API, in one place. pyiceberg is pinned (emr_job/requirements.txt, 0.10.0 on
the EMR runtime's Python 3.9); tests/job/test_iceberg_api.py fails by name when an upgrade changes any of these.

Why private: pyiceberg's public writers append or overwrite whole Arrow tables it writes itself. This job writes
its own Parquet files on executors and commits them with one snapshot that adds some files and drops others
(copy-on-write of erased rows, compaction, replacement), so it needs the snapshot producer underneath."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional

import numpy as np
from pyiceberg.io.pyarrow import (
    _check_pyarrow_schema_compatible,
    _read_all_delete_files,
    compute_statistics_plan,
    data_file_statistics_from_parquet_metadata,
    parquet_path_to_id_mapping,
)
from pyiceberg.manifest import DataFile, DataFileContent, FileFormat, ManifestEntry, ManifestEntryStatus
from pyiceberg.table.snapshots import Operation
from pyiceberg.table.update.snapshot import ExpireSnapshots, _SnapshotProducer

# Column statistics (min/max) of these columns would copy the prefix of an image path into every manifest, where
# erasure does not reach it until the snapshot expires; with only counts, manifests hold no path at all.
NO_BOUNDS = {"write.metadata.metrics.column.path": "counts", "write.metadata.metrics.column.label": "counts"}


def data_file(io, metadata, path: str) -> DataFile:
    """A Parquet file this run wrote with the table's schema (field ids included) -> its Iceberg DataFile.
    pyiceberg's parquet_file_to_data_file, less its refusal of files that carry field ids (before 0.11 it only
    took foreign files for add_files)."""
    import pyarrow.parquet as pq

    source = io.new_input(path)
    with source.open() as stream:
        parquet = pq.read_metadata(stream)
    schema = metadata.schema()
    _check_pyarrow_schema_compatible(schema, parquet.schema.to_arrow_schema(), format_version=metadata.format_version)
    statistics = data_file_statistics_from_parquet_metadata(
        parquet_metadata=parquet,
        stats_columns=compute_statistics_plan(schema, {**metadata.properties, **NO_BOUNDS}),
        parquet_column_mapping=parquet_path_to_id_mapping(schema),
    )
    return DataFile.from_args(
        content=DataFileContent.DATA, file_path=path, file_format=FileFormat.PARQUET,
        partition=statistics.partition(metadata.spec(), schema), file_size_in_bytes=len(source), sort_order_id=None,
        spec_id=metadata.default_spec_id, equality_ids=None, key_metadata=None, **statistics.to_serialized_dict(),
    )  # fmt: skip


def deleted_positions(io, tasks: list) -> dict:
    """data file path -> sorted int64 positions its position delete files remove (stores written before
    erasure became copy-on-write still have some; the first run that writes rewrites them away)."""
    deletes = _read_all_delete_files(io, tasks)
    out = {}
    for path, arrays in deletes.items():
        chunks = [c.to_numpy() for arr in arrays for c in arr.chunks]
        if chunks:
            out[path] = np.unique(np.concatenate(chunks)).astype(np.int64)
    return out


def glue_table_input(name: str, location: str, metadata, current: Optional[dict], previous: Optional[str]) -> dict:
    """The Glue TableInput of an Iceberg table whose metadata is at `location`, as pyiceberg's Glue catalog
    writes it (Athena reads that layout): imported here only, since the Glue catalog pulls in boto3."""
    from pyiceberg.catalog.glue import _construct_table_input

    return _construct_table_input(name, location, {}, metadata, current, previous)


def expire_older_than(tx, cutoff_s: float) -> int:
    """Stage the expiry of the snapshots older than cutoff (never the current one) in a transaction; how many."""
    expire = ExpireSnapshots(tx)
    expire._snapshot_ids_to_expire = set()  # pyiceberg 0.10 shares one set between instances (class attribute)
    expire.older_than(datetime.fromtimestamp(cutoff_s, tz=timezone.utc))
    count = len(expire._snapshot_ids_to_expire)
    if count:
        expire.commit()
    return count


class ReplaceFiles(_SnapshotProducer):
    """A snapshot written as one complete data manifest: kept files as EXISTING entries, new ones as ADDED.

    pyiceberg's own producers cannot add and drop files in one snapshot this way. The manifest is rewritten
    whole each time: a few KB per hundred files, in exchange for no manifest merging logic."""

    def __init__(self, tx, io, added: list, removed: set, replace_all: bool, properties: dict):
        only_adds = not removed and not replace_all
        super().__init__(Operation.APPEND if only_adds else Operation.OVERWRITE, tx, io,
                         snapshot_properties=properties)  # fmt: skip
        self._added_data_files = list(added)
        self._removed, self._replace_all = removed, replace_all

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
                if self._replace_all or entry.data_file.file_path in self._removed:
                    self._deleted_data_files.add(entry.data_file)  # counted in the snapshot summary
                elif entry.data_file.content != DataFileContent.DATA:
                    raise ValueError(f"a delete file would survive this snapshot: {entry.data_file.file_path}")
                else:
                    kept.append(entry)
        return kept

    def _manifests(self) -> list:
        from pyiceberg.manifest import ManifestWriterV2

        kept = self._kept_entries()
        if not kept and not self._added_data_files:
            return []
        metadata = self._transaction.table_metadata
        writer = ManifestWriterV2(metadata.spec(), metadata.schema(), self.new_manifest_output(), self._snapshot_id,
                                  self._compression)  # fmt: skip
        with writer:
            for entry in kept:
                writer.existing(entry)
            for added in self._added_data_files:
                writer.add(
                    ManifestEntry.from_args(
                        status=ManifestEntryStatus.ADDED,
                        snapshot_id=self._snapshot_id,
                        sequence_number=None,
                        file_sequence_number=None,
                        data_file=added,
                    )
                )
        return [writer.to_manifest_file()]
