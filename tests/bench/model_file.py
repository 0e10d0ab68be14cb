"""A run's model.onnx as a client uses it (make bench runs it: section model).

    python tests/bench/model_file.py WEIGHTS.weights.h5 WORKDIR

The job publishes a run over 200 small JPEGs (100x100) and 12 camera photos (12 and 48 MP, every EXIF
orientation, a PNG). Then, in this process:
  - the file's size, and its load time (a new ONNX Runtime session, median of 5), beside the job's network alone;
  - its throughput on batches of 32 against the job's network (features only), alternating rounds, best of each,
    every core to each;
  - how close a client gets to the stored rows: decoding by model.json's recipe with Pillow, a full decode (no
    DCT scaling) with Pillow's bilinear resize, and a full decode with a plain bilinear resize (no antialiasing,
    as OpenCV's INTER_LINEAR, ONNX's Resize or most image libraries do it): the features' cosine to the stored
    features, and the largest PCA coordinate error as a fraction of the row's norm, worst and median.

Prints one JSON line. The weights are the bench's seeded ones, not ImageNet's: what moves the features of a
photo depends on the weights, so the fidelity figures say how far a decode moves this network's input."""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "bench")]

from emr_job.images import SIZE, decode_image, to_rgb  # noqa: E402

BATCH, ROUNDS, SECONDS = 32, 3, 10.0


def full_decode(data: bytes) -> Image.Image:
    """Every pixel decoded (no DCT scaling), oriented and in RGB: what any decoder gives."""
    return to_rgb(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))


def pillow_bilinear(data: bytes) -> np.ndarray:
    return np.asarray(full_decode(data).resize((SIZE, SIZE), Image.BILINEAR), np.uint8)


def plain_bilinear(data: bytes) -> np.ndarray:
    """A bilinear resize from the 4 nearest source pixels, pixel centres aligned (OpenCV's INTER_LINEAR)."""
    img = np.asarray(full_decode(data), np.float32)

    def taps(n: int) -> tuple:
        x = np.clip((np.arange(SIZE) + 0.5) * n / SIZE - 0.5, 0, n - 1)
        lo = np.floor(x).astype(int)
        return lo, np.minimum(lo + 1, n - 1), (x - lo)[:, None]

    (y0, y1, ty), (x0, x1, tx) = taps(img.shape[0]), taps(img.shape[1])
    rows = img[y0] * (1 - ty[:, :, None]) + img[y1] * ty[:, :, None]
    out = rows[:, x0] * (1 - tx[None]) + rows[:, x1] * tx[None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


DECODES = {
    "recipe": decode_image,
    "full decode, Pillow's bilinear": pillow_bilinear,
    "full decode, plain bilinear": plain_bilinear,
}


def publish(weights: str, work: Path) -> Path:
    from bench import make_images, make_photos

    src, out = work / "model-in", work / "model-out"
    make_images(src / "small", 200)
    make_photos(src / "camera", 12)
    cmd = [sys.executable, "-m", "emr_job", "--input", str(src), "--output", str(out), "--weights", weights]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out


def load_ms(model) -> float:
    import onnxruntime as ort

    times = []
    for _ in range(5):
        start = time.perf_counter()
        ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 1)


def throughput(model) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count()
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).integers(0, 255, (BATCH, SIZE, SIZE, 3), dtype=np.uint8)
    session.run(None, {"images": x})
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < SECONDS:
        session.run(None, {"images": x})
        n += BATCH
    return n / (time.perf_counter() - start)


def fidelity(out: Path, model: bytes) -> dict:
    import onnxruntime as ort

    from emr_job.store import Results

    results = Results(str(out))
    features = {r["path"]: r["features"] for r in results.read("features").to_pylist()}
    pca = {r["path"]: r["pca"] for r in results.read("pca").to_pylist()}
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    figures = {}
    for kind in ("small", "camera"):
        paths = sorted(p for p in features if f"/{kind}/" in p)
        datas = [Path(p).read_bytes() for p in paths]
        for name, decode in DECODES.items():
            got_f, got_p = session.run(["features", "pca"], {"images": np.stack([decode(d) for d in datas])})
            cosines, errors = [], []
            for i, path in enumerate(paths):
                f, p = np.asarray(features[path]), np.asarray(pca[path])
                cosines.append(float(got_f[i] @ f / (np.linalg.norm(got_f[i]) * np.linalg.norm(f))))
                errors.append(float(np.abs(got_p[i] - p).max() / np.linalg.norm(p)))
            figures[f"{kind}: {name}"] = {"images": len(paths), "cosine_min": round(min(cosines), 6),
                                          "cosine_median": round(statistics.median(cosines), 6),
                                          "pca_error_max": float(f"{max(errors):.3g}"),
                                          "pca_error_median": float(f"{statistics.median(errors):.3g}")}  # fmt: skip
    return figures


def main(weights: str, work: Path) -> dict:
    from emr_job import network

    out = publish(weights, work)
    report = json.loads((out / "report.json").read_text())
    model = (out / report["model_onnx"]).read_bytes()
    alone = network.onnx_model(network.read_weights(weights))
    rates = {"model.onnx": [], "network alone": []}
    for _ in range(ROUNDS):  # alternating: this VM's speed drifts within minutes
        rates["model.onnx"].append(throughput(model))
        rates["network alone"].append(throughput(alone))
    best = {name: max(r) for name, r in rates.items()}
    return {
        "k": report["k"],
        "bytes": len(model),
        "network_alone_bytes": len(alone),
        "load_ms": load_ms(model),
        "network_alone_load_ms": load_ms(alone),
        "img_s": round(best["model.onnx"], 1),
        "network_alone_img_s": round(best["network alone"], 1),
        "ratio": round(best["model.onnx"] / best["network alone"], 3),
        "rounds_img_s": {name: [round(x, 1) for x in r] for name, r in rates.items()},
        "fidelity": fidelity(out, model),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], Path(sys.argv[2]))))
