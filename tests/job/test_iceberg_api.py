"""pyiceberg's private API that emr_job/iceberg.py uses, checked by name: an upgrade that moves or changes any of
it fails here, with the name, rather than as a corrupt commit somewhere in a run."""

import inspect
import re
from pathlib import Path

import pyiceberg
import pytest

ROOT = Path(__file__).resolve().parents[2]


def pinned(requirements: str) -> str:
    return re.search(r"^pyiceberg(?:\[[^]]*\])?==([\w.]+)", (ROOT / requirements).read_text(), re.M).group(1)


def test_the_dev_venv_runs_the_pyiceberg_the_emr_runtime_ships():
    assert pyiceberg.__version__ == pinned("emr_job/requirements.txt") == pinned("requirements-dev.txt")


@pytest.mark.parametrize(
    "module, name, parameters",
    [
        ("pyiceberg.io.pyarrow", "_read_all_delete_files", ["io", "tasks"]),
        ("pyiceberg.io.pyarrow", "_check_pyarrow_schema_compatible", ["requested_schema", "provided_schema",
                                                                       "format_version"]),
        ("pyiceberg.io.pyarrow", "compute_statistics_plan", ["schema", "table_properties"]),
        ("pyiceberg.io.pyarrow", "data_file_statistics_from_parquet_metadata",
         ["parquet_metadata", "stats_columns", "parquet_column_mapping"]),
        ("pyiceberg.io.pyarrow", "parquet_path_to_id_mapping", ["schema"]),
        ("pyiceberg.table.update.snapshot", "_SnapshotProducer", ["operation", "transaction", "io",
                                                                  "snapshot_properties"]),
        ("pyiceberg.table.update.snapshot", "ExpireSnapshots", ["transaction"]),
        ("pyiceberg.manifest", "ManifestWriterV2", ["spec", "schema", "output_file", "snapshot_id"]),
        ("pyiceberg.catalog.glue", "_construct_table_input", ["table_name", "metadata_location", "properties",
                                                               "metadata", "glue_table", "prev_metadata_location"]),
    ],
)  # fmt: skip
def test_the_private_functions_and_classes_take_what_the_job_passes(module, name, parameters):
    import importlib

    target = getattr(importlib.import_module(module), name, None)
    assert target is not None, f"{module}.{name} is gone"
    signature = inspect.signature(target.__init__ if inspect.isclass(target) else target)
    missing = [p for p in parameters if p not in signature.parameters]
    assert not missing, f"{module}.{name}{signature} lacks {missing}"


def test_the_snapshot_producer_hooks_and_state_the_job_overrides_are_there(tmp_path):
    from pyiceberg.catalog.memory import InMemoryCatalog
    from pyiceberg.table.update.snapshot import ExpireSnapshots, _SnapshotProducer

    from emr_job import iceberg
    from emr_job.store import schemas

    for hook in ("_existing_manifests", "_deleted_entries", "_manifests", "new_manifest_output", "_commit"):
        assert hasattr(_SnapshotProducer, hook), f"_SnapshotProducer.{hook} is gone"
    catalog = InMemoryCatalog("t", warehouse=str(tmp_path))
    catalog.create_namespace("n")
    table = catalog.create_table(("n", "t"), schemas()["failures"], location=str(tmp_path / "t"))
    with table.transaction() as tx:
        producer = iceberg.ReplaceFiles(tx, table.io, [], set(), False, {})
        for state in ("_added_data_files", "_deleted_data_files", "_parent_snapshot_id", "_snapshot_id",
                      "_compression", "_transaction", "_io"):  # fmt: skip
            assert hasattr(producer, state), f"_SnapshotProducer instances have no {state}"
        expire = ExpireSnapshots(tx)
        assert isinstance(expire._snapshot_ids_to_expire, set), "ExpireSnapshots._snapshot_ids_to_expire is gone"
        assert callable(expire.older_than)
