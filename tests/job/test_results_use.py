"""What users do with published results: project a new photo with the saved model and find its nearest stored
images, run the README's SQL, open report.html, read label separability."""

import base64
import io
import json
import re
import shutil
from functools import partial
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emr_job import fitted, quality
from emr_job import query as query_cli
from emr_job import sql as sql_cli
from emr_job.store import Results
from tests.job.images import encoded, make_tree, rgb, write
from tests.job.results import onnx_model, published, rows

ROOT = Path(__file__).resolve().parents[2]
LABELS = ("Apple Braeburn", "Kiwi", "Pêche")


@pytest.fixture(scope="module")
def store(spark, tmp_path_factory, weights_file):
    """One run over three labels and two broken files: (input folder, output folder, report)."""
    from emr_job.job import JobConfig, run

    root = tmp_path_factory.mktemp("results-use")
    src, out = root / "in", root / "out"
    make_tree(str(src), labels=LABELS, per_label=6)
    write(f"{src}/Kiwi/broken.jpg", encoded(rgb(9), "JPEG")[:150])
    write(f"{src}/Kiwi/empty.png", b"")
    rpt = run(JobConfig(input=str(src), output=str(out), weights=weights_file, k=4), session=lambda: spark)
    return src, out, rpt


def test_the_fitted_model_is_published_with_the_results(store, weights_file):
    _, out, rpt = store
    fit = fitted.load(Results(str(out)))
    assert rpt["model"] == f"runs/{rpt['run_id']}/model.json"
    meta = json.loads((out / rpt["model"]).read_text())
    assert meta["features"]["input"] == [224, 224, 3] and "preprocess" in meta["features"]
    assert meta["weights"]["fingerprint"] == rpt["weights_fingerprint"]
    assert fit.mean.shape == (1280,) and fit.components.shape == (4, 1280)
    np.testing.assert_allclose(fit.explained_variance_ratio, rpt["explained_variance_ratio"])
    # The saved model reproduces every stored projection
    features, pca = rows(out, "features"), rows(out, "pca")
    for path, row in features.items():
        np.testing.assert_allclose(fit.project(np.array([row["features"]]))[0], pca[path]["pca"], rtol=1e-5, atol=1e-6)


def test_results_published_before_model_onnx_get_it_at_the_next_run_though_nothing_changed(job, tmp_path, weights_file):
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("x", "y"), per_label=2)
    job = partial(job, weights=weights_file, k=2, driver_max_images=256, driver_max_rows=20000)
    first = job(src, out)
    # As an older version left them: a fitted model, no model.onnx
    report = json.loads((out / "report.json").read_text())
    (out / report.pop("model_onnx")).unlink()
    (out / "report.json").write_text(json.dumps(report))

    again = job(src, out)

    assert again["published"] and again["run_id"] != first["run_id"] and again["images_featurized"] == 0
    runs = published(out)["runs"]  # the features are unchanged: their snapshot stays the first run's
    assert onnx_model(out)["run_id"] == runs["pca"] == runs["model.onnx"] == again["run_id"]
    assert job(src, out)["published"] is False  # and then runs without changes publish nothing, as before


def test_query_finds_a_stored_image_first_with_its_stored_coordinates(store, weights_file, capsys):
    src, out, _ = store
    image = f"{src}/Kiwi/2.jpg"
    assert query_cli.main(["--results", str(out), "--json", image]) == 0
    [answer] = json.loads(capsys.readouterr().out)
    stored = rows(out, "pca")[image]["pca"]
    nearest = answer["neighbours"][0]
    assert nearest["path"] == image and nearest["label"] == "Kiwi"
    scale = np.abs(stored).max()
    assert nearest["distance"] <= 1e-4 * scale
    np.testing.assert_allclose(answer["coords"], stored, rtol=1e-4, atol=1e-4 * scale)
    assert len(answer["neighbours"]) == 5 and answer["votes"] <= 5
    distances = [n["distance"] for n in answer["neighbours"]]
    assert distances == sorted(distances)


def test_query_of_a_new_photo_prints_neighbours_and_a_label(store, tmp_path, capsys):
    _, out, _ = store
    photo = write(f"{tmp_path}/new photo.png", encoded(rgb(1234, size=(90, 70)), "PNG"))
    assert query_cli.main(["--results", str(out), "--top", "3", photo]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert re.match(rf"{re.escape(photo)}: likely ({'|'.join(LABELS)}) \([1-3] of 3 nearest\)", printed[0])
    assert len(printed) == 2 + 3 and all(str(out.parent / "in") in line for line in printed[2:])


@pytest.mark.parametrize(
    "case, message",
    [
        ("model of an older version", "published before runs saved model.onnx; the next run adds it"),
        ("missing file", "nope.jpg: file not found"),
        ("not an image", "notes.jpg: not a recognised image format"),
        ("no results", "no results at"),
        ("no model", "have no fitted model: PCA needs at least 2 images"),
    ],
)
def test_query_refuses_bad_input_in_one_line(store, tmp_path, capsys, spark, weights_file, case, message):
    from emr_job.job import JobConfig, run

    src, out, _ = store
    image = f"{src}/Kiwi/0.jpg"
    if case == "model of an older version":  # results published before model.onnx: model.json format 1
        out = tmp_path / "old"
        shutil.copytree(store[1], out)
        meta_file = out / store[2]["model"]
        meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "format": 1}))
    elif case == "missing file":
        image = str(tmp_path / "nope.jpg")
    elif case == "not an image":
        image = write(f"{tmp_path}/notes.jpg", b"just text")
    elif case == "no results":
        out = tmp_path / "empty"
    elif case == "no model":
        make_tree(str(tmp_path / "one"), labels=("a",), per_label=1)
        out = tmp_path / "one-out"
        run(JobConfig(input=str(tmp_path / "one"), output=str(out), weights=weights_file), session=lambda: spark)
        capsys.readouterr()  # the job's own log
    assert query_cli.main(["--results", str(out), image]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.strip().splitlines()
    assert line.startswith("error: ") and message in line


def readme_sql() -> dict:
    """The SQL blocks of the README's SQL section, by the comment line that names each."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Query the results with SQL", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sql\n(.*?)```", section, re.S)
    assert blocks, "the README's SQL section has no ```sql block"
    return {b.splitlines()[0].lstrip("- ").strip(): b for b in blocks}


def test_the_readme_sql_runs_on_the_tables_and_agrees_with_the_report(store):
    _, out, rpt = store
    queries = readme_sql()
    per_label = sql_cli.query(str(out), queries["images per label"]).to_pylist()
    assert {r["label"]: r["images"] for r in per_label} == {
        name: row["images"] for name, row in rpt["labels"].items() if row["images"]
    }
    by_reason = sql_cli.query(str(out), queries["failures by reason"]).to_pylist()
    assert {r["reason"]: r["files"] for r in by_reason} == rpt["failures_by_reason"]


def test_sql_sees_deletes_applied(store, tmp_path, spark, weights_file):
    from emr_job.job import JobConfig, run

    src, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(store[0], src)
    run(JobConfig(input=str(src), output=str(out), weights=weights_file, k=2), session=lambda: spark)
    (src / "Kiwi" / "3.jpg").unlink()  # erased: a position delete, not yet compacted
    run(JobConfig(input=str(src), output=str(out), weights=weights_file, k=2), session=lambda: spark)
    got = sql_cli.query(str(out), "SELECT path FROM features WHERE label = 'Kiwi'").column("path").to_pylist()
    assert sorted(got) == sorted(str(p) for p in (src / "Kiwi").glob("[0-9].jpg"))


class Fields(HTMLParser):
    """data-field -> text, and the inline images, of report.html."""

    def __init__(self):
        super().__init__()
        self.fields, self.images, self._open = {}, [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "data-field" in attrs:
            self._open = attrs["data-field"]
            self.fields[self._open] = ""
        if tag == "img":
            self.images.append(attrs["src"])

    def handle_data(self, data):
        if self._open:
            self.fields[self._open] += data

    def handle_endtag(self, tag):
        self._open = None


def test_report_html_shows_the_figures_of_report_json(store):
    _, out, rpt = store
    assert rpt["html"] == f"runs/{rpt['run_id']}/report.html"
    page = Fields()
    page.feed((out / rpt["html"]).read_text())
    f = page.fields
    for key in ("images_total", "images_ok", "images_failed", "images_featurized", "k"):
        assert int(f[key]) == rpt[key], key
    assert f["explained_variance_total"] == f"{rpt['explained_variance_total']:.1%}"
    assert f["weights"] == rpt["weights"] and f["run_id"] == rpt["run_id"]
    for reason, n in rpt["failures_by_reason"].items():
        assert int(f[f"failures_by_reason.{reason}"]) == n
    for label, row in rpt["labels"].items():
        assert (int(f[f"labels.{label}.images"]), int(f[f"labels.{label}.failed"])) == (row["images"], row["failed"])
        accuracy = rpt["quality"]["per_label"][label]["accuracy"]
        assert f[f"quality.per_label.{label}.accuracy"] == f"{accuracy:.1%}"
    assert f["quality.accuracy"] == f"{rpt['quality']['accuracy']:.1%}"
    assert int(f["quality.sample"]) == rpt["quality"]["sample"] == 18
    assert rpt["labels"]["Kiwi"] == {"images": 6, "failed": 2}
    for name in ("broken.jpg", "empty.png"):  # the first failures are listed by path
        assert name in (out / rpt["html"]).read_text()
    for key in ("vcpu_seconds", "gb_seconds"):
        assert f[f"resources.{key}"] == f"{rpt['resources'][key]:.0f}" and rpt["resources"][key] > 0
    assert f["resources.estimated_usd"] == f"{rpt['resources']['estimated_usd']:.4f}"
    assert len(page.images) == 2  # the plots, inline: the page needs no other file
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size[0] > 300


def test_summary_links_the_report_and_states_separability(store):
    from emr_job.report import summary

    _, out, rpt = store
    text = summary(rpt)
    assert f"report: {out}/runs/{rpt['run_id']}/report.html" in text
    assert f"labels: 3, 5-NN accuracy {rpt['quality']['accuracy']:.1%} (leave-one-out, 18 of 18 images)" in text


def test_random_weights_make_the_accuracy_not_meaningful(job, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("a", "b"), per_label=3)
    rpt = job(src, out, weights="random", k=2)
    assert rpt["quality"]["caveat"] == "not meaningful: random weights, not trained ones"
    assert "not meaningful" in (out / rpt["html"]).read_text()


def test_leave_one_out_accuracy_equals_sklearn():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0, 1, (40, 4)), rng.normal(1.2, 1, (40, 4))])
    labels = ["a"] * 40 + ["b"] * 40  # two labels and k = 5: no ties, so sklearn's vote is the same rule
    got = quality.loo_accuracy(x, labels, k=5)
    hits = {"a": 0, "b": 0}
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        clf = KNeighborsClassifier(n_neighbors=5).fit(x[keep], np.array(labels)[keep])
        hits[labels[i]] += clf.predict(x[i : i + 1])[0] == labels[i]
    assert got["accuracy"] == pytest.approx(sum(hits.values()) / 80)
    assert got["per_label"]["a"] == {"sample": 40, "accuracy": pytest.approx(hits["a"] / 40)}
    assert 0.5 < got["accuracy"] < 1.0  # overlapping clusters: a figure that can be wrong


def test_well_separated_labels_score_one_and_ties_go_to_the_nearest():
    x = np.array([[0.0], [0.1], [0.2], [10.0], [10.1], [10.2]])
    assert quality.loo_accuracy(x, list("aaabbb"), k=2)["accuracy"] == 1.0
    assert quality.vote(["b", "a", "a", "b"]) == ("b", 2)
    index, dist = quality.nearest(np.array([[10.05]]), x, 2)
    assert sorted(index[0]) == [3, 4] and dist[0][0] == pytest.approx(0.05)
