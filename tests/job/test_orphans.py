"""Orphan removal never deletes what another run published or is still writing, whatever the interleaving."""

import multiprocessing
import os
import time
from pathlib import Path

import pyarrow as pa

from emr_job import storage
from emr_job.job import JobConfig, new_run_id
from emr_job.job import run as run_job
from emr_job.store import Results, RunCommit, TableChange, arrow_schema, mark_running, referenced_files, remove_orphans
from tests.job.images import encoded, make_tree, rgb, write
from tests.job.results import rows

DRIVER = {"driver_max_images": 256, "driver_max_rows": 20000, "keep_snapshots_hours": 0.0}  # no grace at all


def paused_run(src: str, out: str, paused, resume) -> None:
    """A run (in its own process) that stops between reading the published state and removing orphans."""
    from emr_job import job

    real = job.remove_orphans

    def wait_then_remove(*args, **kwargs):
        paused.set()
        assert resume.wait(120), "never resumed"
        return real(*args, **kwargs)

    job.remove_orphans = wait_then_remove
    job.run(JobConfig(input=src, output=out, k=2, **DRIVER), log=lambda _: None)


def backdate(root: Path, seconds: float) -> None:
    """Age every file: no protection by recency is left, only what remove_orphans must know."""
    then = time.time() - seconds
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (then, then))


def test_a_run_that_read_the_results_before_another_published_deletes_none_of_its_files(tmp_path):
    # Given published results, and a run with nothing to do, paused before its orphan removal
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("x",), per_label=3)
    run_job(JobConfig(input=str(src), output=str(out), k=2, **DRIVER), log=lambda _: None)
    spawn = multiprocessing.get_context("spawn")
    paused, resume = spawn.Event(), spawn.Event()
    stale = spawn.Process(target=paused_run, args=(str(src), str(out), paused, resume))
    stale.start()
    try:
        assert paused.wait(120), "the stale run never reached its orphan removal"

        # When another run publishes a change meanwhile, and everything is old by the time the first resumes
        write(f"{src}/x/new.jpg", encoded(rgb(40), "JPEG"))
        newer = run_job(JobConfig(input=str(src), output=str(out), k=2, **DRIVER), log=lambda _: None)
        backdate(out, 3600)
    finally:
        resume.set()
        stale.join(120)
    assert stale.exitcode == 0

    # Then every file the published report reaches is still there, and the next run completes on it
    results = Results(str(out))
    assert results.report["run_id"] == newer["run_id"]
    for name in ("features", "pca", "failures"):
        if results.table(name) is not None:
            assert [f for f in referenced_files(results.table(name)) if not os.path.exists(f)] == []
    assert len(rows(out, "features")) == 4
    write(f"{src}/x/later.jpg", encoded(rgb(41), "JPEG"))
    assert run_job(JobConfig(input=str(src), output=str(out), k=2, **DRIVER), log=lambda _: None)["images_ok"] == 5


def test_orphan_removal_spares_the_files_of_a_run_still_writing(tmp_path):
    # Given published results, a run started by hand an hour ago and still writing, and one that crashed
    out = str(tmp_path / "out")
    first = RunCommit(Results(out), new_run_id())
    first.apply("failures", TableChange())
    first.publish({"run_id": first.run_id})
    live, crashed = new_run_id(), new_run_id()
    marker = mark_running(Results(out), live)
    empty = pa.Table.from_pylist([], schema=arrow_schema("failures"))
    in_flight = RunCommit(Results(out), live).data_file_path("failures", "0")
    abandoned = RunCommit(Results(out), crashed).data_file_path("failures", "0")
    for path in (in_flight, abandoned):
        storage.write_parquet(path, empty)
    backdate(Path(out), 3600)
    os.utime(marker, (time.time() - 3610,) * 2)

    # When another run removes orphans with no grace period at all
    remove_orphans(out, grace_s=0)

    # Then the live run's file stays, the crashed run's goes
    assert os.path.exists(in_flight) and not os.path.exists(abandoned)


def test_a_launched_run_treats_the_markers_of_earlier_launches_as_dead_and_its_own_as_live(tmp_path):
    out = str(tmp_path / "out")
    first = RunCommit(Results(out), new_run_id())
    first.apply("failures", TableChange())
    first.publish({"run_id": first.run_id})
    earlier, mine, by_hand = new_run_id(), new_run_id(), new_run_id()
    files = {}
    for run_id, launch in ((earlier, "run-a"), (mine, "run-b"), (by_hand, None)):
        mark_running(Results(out), run_id, launch)
        files[run_id] = RunCommit(Results(out), run_id).data_file_path("failures", "0")
        storage.write_parquet(files[run_id], pa.Table.from_pylist([], schema=arrow_schema("failures")))
    backdate(Path(out), 3600)

    remove_orphans(out, grace_s=0, run_id=mine, launch_id="run-b")

    assert not os.path.exists(files[earlier]) and not os.path.exists(f"{out}/_running/{earlier}")
    assert os.path.exists(files[mine]) and os.path.exists(files[by_hand])  # by hand: it may still be running


def test_a_marker_s3_will_not_delete_never_fails_the_run_and_the_next_launched_run_clears_it(
    job, tmp_path, weights_file, monkeypatch
):
    # Given a tree, and a store that refuses to delete the run's marker (DeleteObjects' per-key error)
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("a", "b"), per_label=2)
    delete_files = storage.delete_files

    def refusing_markers(uris):
        if any("/_running/" in uri for uri in uris):
            raise storage.DeleteError("1 of 1 objects were not deleted (AccessDenied)")
        delete_files(uris)

    small = {"driver_max_images": 256, "driver_max_rows": 20000, "weights": weights_file, "k": 2}
    with monkeypatch.context() as faulty:
        faulty.setattr(storage, "delete_files", refusing_markers)
        # When a launched run publishes
        first = job(src, out, launch_id="run-20270101T000000Z-0000aaaa", **small)
    # Then its results are published all the same, its marker left behind
    assert first["published"] is True and first["images_ok"] == 4
    assert len(storage.list_prefix(storage.join(str(out), "_running"))) == 1

    # And the next launched run takes that marker for a dead run's and removes it
    write(f"{src}/a/new.png", encoded(rgb(7), "PNG"))
    second = job(src, out, launch_id="run-20270101T010000Z-0000bbbb", **small)
    assert second["published"] is True and storage.list_prefix(storage.join(str(out), "_running")) == []
