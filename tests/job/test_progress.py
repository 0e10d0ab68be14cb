"""A run's progress: the object `status` reads while a launched run lasts, the bar at a terminal, the plain lines."""

import json
import os
import pty
import subprocess
import sys
import threading
from functools import partial
from types import SimpleNamespace

import pytest

from emr_job import job as job_module
from emr_job import progress as progress_module
from emr_job import storage
from emr_job.progress import STAGES, Progress, progress_uri, spark_images
from tests.job.images import make_tree
from tests.job.results import holds
from tests.job.test_cli import ROOT, job_env

FIELDS = {"run_id", "job_run_id", "stage", "images_done", "images_total", "rate", "eta_s", "started_at", "updated_at"}
DRIVER = {"driver_max_images": 256, "driver_max_rows": 20000}
LAUNCH = "run-20260101T000000Z-0000abcd"


def in_progress_folder(path: str) -> bool:
    return path.rsplit("/", 2)[-2] == progress_module.FOLDER


@pytest.fixture
def writes(monkeypatch):
    """Every progress object written, in order: (uri, parsed body, raw body). Every change is written (no
    throttle): the sequence a run goes through is what these tests look at."""
    written, real = [], storage.write_bytes

    def spy(path, data, content_type="application/octet-stream"):
        if in_progress_folder(path):
            written.append((path, json.loads(data), data))
        return real(path, data, content_type)

    monkeypatch.setattr(storage, "write_bytes", spy)
    monkeypatch.setattr(progress_module, "PROGRESS_EVERY_S", 0.0)
    return written


def collapsed(items: list) -> list:
    return [x for i, x in enumerate(items) if i == 0 or items[i - 1] != x]


def test_a_launched_run_writes_its_stages_and_counts_and_never_a_key(job, tmp_path, writes, weights_file):
    # Given a tree of images, with labels S3 would form-encode
    src, out = tmp_path / "in", tmp_path / "out"
    paths = make_tree(str(src), labels=("Apple Braeburn", "Pêche"), per_label=6)

    # When a run the pipeline launched featurizes them
    rpt = job(src, out, k=2, launch_id=LAUNCH, weights=weights_file, **DRIVER)

    # Then its progress went to the object named by the launch id, through every stage in order
    assert {uri for uri, _, _ in writes} == {progress_uri(str(out), LAUNCH)}
    bodies = [body for _, body, _ in writes]
    assert all(set(body) == FIELDS for body in bodies)
    assert collapsed([b["stage"] for b in bodies]) == list(STAGES)
    assert {(b["run_id"], b["job_run_id"], b["started_at"]) for b in bodies} == {(LAUNCH, rpt["run_id"],
                                                                                  bodies[0]["started_at"])}  # fmt: skip
    # And images done never went back, and reached every image to featurize, with a rate and nothing left
    done = [b["images_done"] for b in bodies]
    assert done == sorted(done) and done[-1] == 12
    assert {b["images_total"] for b in bodies if b["stage"] != "plan"} == {12}
    assert bodies[-1]["rate"] > 0 and bodies[-1]["eta_s"] == 0
    # And no image's key or path is in any of them
    for _, _, raw in writes:
        for path in paths:
            assert not holds(raw, os.path.relpath(path, src)) and not holds(raw, path)


def test_progress_is_written_at_most_every_10_s_and_a_stage_change_comes_through_within_that(tmp_path, monkeypatch):
    # Given a run's progress on a fake clock, its writes recorded
    now, written, said = [0.0], [], []
    monkeypatch.setattr(storage, "write_bytes", lambda path, data, _: written.append((now[0], json.loads(data))))
    progress = Progress("20260101T000000Z-0000abcd", said.append, str(tmp_path), "run-1", clock=lambda: now[0],
                        wall=lambda: 1.8e9 + now[0])  # fmt: skip
    # When planning takes 10 s (the first write waits for a stage past it, or 10 s), then 900 images are featurized
    # over 90 s, reported in 900 steps, and then two stages follow at once
    for step in range(0, 101):
        now[0] = step * 0.1
        progress.tick()
    progress.stage("featurize", total=900)
    progress.count_from_now()
    for step in range(101, 1001):
        now[0] = step * 0.1
        progress.advance(1)
        if step == 1000:
            progress.stage("write")
            progress.stage("pca")
        progress.tick()
    for step in range(1, 201):
        now[0] = 100 + step * 0.1
        progress.tick()

    # Then no two writes are less than 10 s apart: at most 11 over the first 100 s
    times = [t for t, _ in written]
    assert all(b - a >= 10 for a, b in zip(times, times[1:]))
    assert len([t for t in times if t <= 100]) <= 11
    # And the stage that came within 10 s of a write was written once they had passed
    stages = [(t, body["stage"]) for t, body in written]
    assert collapsed([stage for _, stage in stages]) == ["plan", "featurize", "write", "pca"]
    assert [t for t, stage in stages if stage == "pca"] == [pytest.approx(110)]
    # And each write held the state at its time
    featurizing = [body for _, body in written if body["stage"] == "featurize"]
    assert [b["images_done"] for b in featurizing] == sorted(b["images_done"] for b in featurizing)
    assert featurizing[-1]["rate"] == pytest.approx(10.0) and featurizing[-1]["eta_s"] > 0
    assert written[-1][1]["updated_at"] == "2027-01-15T08:01:50+00:00"
    # And the plain lines (off a terminal) followed the same throttle, with the featurize stage's outcome once
    assert "featurize: 200 of 900 images (22%), 10.0 images/s, about 70 s left" in said
    assert said[-1] == "featurize: 900 of 900 images (100%), 10.0 images/s"
    assert len(said) <= 11


@pytest.mark.parametrize("how", ["published", "failed", "failed after the swap", "had nothing to do"])
def test_the_run_removes_its_progress_object_as_it_ends(job, tmp_path, writes, weights_file, how):
    # Given a tree, and for an idle run, its results already published
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("x",), per_label=3)
    job = partial(job, src, out, k=2, launch_id=LAUNCH, weights=weights_file, **DRIVER)
    if how == "had nothing to do":
        job()
        writes.clear()

    # When a launched run ends in that way
    if how.startswith("failed"):
        with pytest.raises(RuntimeError, match="injected failure"):
            job(fail_at="featurized" if how == "failed" else "published")
    else:
        job()

    # Then its progress was there while it ran, and is gone now
    assert writes and os.path.exists(out / "progress")
    assert os.listdir(out / "progress") == []


def test_the_next_launched_run_removes_the_progress_of_a_killed_one(job, tmp_path, writes, weights_file, monkeypatch):
    # Given a launched run killed mid-way: no cleanup ran, its progress object stays
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("x",), per_label=3)
    job = partial(job, src, out, k=2, weights=weights_file, **DRIVER)
    with monkeypatch.context() as killed:
        killed.setattr(storage, "delete_files", lambda uris: None)
        with pytest.raises(RuntimeError, match="injected failure"):
            job(launch_id="run-killed", fail_at="features")
    stale = out / "progress" / "run-killed.json"
    assert json.loads(stale.read_text())["run_id"] == "run-killed"

    # When a run started by hand runs: it cannot know whether a launched run is still active
    job()
    assert stale.exists()

    # Then the next launched run knows (at most one launched run is active): it goes, and so does the run's own
    job(launch_id="run-next")
    assert os.listdir(out / "progress") == []


def test_progress_that_cannot_be_written_or_removed_never_fails_the_run(
    job, tmp_path, weights_file, monkeypatch, capsys
):
    # Given S3 refusing every write and delete of the progress folder, and a stale object there
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("x",), per_label=3)
    storage.write_bytes(str(out / "progress" / "run-killed.json"), b"{}")
    real_write, real_delete = storage.write_bytes, storage.delete_files

    def write(path, *args):
        if in_progress_folder(path):
            raise PermissionError("AccessDenied")
        real_write(path, *args)

    def delete(uris):
        if any(in_progress_folder(uri) for uri in uris):
            raise storage.DeleteError(f"{len(uris)} of {len(uris)} objects were not deleted (AccessDenied)")
        real_delete(uris)

    monkeypatch.setattr(storage, "write_bytes", write)
    monkeypatch.setattr(storage, "delete_files", delete)
    monkeypatch.setattr(progress_module, "PROGRESS_EVERY_S", 0.0)

    # When a launched run runs
    rpt = job(src, out, k=2, launch_id=LAUNCH, weights=weights_file, **DRIVER)

    # Then it publishes, and says once that its progress was not written, and that the objects stay
    assert rpt["published"] and rpt["images_ok"] == 3
    said = capsys.readouterr().out
    assert said.count("the run's progress was not written") == 1
    assert "progress objects of earlier runs were not all removed" in said
    assert "the run's progress object was not deleted" in said


def test_a_spark_run_reports_a_step_per_task(job, tmp_path, writes, weights_file, monkeypatch):
    # Given 48 images featurized in Spark, one per task, their progress read every 5 ms: tasks on two cores
    # often end together, so a poll sees some of them end at once (about 30 steps here)
    monkeypatch.setattr(job_module, "IMAGES_PER_TASK", 1)
    monkeypatch.setattr(progress_module, "POLL_S", 0.005)
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("a", "b", "c"), per_label=16)

    # When a launched run featurizes them (the PCA passes in the driver: they are not the point here)
    rpt = job(src, out, k=2, batch_size=1, launch_id=LAUNCH, weights=weights_file, driver_max_rows=20000)

    # Then its progress moved in at least 20 steps while featurizing, and ended with every image
    assert rpt["images_featurized"] == 48
    featurizing = [body["images_done"] for _, body, _ in writes if body["stage"] == "featurize"]
    assert featurizing == sorted(featurizing) and featurizing[-1] == 48
    assert len(set(featurizing) - {0}) >= 20, featurizing
    assert os.listdir(out / "progress") == []


def test_spark_task_counts_become_images_done_a_step_per_task():
    # Given Spark's status tracker, as it reports a job group's 24 tasks over 100 images, and another group's job
    stage = SimpleNamespace(numCompletedTasks=0, numTasks=24)
    other = SimpleNamespace(numCompletedTasks=5, numTasks=5)
    tracker = SimpleNamespace(
        getJobIdsForGroup=lambda group: {"featurize": [1], "other": [2]}.get(group, []),
        getJobInfo=lambda job_id: SimpleNamespace(stageIds=[job_id]),
        getStageInfo=lambda stage_id: {1: stage, 2: other}[stage_id],
    )
    done = spark_images(SimpleNamespace(statusTracker=lambda: tracker), "featurize", 100)

    # When its tasks complete one by one
    seen = []
    for completed in range(25):
        stage.numCompletedTasks = completed
        seen.append(done())

    # Then images done moves a step per task, from none to all, counting only the group's own tasks
    assert seen == sorted(seen) and (seen[0], seen[-1]) == (0, 100) and len(set(seen)) == 25


def test_a_launch_id_that_is_no_single_name_is_refused(capsys):
    from emr_job.main import parse_args

    # A launch id names the progress object: one name, never a path
    for bad in ("../report", "run/1", ""):
        with pytest.raises(SystemExit) as exit_:
            parse_args(["--input", "in", "--output", "out", "--launch-id", bad])
        assert exit_.value.code == 2 and "--launch-id" in capsys.readouterr().err
    assert parse_args(["--input", "in", "--output", "out", "--launch-id", LAUNCH]).launch_id == LAUNCH


def run_cli(args: list, tty: bool) -> tuple:
    """`python -m emr_job` with its stderr on a pipe, or on a terminal (a pseudo-terminal): (exit code, stderr)."""
    cmd = [sys.executable, "-m", "emr_job", *args]
    if not tty:
        proc = subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True)
        return proc.returncode, proc.stderr
    master, follower = pty.openpty()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=job_env(TERM="xterm-256color", COLUMNS="120"),
                            stdout=subprocess.DEVNULL, stderr=follower)  # fmt: skip
    os.close(follower)
    chunks = []

    def drain():  # a terminal's buffer is small: read while it runs
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the other end closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    code = proc.wait()
    reader.join(timeout=10)
    os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("tty", [False, True], ids=["piped", "terminal"])
def test_the_command_shows_progress_as_plain_lines_or_as_a_bar_at_a_terminal(tmp_path, weights_file, tty):
    # Given a tree of images
    src, out = str(tmp_path / "in"), str(tmp_path / "out")
    make_tree(src, labels=("a", "b"), per_label=6)

    # When `python -m emr_job` runs, its output piped, or at a terminal
    code, err = run_cli(["--input", src, "--output", out, "--k", "2", "--weights", weights_file], tty)

    # Then the plain lines say how featurizing went; at a terminal, a bar per stage does, with the log above it
    assert code == 0, err[-2000:]
    if not tty:
        assert "INFO emr_job: featurize: 12 of 12 images (100%), " in err and " images/s\n" in err
        assert "━" not in err
    else:
        assert "featurize: 12 of 12" not in err
        assert "12 of 12 images (100%)" in err and "━" in err
        assert all(f"{stage:<9} " in err for stage in STAGES)
        assert "INFO emr_job: 12 images to featurize" in err
