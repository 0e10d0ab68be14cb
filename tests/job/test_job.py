"""The job on a real local SparkSession: contract, model and PCA equivalence, incremental runs, atomicity."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emr_job.job import JobConfig, run
from emr_job.pca import PcaError
from tests.job.images import bomb_png, encoded, every_mode, exif_rotated_jpeg, make_tree, rgb, write


def read(spark, out, name):
    return {r.path: r for r in spark.read.parquet(os.path.join(out, name)).collect()}


def test_real_world_tree_is_fully_accounted_for(spark, tmp_path, weights_file):
    # Given labels with spaces and accents, every mode and format, upper-case extensions and broken files
    src, out = str(tmp_path / "in"), str(tmp_path / "out")
    make_tree(src, labels=("Apple Braeburn", "Pêche"), per_label=2)
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
    rpt = run(spark, JobConfig(input=src, output=out, weights=weights_file, k=3))

    # Then every image is in features or failures, with a reason for each failure
    features, failures, pca = read(spark, out, "features"), read(spark, out, "failures"), read(spark, out, "pca")
    expected_ok = 4 + 6 + 6
    assert (rpt["images_total"], rpt["images_ok"], rpt["images_failed"]) == (expected_ok + 5, expected_ok, 5)
    assert rpt["files_ignored"] == 1
    assert set(failures) == {os.path.abspath(p) for p in broken}
    reasons = {os.path.basename(p): r.reason for p, r in failures.items()}
    assert reasons["empty.jpg"].startswith("empty file")
    assert reasons["truncated.jpg"].startswith("undecodable")
    assert reasons["notes.png"] == "not a recognised image format"
    assert reasons["bomb.png"].startswith("decompression bomb")
    assert "label" in reasons["orphan.jpg"]
    assert {r.label for r in features.values()} == {"Apple Braeburn", "Pêche", "Modes", "Formats"}
    assert all(len(r.features) == 1280 for r in features.values())
    assert set(pca) == set(features) and all(len(r.pca) == 3 for r in pca.values())
    on_disk = json.loads(Path(out, "report.json").read_text())
    for key in ("images_total", "images_ok", "images_failed", "k", "explained_variance_ratio", "weights", "timings_s"):
        assert key in on_disk
    assert on_disk["k"] == 3 and "sha256" in on_disk["weights"]
    for plot in ("explained_variance.png", "pca_scatter.png"):
        assert Image.open(f"{out}/{plot}").size[0] > 300
    assert not os.path.exists(f"{out}/_staging")


def test_features_equal_mobilenet_applied_directly(spark, tmp_path, weights_file):
    import tensorflow as tf

    from emr_job.model import build_network

    # Given a few JPEGs of different sizes
    src, out = str(tmp_path / "in"), str(tmp_path / "out")
    paths = [write(f"{src}/a/{i}.png", encoded(rgb(i, size=(50 + 30 * i, 80)), "PNG")) for i in range(3)]

    # When the job featurizes them
    run(spark, JobConfig(input=src, output=out, weights=weights_file, k=2))

    # Then the features are MobileNetV2 with those weights on the resized, preprocessed image
    net = build_network()
    net.load_weights(weights_file)
    batch = np.stack([np.asarray(Image.open(p).convert("RGB").resize((224, 224), Image.BILINEAR)) for p in paths])
    expected = net.predict(tf.keras.applications.mobilenet_v2.preprocess_input(batch.astype("float32")), verbose=0)
    got = read(spark, out, "features")
    for path, want in zip(paths, expected):
        np.testing.assert_allclose(got[os.path.abspath(path)].features, want, rtol=1e-4, atol=1e-5)


def test_pca_matches_sklearn(spark, tmp_path, weights_file):
    from sklearn.decomposition import PCA

    src, out = str(tmp_path / "in"), str(tmp_path / "out")
    make_tree(src, labels=("a", "b", "c", "d"), per_label=6)
    rpt = run(spark, JobConfig(input=src, output=out, weights=weights_file, variance=0.9))

    features = read(spark, out, "features")
    paths = sorted(features)
    x = np.array([features[p].features for p in paths], dtype=np.float64)
    ref = PCA(n_components=0.9, svd_solver="full").fit(x)
    assert rpt["k"] == ref.n_components_
    np.testing.assert_allclose(rpt["explained_variance_ratio"], ref.explained_variance_ratio_, rtol=1e-6)
    coords = read(spark, out, "pca")
    got = np.array([coords[p].pca for p in paths])
    want = ref.transform(x)
    scale = np.abs(want).max()
    for j in range(ref.n_components_):  # axes are defined up to sign
        sign = np.sign(got[:, j] @ want[:, j])
        np.testing.assert_allclose(sign * got[:, j], want[:, j], atol=1e-4 * scale)


def test_too_few_images_for_pca_is_a_clear_message(spark, tmp_path, weights_file):
    src, out = str(tmp_path / "in"), str(tmp_path / "out")
    make_tree(src, labels=("only",), per_label=1)
    rpt = run(spark, JobConfig(input=src, output=out, weights=weights_file))
    assert rpt["images_ok"] == 1 and rpt["k"] is None
    assert rpt["pca_skipped"] == "PCA needs at least 2 images with features; there is 1"

    make_tree(src, labels=("only",), per_label=3)
    with pytest.raises(PcaError, match=r"--k 50 is out of range: 3 images with 1280 features allow 1..3"):
        run(spark, JobConfig(input=src, output=out, weights=weights_file, k=50))


def test_incremental_rerun_and_erasure(spark, tmp_path, weights_file):
    src, out = str(tmp_path / "in"), str(tmp_path / "out")
    paths = make_tree(src, labels=("x", "y"), per_label=3)
    cfg = JobConfig(input=src, output=out, weights=weights_file, k=2)
    assert run(spark, cfg)["images_featurized"] == 6

    # Nothing new: no model work at all
    again = run(spark, cfg)
    assert (again["images_featurized"], again["images_reused"], again["images_ok"]) == (0, 6, 6)
    assert "load_weights" not in again["timings_s"]

    # One new, one changed, one deleted (GDPR erasure)
    write(f"{src}/y/new.jpg", encoded(rgb(99), "JPEG"))
    write(paths[0], encoded(rgb(98), "JPEG"))
    os.utime(paths[0], ns=(1, 1))
    os.remove(paths[1])
    rpt = run(spark, cfg)
    assert (rpt["images_featurized"], rpt["images_removed"], rpt["images_ok"]) == (2, 1, 6)
    for name in ("features", "pca"):
        assert os.path.abspath(paths[1]) not in read(spark, out, name)
        assert os.path.abspath(f"{src}/y/new.jpg") in read(spark, out, name)

    # Other weights: everything is recomputed rather than mixing two models' features
    assert run(spark, JobConfig(input=src, output=out, weights="random", k=2))["images_featurized"] == 6


def test_failed_run_leaves_previous_results(spark, tmp_path, weights_file):
    src, out = str(tmp_path / "in"), str(tmp_path / "out")
    make_tree(src, labels=("x",), per_label=3)
    run(spark, JobConfig(input=src, output=out, weights=weights_file, k=2))
    before = Path(out, "report.json").read_text()

    write(f"{src}/x/late.jpg", encoded(rgb(50), "JPEG"))
    with pytest.raises(PcaError):  # fails after featurizing and staging, before publishing
        run(spark, JobConfig(input=src, output=out, weights=weights_file, k=40))

    assert Path(out, "report.json").read_text() == before
    assert len(read(spark, out, "features")) == 3 and len(read(spark, out, "pca")) == 3
    shutil.rmtree(f"{src}/x")
