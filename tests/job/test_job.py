"""The job on a real local SparkSession: contract, model and PCA equivalence, incremental runs, commits under faults."""

import json
import os
import shutil
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emr_job import job as job_module
from emr_job import storage
from emr_job.pca import PcaError
from emr_job.store import CommitError
from tests.job.images import bomb_png, encoded, every_mode, exif_rotated_jpeg, make_tree, rgb, write
from tests.job.results import onnx_model, published, rows


def test_real_world_tree_is_fully_accounted_for(job, tmp_path, weights_file):
    # Given labels with spaces and accents, every mode and format, upper-case extensions and broken files
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("Apple Braeburn", "Pêche"), per_label=2)
    for mode, img in every_mode().items():
        fmt = {"CMYK": "JPEG", "I;16": "PNG"}.get(mode, "PNG")
        write(f"{src}/Modes/{mode.replace(';', '')}.{'jpg' if fmt == 'JPEG' else 'png'}", encoded(img, fmt))
    for ext, fmt in [("GIF", "GIF"), ("WebP", "WEBP"), ("BMP", "BMP"), ("TIFF", "TIFF"), ("Tif", "TIFF")]:
        write(f"{src}/Formats/x.{ext}", encoded(rgb(5), fmt))
    write(f"{src}/Formats/rotated.JPEG", exif_rotated_jpeg())
    broken = {
        f"{src}/Broken/empty.jpg": b"",
        f"{src}/Broken/truncated.jpg": encoded(rgb(6), "JPEG")[:300],
        f"{src}/Broken/notes.png": b"not an image at all",
        f"{src}/Broken/bomb.png": bomb_png(),
        f"{src}/orphan.jpg": encoded(rgb(7), "JPEG"),
    }
    for path, data in broken.items():
        write(path, data)
    write(f"{src}/Apple Braeburn/README.txt", b"ignored: not an image")

    # When the job runs
    rpt = job(src, out, weights=weights_file, k=3)

    # Then every image is in features or failures, with a reason for each failure
    features, failures, pca = rows(out, "features"), rows(out, "failures"), rows(out, "pca")
    expected_ok = 4 + 6 + 6
    assert (rpt["images_total"], rpt["images_ok"], rpt["images_failed"]) == (expected_ok + 5, expected_ok, 5)
    assert rpt["files_ignored"] == 1
    assert set(failures) == set(broken)
    reasons = {os.path.basename(p): r["reason"] for p, r in failures.items()}
    assert reasons["empty.jpg"].startswith("empty file")
    assert reasons["truncated.jpg"].startswith("undecodable")
    assert reasons["notes.png"] == "not a recognised image format"
    assert reasons["bomb.png"].startswith("decompression bomb")
    assert "label" in reasons["orphan.jpg"]
    assert {r["label"] for r in features.values()} == {"Apple Braeburn", "Pêche", "Modes", "Formats"}
    assert all(len(r["features"]) == 1280 for r in features.values())
    assert set(pca) == set(features) and all(len(r["pca"]) == 3 for r in pca.values())
    on_disk = json.loads(Path(out, "report.json").read_text())
    for key in ("images_total", "images_ok", "images_failed", "k", "explained_variance_ratio", "weights", "timings_s"):
        assert key in on_disk
    assert on_disk["k"] == 3 and "sha256" in on_disk["weights"]
    for plot in on_disk["plots"]:
        assert Image.open(out / plot).size[0] > 300
    assert published(out)["runs"] == {name: rpt["run_id"] for name in ("features", "pca", "failures", "model.onnx")}


@pytest.mark.parametrize("engine", ["onnx", "tensorflow"])
def test_features_equal_mobilenet_applied_directly(job, tmp_path, weights_file, engine):
    import tensorflow as tf

    from emr_job.model import build_network

    # Given a few images of different sizes
    src, out = tmp_path / "in", tmp_path / "out"
    paths = [write(f"{src}/a/{i}.png", encoded(rgb(i, size=(50 + 30 * i, 80)), "PNG")) for i in range(3)]

    # When the job featurizes them with either engine
    rpt = job(src, out, weights=weights_file, k=2, engine=engine)
    assert rpt["engine"].split()[0] == {"onnx": "onnxruntime", "tensorflow": "tensorflow"}[engine]

    # Then the features are MobileNetV2 with those weights on the resized, preprocessed image
    net = build_network()
    net.load_weights(weights_file)
    batch = np.stack([np.asarray(Image.open(p).convert("RGB").resize((224, 224), Image.BILINEAR)) for p in paths])
    expected = net.predict(tf.keras.applications.mobilenet_v2.preprocess_input(batch.astype("float32")), verbose=0)
    got = rows(out, "features")
    assert np.abs(expected).max() > 0.1  # a trained network's scale: the comparison below is not vacuous
    for path, want in zip(paths, expected):
        np.testing.assert_allclose(got[path]["features"], want, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_pca_matches_sklearn(job, tmp_path, weights_file):
    from sklearn.decomposition import PCA

    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("a", "b", "c", "d"), per_label=6)
    rpt = job(src, out, weights=weights_file, variance=0.9)

    features = rows(out, "features")
    paths = sorted(features)
    x = np.array([features[p]["features"] for p in paths], dtype=np.float64)
    ref = PCA(n_components=0.9, svd_solver="full").fit(x)
    assert rpt["k"] == ref.n_components_
    np.testing.assert_allclose(rpt["explained_variance_ratio"], ref.explained_variance_ratio_, rtol=1e-6)
    coords = rows(out, "pca")
    got = np.array([coords[p]["pca"] for p in paths])
    want = ref.transform(x)
    scale = np.abs(want).max()
    for j in range(ref.n_components_):  # axes are defined up to sign
        sign = np.sign(got[:, j] @ want[:, j])
        np.testing.assert_allclose(sign * got[:, j], want[:, j], atol=1e-4 * scale)


def test_small_work_runs_in_the_driver_with_the_results_spark_gives(job, tmp_path, weights_file):
    src, by_spark, by_driver = tmp_path / "in", tmp_path / "spark", tmp_path / "driver"

    def no_spark():
        raise AssertionError("small work started Spark")

    def both() -> tuple:
        cfg = job_module.JobConfig(input=str(src), output=str(by_driver), weights=weights_file, k=3)
        return job(src, by_spark, weights=weights_file, k=3), job_module.run(cfg, session=no_spark)

    def assert_same(spark_rpt, driver_rpt):
        for key in ("images_ok", "images_failed", "images_featurized", "images_removed", "k", "failures_by_reason"):
            assert spark_rpt[key] == driver_rpt[key], key
        np.testing.assert_allclose(driver_rpt["explained_variance_ratio"], spark_rpt["explained_variance_ratio"],
                                   rtol=1e-5)  # fmt: skip
        spark_f, driver_f = rows(by_spark, "features"), rows(by_driver, "features")
        assert sorted(spark_f) == sorted(driver_f)
        for path in spark_f:
            np.testing.assert_allclose(driver_f[path]["features"], spark_f[path]["features"], rtol=1e-4, atol=1e-5)
        paths = sorted(spark_f)
        got = np.array([rows(by_driver, "pca")[p]["pca"] for p in paths])
        want = np.array([rows(by_spark, "pca")[p]["pca"] for p in paths])
        np.testing.assert_allclose(got * np.sign((got * want).sum(axis=0)), want, atol=1e-4 * np.abs(want).max())
        assert set(rows(by_driver, "failures")) == set(rows(by_spark, "failures")) == {f"{src}/a/broken.jpg"}

    # Given a small tree with a broken file: once through Spark, once in the driver alone
    make_tree(str(src), labels=("a", "b"), per_label=4)
    write(f"{src}/a/broken.jpg", b"not an image")
    assert_same(*both())

    # Then an upload and an erasure, each path on its own store
    write(f"{src}/b/new.jpg", encoded(rgb(42), "JPEG"))
    os.remove(sorted(rows(by_spark, "features"))[0])
    spark_rpt, driver_rpt = both()
    assert (driver_rpt["images_featurized"], driver_rpt["images_removed"], driver_rpt["images_ok"]) == (1, 1, 8)
    assert_same(spark_rpt, driver_rpt)


def test_too_few_images_for_pca_is_a_clear_message(job, tmp_path, weights_file):
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("only",), per_label=1)
    rpt = job(src, out, weights=weights_file)
    assert rpt["images_ok"] == 1 and rpt["k"] is None
    assert rpt["pca_skipped"] == "PCA needs at least 2 images with features; there is 1"

    make_tree(str(src), labels=("only",), per_label=3)
    with pytest.raises(PcaError, match=r"--k 50 is out of range: 3 images with 1280 features allow 1..3"):
        job(src, out, weights=weights_file, k=50)


def test_incremental_rerun_and_erasure(job, tmp_path, weights_file):
    src, out = tmp_path / "in", tmp_path / "out"
    paths = make_tree(str(src), labels=("x", "y"), per_label=3)
    assert job(src, out, weights=weights_file, k=2)["images_featurized"] == 6

    # Nothing new: no model work, nothing published
    again = job(src, out, weights=weights_file, k=2)
    assert again["published"] is False and "featurize" not in again["timings_s"]

    # One new, one changed, one deleted (GDPR erasure)
    write(f"{src}/y/new.jpg", encoded(rgb(99), "JPEG"))
    write(paths[0], encoded(rgb(98), "JPEG"))
    os.utime(paths[0], ns=(1, 1))
    os.remove(paths[1])
    rpt = job(src, out, weights=weights_file, k=2)
    assert (rpt["images_featurized"], rpt["images_removed"], rpt["images_ok"]) == (2, 1, 6)
    for name in ("features", "pca"):
        assert paths[1] not in rows(out, name) and f"{src}/y/new.jpg" in rows(out, name)
    assert len(rows(out, "features")) == 6  # the changed image's old row is gone, not duplicated

    # Other weights: everything is recomputed rather than mixing two models' features
    other = job(src, out, weights="random", k=2)
    assert (other["images_featurized"], other["images_recomputed_for_new_weights"]) == (6, 6)
    assert {r["weights"] for r in rows(out, "features").values()} == {"random-seed0"}


def test_deleting_every_image_empties_features_and_pca(job, tmp_path):
    # Given published results
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("x",), per_label=3)
    write(f"{src}/x/broken.jpg", b"")
    job(src, out, k=2)

    # When every image is deleted
    shutil.rmtree(src / "x")
    rpt = job(src, out, k=2)

    # Then the run succeeds with empty tables and says why there is no PCA
    assert (rpt["images_total"], rpt["images_removed"]) == (0, 4)
    assert rows(out, "features") == rows(out, "pca") == rows(out, "failures") == {}
    assert rpt["pca_skipped"].startswith("PCA needs at least 2 images")


COMMIT_STEPS = ["start", "featurized", "features", "pca", "failures", "publish", "published"]


@pytest.mark.parametrize("where", ["spark", "driver"])
@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_a_crash_at_any_commit_step_leaves_one_runs_results_and_the_next_run_completes(job, tmp_path, step, where):
    if where == "driver":  # the small-work path: no Spark job in any run
        job = partial(job, driver_max_images=256, driver_max_rows=20000)
    # Given published results, then an image added, one changed and one deleted
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("x", "y"), per_label=3)
    first = job(src, out, k=2)
    before = rows(out, "features")
    write(f"{src}/y/new.jpg", encoded(rgb(77), "JPEG"))
    write(str(src / "x" / "0.jpg"), encoded(rgb(76), "JPEG"))
    os.utime(src / "x" / "0.jpg", ns=(5, 5))
    os.remove(src / "x" / "1.jpg")

    # When the run crashes at this step
    with pytest.raises(RuntimeError, match=f"injected failure at step '{step}'"):
        job(src, out, k=2, fail_at=step)

    # Then readers see the tables, model and report of exactly one run: the previous one, or (past the swap) the new
    state = published(out)
    assert set(state["runs"].values()) == {state["report"]["run_id"]} and "model.onnx" in state["runs"]
    assert {len(r["pca"]) for r in rows(out, "pca").values()} == {onnx_model(out)["graph_k"]}
    if step == "published":
        assert state["report"]["run_id"] != first["run_id"] and len(rows(out, "features")) == 6
    else:
        assert state["report"]["run_id"] == first["run_id"]
        assert rows(out, "features").keys() == before.keys()
        assert rows(out, "features")[f"{src}/x/0.jpg"]["version"] == before[f"{src}/x/0.jpg"]["version"]

    # And the next run completes the work
    rpt = job(src, out, k=2)
    features = rows(out, "features")
    assert set(features) == {str(p) for p in src.rglob("*.jpg")} == set(rows(out, "pca"))
    assert features[f"{src}/x/0.jpg"]["version"] == storage.local_version((src / "x" / "0.jpg").stat())
    assert len(features) == 6 and set(published(out)["runs"].values()) == {published(out)["report"]["run_id"]}
    assert rpt["images_ok"] == 6


def test_a_run_that_loses_the_swap_publishes_nothing(job, tmp_path, monkeypatch):
    # Given published results and a change, and a second run that publishes while the first is at its swap
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("x",), per_label=3)
    job(src, out, k=2)
    write(f"{src}/x/late.jpg", encoded(rgb(60), "JPEG"))
    real_step, winner = job_module.RunContext.step, {}

    def other_run_first(ctx, name):
        if name == "publish" and not winner:
            winner["report"] = None  # the other run must not recurse into this hook
            winner["report"] = job(src, out, k=2)
        real_step(ctx, name)

    monkeypatch.setattr(job_module.RunContext, "step", other_run_first)

    # When the first run tries to publish
    with pytest.raises(CommitError, match="another run published results meanwhile"):
        job(src, out, k=2)

    # Then the results are the other run's, whole
    state = published(out)
    assert state["report"]["run_id"] == winner["report"]["run_id"]
    assert set(state["runs"].values()) == {winner["report"]["run_id"]}
    assert len(rows(out, "features")) == 4


def test_a_failed_run_leaves_previous_results(job, tmp_path, weights_file):
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("x",), per_label=3)
    job(src, out, weights=weights_file, k=2)
    before = Path(out, "report.json").read_text()

    write(f"{src}/x/late.jpg", encoded(rgb(50), "JPEG"))
    with pytest.raises(PcaError):  # fails after featurizing and staging, before publishing
        job(src, out, weights=weights_file, k=40)

    assert Path(out, "report.json").read_text() == before
    assert len(rows(out, "features")) == 3 and len(rows(out, "pca")) == 3


def test_spark_tasks_get_even_round_robin_shares_and_every_row_once(spark):
    import pyarrow as pa
    from pyspark import TaskContext

    # Given 100 rows whose costly ones (large PNGs, say) all sort last, as one label folder does
    rows = [{"i": i, "png": i >= 70} for i in range(100)]

    def body(batches):
        for batch in batches:
            task = TaskContext.get().partitionId()
            yield pa.RecordBatch.from_pylist([{**row, "task": task} for row in batch.to_pylist()])

    # When they are mapped in 4 Spark tasks
    out = job_module._map(spark, rows, pa.schema([("i", pa.int64()), ("png", pa.bool_())]), body, slices=4)

    # Then every row is done once, each task has a quarter, and the costly rows are spread over all of them
    assert sorted(r["i"] for r in out) == list(range(100))
    assert sorted(Counter(r["task"] for r in out).values()) == [25, 25, 25, 25]
    assert sorted(Counter(r["task"] for r in out if r["png"]).values()) == [7, 7, 8, 8]
