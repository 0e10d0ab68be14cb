"""The Glue Data Catalog follows report.json: each run points the tables at what it published, a failed sync is
retried by the next run, and a late sync never moves a table back. Glue through moto."""

import boto3
import pytest
from moto import mock_aws

from emr_job import catalog
from emr_job.job import AfterSwapError
from emr_job.store import Results
from tests.job.images import make_tree

DB = "image_features_test"


@pytest.fixture
def glue():
    with mock_aws():
        yield boto3.client("glue", region_name="eu-west-3")


def glue_locations(glue) -> dict:
    tables = glue.get_tables(DatabaseName=DB)["TableList"]
    return {t["Name"]: t["Parameters"]["metadata_location"] for t in tables}


def test_each_run_points_glue_at_the_tables_it_published(job, glue, tmp_path, weights_file):
    glue.create_database(DatabaseInput={"Name": DB})
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("a", "b"), per_label=2)

    first = job(src, out, weights=weights_file, k=2, glue_database=DB)
    assert first["catalog"]["tables"] == {"features": "created", "pca": "created", "failures": "created"}
    assert glue_locations(glue) == first["commit"]["tables"]
    table = glue.get_table(DatabaseName=DB, Name="pca")["Table"]
    assert table["Parameters"]["table_type"] == "ICEBERG" and table["TableType"] == "EXTERNAL_TABLE"
    assert [(c["Name"], c["Type"]) for c in table["StorageDescriptor"]["Columns"]] == [
        ("path", "string"), ("label", "string"), ("pca", "array<float>")]  # fmt: skip

    make_tree(str(src), labels=("c",), per_label=2)
    second = job(src, out, weights=weights_file, k=2, glue_database=DB)
    assert second["catalog"]["tables"] == {"features": "updated", "pca": "updated", "failures": "updated"}
    assert glue_locations(glue) == second["commit"]["tables"]
    assert (
        glue.get_table(DatabaseName=DB, Name="pca")["Table"]["Parameters"]["previous_metadata_location"]
        == (first["commit"]["tables"]["pca"])
    )

    third = job(src, out, weights=weights_file, k=2, glue_database=DB)  # nothing changed
    assert third["published"] is False and set(third["catalog"]["tables"].values()) == {"current"}


def test_a_failed_sync_fails_the_run_with_results_published_and_the_next_run_syncs(job, glue, tmp_path, weights_file):
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("a", "b"), per_label=2)
    with pytest.raises(AfterSwapError, match=rf"results published \(run .*\), but the Glue tables of {DB} were not"):
        job(src, out, weights=weights_file, k=2, glue_database=DB)  # the database does not exist
    published = Results(str(out)).report
    assert published["images_ok"] == 4

    glue.create_database(DatabaseInput={"Name": DB})
    retry = job(src, out, weights=weights_file, k=2, glue_database=DB)
    assert retry["published"] is False  # no model work: the retry only syncs
    assert glue_locations(glue) == published["commit"]["tables"]


def test_orphans_that_cannot_be_deleted_fail_the_run_after_the_catalog_sync(job, glue, tmp_path, weights_file,
                                                                               monkeypatch):  # fmt: skip
    from emr_job import job as job_module
    from emr_job.storage import DeleteError

    # Given a store whose superseded files S3 refuses to delete (DeleteObjects answers per-key errors)
    glue.create_database(DatabaseInput={"Name": DB})
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("a", "b"), per_label=2)

    def refused(*args, **kwargs):
        raise DeleteError("3 of 3 objects were not deleted (AccessDenied)")

    monkeypatch.setattr(job_module, "remove_orphans", refused)

    # When a run publishes
    with pytest.raises(AfterSwapError, match="results published .* not all deleted: 3 of 3 .*; the next run does it"):
        job(src, out, weights=weights_file, k=2, glue_database=DB)

    # Then its results are published, and the Glue tables point at them all the same
    assert glue_locations(glue) == Results(str(out)).report["commit"]["tables"]


def test_a_late_sync_of_an_older_run_leaves_the_newer_tables(job, glue, tmp_path, weights_file):
    glue.create_database(DatabaseInput={"Name": DB})
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("a", "b"), per_label=2)
    job(src, out, weights=weights_file, k=2)
    older = Results(str(out))  # what a slow sync of this run read before the next run published
    make_tree(str(src), labels=("c",), per_label=2)
    newer = job(src, out, weights=weights_file, k=2, glue_database=DB)

    assert catalog._sync_table(glue, DB, "features", older) == "newer in Glue"
    assert glue_locations(glue)["features"] == newer["commit"]["tables"]["features"]


def test_the_database_name_is_checked_before_anything_runs():
    from emr_job.main import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--input", "i", "--output", "o", "--glue-database", "Image-Features"])
    assert parse_args(["--input", "i", "--output", "o", "--glue-database", DB]).glue_database == DB
