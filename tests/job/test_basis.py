"""A stable PCA basis (--refit auto): stored coordinates stay put under small change, and the basis is refit when
the data drifts, an image is erased or the weights change; the pca table is always in the one basis the run's
model describes, whatever crashes."""

import os
from functools import partial

import numpy as np
import pytest
from PIL import Image

from emr_job import basis, fitted
from emr_job.store import Results, live_files
from tests.job.images import encoded, make_tree, rgb, write
from tests.job.results import onnx_model, published, rows

COMMIT_STEPS = ["start", "featurized", "features", "pca", "failures", "publish", "published"]


def stripes(seed: int) -> Image.Image:
    """An image unlike make_tree's colour fields: hard stripes whose direction and colours vary."""
    rng = np.random.default_rng(seed)
    x = np.arange(96)[None, :] * rng.uniform(0.2, 1.5) + np.arange(96)[:, None] * rng.uniform(-1.5, 1.5)
    mask = (np.sin(x) > 0)[..., None]
    pixels = np.where(mask, rng.integers(0, 255, 3), rng.integers(0, 255, 3)).astype(np.uint8)
    return Image.fromarray(pixels)


def assert_one_basis(out) -> None:
    """Every published pca row is the projection of its features with the basis the run's model holds."""
    fit = fitted.load(Results(str(out)))
    features, pca = rows(out, "features"), rows(out, "pca")
    assert features.keys() == pca.keys()
    for path, row in features.items():
        expected = fit.project(np.array([row["features"]]))[0]
        np.testing.assert_allclose(pca[path]["pca"], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    assert onnx_model(out)["run_id"] == Results(str(out)).report["basis"]["run_id"] == fit.run_id


@pytest.fixture
def small(job, weights_file):
    """The job on the driver (no Spark job), with trained-like weights, k = 2: only the drift criterion applies."""
    return partial(job, weights=weights_file, k=2, driver_max_images=256, driver_max_rows=50000)


def test_a_small_change_keeps_the_basis_and_every_stored_coordinate(small, tmp_path):
    # Given published results of 3 labels
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("a", "b", "c"), per_label=8)
    first = small(src, out)
    before, pca_files = rows(out, "pca"), {f.path for f in live_files(Results(str(out)).table("pca"))}
    model_bytes = (out / first["model_onnx"]).read_bytes()

    # When one more image like them arrives
    write(f"{src}/b/new.jpg", encoded(rgb(500), "JPEG"))
    second = small(src, out)

    # Then the basis is kept: the report says so with both figures, every stored row is where it was, only the new
    # file was projected, and the run's folder holds the basis's model
    assert second["basis"]["refit"] is False and second["basis"]["run_id"] == first["run_id"]
    assert second["basis"]["captured"] >= (1 - basis.EPSILON) * second["basis"]["refit_would_capture"]
    assert second["k"] == first["k"] == 2
    after = rows(out, "pca")
    assert all(after[path]["pca"] == row["pca"] for path, row in before.items())
    now = {f.path for f in live_files(Results(str(out)).table("pca"))}
    assert pca_files < now and len(now - pca_files) == 1
    assert second["model_onnx"] == f"runs/{second['run_id']}/model.onnx"
    assert (out / second["model_onnx"]).read_bytes() == model_bytes
    assert_one_basis(out)
    assert second["quality"]["sample"] == 25 and second["labels"]["b"]["images"] == 9


def test_drift_erasure_and_new_weights_each_refit_the_basis(small, tmp_path, job):
    src, out = tmp_path / "in", tmp_path / "out"
    paths = make_tree(str(src), labels=("a", "b"), per_label=8)
    first = small(src, out)

    # A new label that carries real variance: drift
    for i in range(10):
        write(f"{src}/stripes/{i}.png", encoded(stripes(i), "PNG"))
    drifted = small(src, out)
    assert drifted["basis"]["refit"] is True and drifted["basis"]["run_id"] == drifted["run_id"] != first["run_id"]
    assert drifted["basis"]["why"].endswith(f"more than {basis.EPSILON:.0%} less")
    assert drifted["basis"]["captured"] < (1 - basis.EPSILON) * drifted["basis"]["refit_would_capture"]
    assert_one_basis(out)

    # An erased image: refit whatever the policy
    os.remove(paths[0])
    erased = small(src, out, refit="never")
    assert erased["basis"] == {**erased["basis"], "refit": True, "why": "images were erased or replaced"}
    assert_one_basis(out)

    # New weights: every row is recomputed and the basis refit
    renewed = job(src, out, weights="random", k=2, driver_max_images=256, driver_max_rows=50000)
    assert renewed["basis"]["refit"] is True and renewed["basis"]["why"] == "the weights changed"
    assert_one_basis(out)


def test_refit_always_refits_at_every_run_and_never_keeps_through_drift(small, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("a", "b"), per_label=6)
    small(src, out)
    write(f"{src}/a/new.jpg", encoded(rgb(501), "JPEG"))
    always = small(src, out, refit="always")
    assert always["basis"]["refit"] is True and always["basis"]["why"] == "--refit always"
    for i in range(10):
        write(f"{src}/stripes/{i}.png", encoded(stripes(i), "PNG"))
    never = small(src, out, refit="never")
    assert never["basis"]["refit"] is False and never["basis"]["run_id"] == always["run_id"]
    assert_one_basis(out)


@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_a_crash_in_a_run_that_keeps_the_basis_leaves_one_basis_and_the_next_run_completes(small, tmp_path, step):
    # Given published results, and a small change
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("a", "b"), per_label=8)
    first = small(src, out)
    write(f"{src}/a/new.jpg", encoded(rgb(502), "JPEG"))

    # When the run that would keep the basis crashes at this step
    with pytest.raises(RuntimeError, match=f"injected failure at step '{step}'"):
        small(src, out, fail_at=step)

    # Then the published rows are all in the published model's basis, and the next run completes
    assert_one_basis(out)
    state = published(out)
    assert state["runs"]["model.onnx"] == first["run_id"]
    done = small(src, out)
    assert done["images_ok"] == 17 and len(rows(out, "pca")) == 17
    assert_one_basis(out)


def test_with_a_variance_target_the_basis_is_refit_once_it_no_longer_reaches_it(small, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("a", "b"), per_label=6)
    first = small(src, out, k=None, variance=0.5)
    for i in range(10):  # a new kind of image: the kept axes hold less of the spread
        write(f"{src}/stripes/{i}.png", encoded(stripes(i), "PNG"))
    target = first["explained_variance_total"] - 1e-6  # what the basis reached: any loss takes it under
    rpt = small(src, out, k=None, variance=target)
    assert rpt["basis"]["captured"] < target and rpt["basis"]["refit"] is True
    assert rpt["basis"]["why"].endswith(f"under the target {target}")
    assert_one_basis(out)
