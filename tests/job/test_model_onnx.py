"""A client of a run's model.onnx, written as one outside this project would write it: ONNX Runtime, Pillow and
numpy, the rows read with pyiceberg's own reader, and nothing imported from this repository. The job runs as its
command. Decoding each stored image by model.json's recipe and running the graph reproduces the stored rows."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image, ImageOps
from pyiceberg.table import StaticTable

CAMERA = (4032, 3024)  # a 12 MP phone photo


def photo(seed: int, size: tuple) -> Image.Image:
    """Smooth shapes and texture, so that images differ in what the network sees (not noise alone)."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    fx, fy, phase = rng.uniform(2, 9, 3)
    base = np.stack([np.sin(fx * x + phase), np.cos(fy * y), np.sin(fx * x * fy * y)], axis=-1)
    pixels = (base * rng.uniform(60, 120, 3) + rng.uniform(60, 190, 3)) + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def rotated_jpeg(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=90, exif=exif.tobytes())


def sixteen_bit_png(seed: int) -> bytes:
    grey = np.asarray(photo(seed, (90, 120)).convert("L"), np.uint16) * 257
    return encode(Image.fromarray(grey), "PNG")  # mode I;16


def transparent_png(seed: int) -> bytes:
    rgba = photo(seed, (130, 90)).convert("RGBA")
    alpha = np.full((90, 130), 255, np.uint8)
    alpha[20:70, 30:100] = 40
    rgba.putalpha(Image.fromarray(alpha))
    return encode(rgba, "PNG")


@pytest.fixture(scope="module")
def published(tmp_path_factory, weights_file):
    """Small images of many kinds and one camera-size photo, through `python -m emr_job`: (input, output)."""
    root = tmp_path_factory.mktemp("model-onnx")
    src, out = root / "in", root / "out"
    files = {
        "Apple/small.jpg": encode(photo(1, (100, 100)), "JPEG", quality=92),
        "Apple/wide.png": encode(photo(2, (160, 70)), "PNG"),
        "Apple/turned.jpg": rotated_jpeg(photo(3, (120, 90)), 6),
        "Apple/grey16.png": sixteen_bit_png(4),
        "Kiwi/see-through.png": transparent_png(5),
        "Kiwi/palette.gif": encode(photo(6, (80, 80)).convert("P"), "GIF"),
        "Kiwi/plain.webp": encode(photo(7, (96, 96)), "WEBP", quality=90),
        "Kiwi/camera.jpg": rotated_jpeg(photo(8, CAMERA), 8),
    }
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    command = [sys.executable, "-m", "emr_job", "--input", str(src), "--output", str(out), "--weights",
               weights_file, "--k", "4"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return src, out


def decode(data: bytes, recipe: dict) -> np.ndarray:
    """model.json's decoding recipe, applied with Pillow as its steps say."""
    img = Image.open(io.BytesIO(data))
    for step in recipe["steps"]:
        if step["step"] == "draft":
            if img.format in step["formats"]:
                img.draft(step["mode"], tuple(step["size"]))
        elif step["step"] == "exif_orientation":
            img = ImageOps.exif_transpose(img)
        elif step["step"] == "rgb":
            if img.mode.startswith("I;16") or img.mode == "I":
                grey = np.asarray(img, np.float64)
                img = Image.fromarray(np.clip(grey / (257.0 if grey.max() > 255 else 1.0), 0, 255).astype(np.uint8))
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            if img.mode in ("RGBA", "LA", "PA"):
                background = Image.new("RGBA", img.size, (*step["background"], 255))
                img = Image.alpha_composite(background, img.convert("RGBA"))
            img = img.convert("RGB")
        elif step["step"] == "resize":
            img = img.resize(tuple(step["size"]), getattr(Image.Resampling, step["filter"].upper()))
        else:
            raise AssertionError(f"a step this client does not know: {step}")
    return np.asarray(img, np.uint8)


def table_rows(out: Path, report: dict, name: str) -> dict:
    """path -> row, read by pyiceberg from the table metadata that report.json publishes."""
    table = StaticTable.from_metadata(report["commit"]["tables"][name])
    return {row["path"]: row for row in table.scan().to_arrow().to_pylist()}


def test_model_onnx_alone_reproduces_the_stored_rows_of_small_images_and_a_camera_photo(published):
    src, out = published
    report = json.loads((out / "report.json").read_text())
    meta = json.loads((out / report["model"]).read_text())
    model_file = out / report["model"].rsplit("/", 1)[0] / meta["onnx"]["file"]
    assert report["model_onnx"] == str(model_file.relative_to(out))

    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    [images] = session.get_inputs()
    assert (images.name, images.type, images.shape[1:]) == ("images", "tensor(uint8)", [224, 224, 3])
    outputs = {o.name: (o.type, o.shape[1]) for o in session.get_outputs()}
    assert outputs == {"features": ("tensor(float)", 1280), "pca": ("tensor(float)", 4)}
    props = session.get_modelmeta().custom_metadata_map
    assert props["run_id"] == report["run_id"] and props["weights_fingerprint"] == report["weights_fingerprint"]
    assert int(props["k"]) == report["k"] == 4 and json.loads(props["decode"]) == meta["decode"]

    features, pca = table_rows(out, report, "features"), table_rows(out, report, "pca")
    assert len(features) == len(pca) == 8  # every image, the camera photo included
    paths = sorted(features)
    pixels = np.stack([decode(Path(p).read_bytes(), meta["decode"]) for p in paths])
    got_features, got_pca = session.run(["features", "pca"], {"images": pixels})

    for i, path in enumerate(paths):
        stored = np.asarray(features[path]["features"], np.float64)
        cosine = got_features[i] @ stored / (np.linalg.norm(got_features[i]) * np.linalg.norm(stored))
        assert cosine >= 0.9999, (Path(path).name, cosine)
        coords = np.asarray(pca[path]["pca"], np.float64)
        assert np.abs(got_pca[i] - coords).max() <= 1e-3 * np.linalg.norm(coords), Path(path).name
    camera = paths.index(str(src / "Kiwi" / "camera.jpg"))
    assert Image.open(paths[camera]).size == CAMERA  # the camera photo went through the draft step


def test_model_onnx_is_one_standard_graph_that_names_no_image(published):
    src, out = published
    report = json.loads((out / "report.json").read_text())
    data = (out / report["model_onnx"]).read_bytes()
    graph = onnx.load_from_string(data)
    onnx.checker.check_model(graph, full_check=True)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    stored = [str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()]
    assert stored and not [name for name in stored if name.encode() in data or Path(name).name.encode() in data]
    assert str(src).encode() not in data


def test_the_readme_example_gives_a_stored_rows_coordinates(published):
    src, out = published
    report = json.loads((out / "report.json").read_text())
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    [example] = [b for b in readme.split("```python\n")[1:] if "model.onnx" in b.split("```")[0]]
    code = example.split("```")[0]
    photo = src / "Apple" / "turned.jpg"
    code = code.replace("out/results/runs/<run_id>/model.onnx", str(out / report["model_onnx"]))
    code = code.replace('"photo.jpg"', repr(str(photo)))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example, as a reader runs it
    stored = np.asarray(table_rows(out, report, "pca")[str(photo)]["pca"], np.float64)
    assert np.abs(scope["pca"][0] - stored).max() <= 1e-3 * np.linalg.norm(stored)
