"""Erasure is physical: an image deleted from the input leaves every current file of the results in the run that
sees the deletion, and the files of older snapshots (kept for readers in mid-query) go within the hour."""

import json
import os
import subprocess
import sys
from datetime import datetime
from functools import partial
from pathlib import Path

import pytest

from emr_job import job as job_module
from emr_job import moments, storage
from emr_job.store import Results, referenced_files
from tests.job.images import encoded, make_tree, rgb, write
from tests.job.results import files_holding, rows

ROOT = Path(__file__).resolve().parents[2]
HOUR = 3600.0


@pytest.fixture
def clock(monkeypatch):
    """The job's clock, to be moved forward: now[0] is what the job reads as the time."""
    import time

    now = [time.time()]
    monkeypatch.setattr(job_module, "CLOCK", lambda: now[0])
    return now


def current_files(out) -> set:
    """Every file the current snapshots reach (data files, manifests, metadata), plus the published run's folder."""
    results = Results(str(out))
    found = set()
    for name in ("features", "pca", "failures"):
        table = results.table(name)
        if table is None or table.current_snapshot() is None:
            continue
        found |= {table.metadata_location, table.current_snapshot().manifest_list}
        for manifest in table.current_snapshot().manifests(table.io):
            found.add(manifest.manifest_path)
            found |= {e.data_file.file_path for e in manifest.fetch_manifest_entry(table.io, discard_deleted=True)}
    found |= {str(p) for p in Path(out, "runs", results.report["run_id"]).rglob("*")}
    return {storage.normalize(f) for f in found} | {str(Path(out, "report.json"))}


def older_snapshot_files(out) -> set:
    results = Results(str(out))
    reached = set()
    for name in ("features", "pca", "failures"):
        if results.table(name) is not None:
            reached |= {storage.normalize(f) for f in referenced_files(results.table(name))}
    return reached - current_files(out)


def test_an_erased_image_leaves_every_current_file_in_the_run_that_sees_it_and_the_rest_within_the_hour(
    job, tmp_path, clock
):
    # Given published results of a tree with a broken file (it names its path in the failures and the html report)
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("x", "y"), per_label=3)
    victim, broken = str(src / "y" / "2.jpg"), write(str(src / "y" / "Zoë broken.jpg"), b"not a jpeg")
    job(src, out, k=2)
    write(f"{src}/x/late.jpg", encoded(rgb(61), "JPEG"))
    job(src, out, k=2)  # a second run: its report.html names the broken file too
    assert files_holding(out, victim) and files_holding(out, broken)

    # When both are erased and the next run processes it
    os.remove(victim)
    os.remove(broken)
    erasing = job(src, out, k=2)

    # Then no file of the current snapshots and no run folder holds either key: only files of older snapshots do
    for key in (victim, broken):
        holding = {str(p) for p in files_holding(out, key)}
        assert holding, "the older snapshot's files still hold it (a reader in mid-query may need them)"
        assert holding <= older_snapshot_files(out), holding - older_snapshot_files(out)
        assert not [p for p in holding if "/runs/" in p]
    assert (erasing["files_rewritten"], erasing["images_removed"]) == (1, 2)
    assert len(rows(out, "features")) == 6 and rows(out, "failures") == {}

    # And the report says when they go: within the hour, with room for the pipeline to start the cleanup run
    due = datetime.fromisoformat(erasing["maintenance"]["cleanup_due_at"]).timestamp()
    assert 0 < due - clock[0] <= 0.5 * HOUR + 120

    # When that run comes at the time due, with nothing else changed
    clock[0] = due
    cleanup = job(src, out, k=2)

    # Then it publishes no new results, but nothing holds either key any more, and no further cleanup is due
    assert cleanup["published"] is False and cleanup["maintenance"]["snapshots_expired"] >= 2
    assert files_holding(out, victim) == files_holding(out, broken) == []
    assert cleanup["maintenance"]["cleanup_due_at"] is None
    assert json.loads(Path(out, "report.json").read_text())["maintenance"]["cleanup_due_at"] is None
    assert len(rows(out, "features")) == 6 and len(rows(out, "pca")) == 6
    # and the cached moments of the rewritten file went with it: what is left is the current files' own
    current = {f for f in current_files(out) if "/features/data/" in f}
    assert {str(p) for p in Path(out, "tables", "features", "moments").iterdir()} == {
        moments.cache_path(f) for f in current
    }


def test_a_cleanup_run_that_comes_early_keeps_the_snapshots_readers_may_use_and_says_when_to_come_back(
    job, tmp_path, clock
):
    # Given an erasing run
    src, out = tmp_path / "in", tmp_path / "out"
    paths = make_tree(str(src), labels=("x",), per_label=3)
    job = partial(job, driver_max_images=256, driver_max_rows=20000)
    job(src, out, k=2)
    os.remove(paths[0])
    due = job(src, out, k=2)["maintenance"]["cleanup_due_at"]

    # When a run comes ten minutes later (the daily pass, say)
    clock[0] += 600
    early = job(src, out, k=2)

    # Then the older snapshot stays for its readers, and the cleanup is still due at the same time
    assert early["maintenance"]["snapshots_expired"] == 0 and files_holding(out, paths[0])
    assert early["maintenance"]["cleanup_due_at"] == due


def test_a_run_that_adds_only_schedules_no_cleanup_and_one_that_replaces_an_image_does(job, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    paths = make_tree(str(src), labels=("x",), per_label=3)
    job = partial(job, driver_max_images=256, driver_max_rows=20000)
    job(src, out, k=2)
    write(f"{src}/x/new.jpg", encoded(rgb(5), "JPEG"))
    assert job(src, out, k=2)["maintenance"]["cleanup_due_at"] is None

    # The replaced image's old features stay in the superseded snapshot: they must go as an erased row's do
    write(paths[0], encoded(rgb(6), "JPEG"))
    assert job(src, out, k=2)["maintenance"]["cleanup_due_at"] is not None


def test_copy_on_write_rewrites_only_the_files_holding_rows_that_go(job, tmp_path):
    # Given three data files (one per run)
    src, out = tmp_path / "in", tmp_path / "out"
    for i, label in enumerate(("a", "b", "c")):
        make_tree(str(src), labels=(label,), per_label=3, seed=i)
        job(src, out, k=2)
    before = {f for f in os.listdir(out / "tables" / "features" / "data")}

    # When one image of the second file is deleted
    os.remove(src / "b" / "1.jpg")
    rpt = job(src, out, k=2)

    # Then that file alone is rewritten (its two other rows), and the others are kept as they are
    assert (rpt["files_rewritten"], rpt["rows_rewritten"]) == (1, 2)
    table = Results(str(out)).table("features")
    current = {os.path.basename(e.data_file.file_path) for m in table.current_snapshot().manifests(table.io)
               for e in m.fetch_manifest_entry(table.io, discard_deleted=True)}  # fmt: skip
    assert len(current & before) == 2 and len(current - before) == 1
    assert len(rows(out, "features")) == 8


def test_a_killed_launched_run_stops_protecting_its_files_once_the_next_launched_run_starts(job, tmp_path, monkeypatch):
    # Given published results, then an image uploaded, and a run launched by the pipeline that is killed after
    # writing its features (a SIGKILL runs no cleanup: its marker stays)
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("x",), per_label=3)
    job = partial(job, driver_max_images=256, driver_max_rows=20000)
    job(src, out, k=2)
    victim = write(f"{src}/x/Zoë.jpg", encoded(rgb(70), "JPEG"))
    with monkeypatch.context() as m:
        m.setattr(job_module.storage, "delete_files", lambda uris: None)  # as if killed: the marker is not removed
        with pytest.raises(RuntimeError, match="injected failure"):
            job(src, out, k=2, fail_at="features", launch_id="run-1")
    assert files_holding(out, victim) and os.listdir(out / "_running")

    # When the image is erased and a run started by hand processes it: it cannot know the killed run is dead
    os.remove(victim)
    job(src, out, k=2)
    assert files_holding(out, victim)

    # Then the next launched run knows (at most one launched run is active): the killed run's files go now
    job(src, out, k=2, launch_id="run-2")
    assert files_holding(out, victim) == [] and os.listdir(out / "_running") == []


def test_a_store_written_with_position_deletes_is_rewritten_by_the_next_run(tmp_path, weights_file):
    """Stores written before erasure became copy-on-write mask erased rows with position delete files."""
    old = "3e17a46"  # the last commit whose job wrote position deletes
    if subprocess.run(["git", "cat-file", "-e", old], cwd=ROOT, capture_output=True).returncode:
        pytest.skip(f"this clone lacks commit {old} (shallow)")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    archive = subprocess.run(["git", "archive", old, "emr_job"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(legacy)], input=archive, check=True)
    src, out = tmp_path / "in", tmp_path / "out"
    paths = make_tree(str(src), labels=("x", "y"), per_label=3)

    def run(code: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(code)}
        proc = subprocess.run([sys.executable, "-m", "emr_job", "--input", str(src), "--output", str(out),
                               "--weights", weights_file, "--k", "2"], env=env, cwd=code,
                              capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]

    # Given a store the older job wrote, with an erased image masked by a position delete
    run(legacy)
    os.remove(paths[1])
    run(legacy)
    assert paths[1] not in rows(out, "features") and files_holding(out, paths[1])
    assert Results(str(out)).table("features").current_snapshot().summary["total-position-deletes"] == "1"

    # When this job runs on it with nothing changed
    run(ROOT)

    # Then the masked row is rewritten out of the current files, and no delete file is left
    assert {str(p) for p in files_holding(out, paths[1])} <= older_snapshot_files(out)
    table = Results(str(out)).table("features")
    summary = table.current_snapshot().summary
    assert summary["total-position-deletes"] == "0" and summary["total-delete-files"] == "0"
    # ... and the table tells other writers (Athena, Spark) to delete by copy-on-write too
    assert table.metadata.properties["write.delete.mode"] == "copy-on-write"
    assert len(rows(out, "features")) == 5
