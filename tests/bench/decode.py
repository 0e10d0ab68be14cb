"""Decoding choices for camera photos (issue 17): time per image in one process, and how far each moves the
features from a full decode followed by the same resize (cosine), on the bench's photo-like JPEGs.

    python tests/bench/decode.py WEIGHTS.weights.h5 [N]      (make bench runs it: section decode)

Prints a table and one JSON line. simplejpeg (libjpeg-turbo with DCT scaling, requirements-dev.txt) is the
binding measured against Pillow (whose wheels bundle libjpeg-turbo too)."""

from __future__ import annotations

import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "bench")]

from emr_job.images import SIZE, decode_image, to_rgb  # noqa: E402

ORIENT = {2: Image.FLIP_LEFT_RIGHT, 3: Image.ROTATE_180, 4: Image.FLIP_TOP_BOTTOM, 5: Image.TRANSPOSE,
          6: Image.ROTATE_270, 7: Image.TRANSVERSE, 8: Image.ROTATE_90}  # fmt: skip


def pillow(data: bytes, draft: int = 0, gap=None) -> np.ndarray:
    """Pillow with DCT scaling to `draft` x the target (0: a full decode), then the job's resize."""
    img = Image.open(io.BytesIO(data))
    if draft:
        img.draft("RGB", (SIZE * draft, SIZE * draft))
    img = to_rgb(ImageOps.exif_transpose(img))
    return np.asarray(img.resize((SIZE, SIZE), Image.BILINEAR, reducing_gap=gap), dtype=np.uint8)


def turbo(data: bytes, factor: int) -> np.ndarray:
    """simplejpeg: libjpeg-turbo's DCT scaling to at least `factor` x the target, orientation from the EXIF."""
    import simplejpeg

    img = Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=SIZE * factor,
                                                 min_width=SIZE * factor))  # fmt: skip
    orientation = Image.open(io.BytesIO(data)).getexif().get(0x0112, 1)
    img = img.transpose(ORIENT[orientation]) if orientation in ORIENT else img
    return np.asarray(img.resize((SIZE, SIZE), Image.BILINEAR), dtype=np.uint8)


def requality(data: bytes) -> np.ndarray:
    """The noise floor: a full decode of the photo re-encoded at JPEG quality 97, a change no one would see."""
    img = Image.open(io.BytesIO(data))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=97, exif=img.info.get("exif", b""))
    return pillow(out.getvalue())


CHOICES = {
    "full decode (the reference)": pillow,
    "noise floor: the reference of a q97 re-encode": requality,
    "the job's decode_image (DCT scaling to 2x)": decode_image,
    "DCT scaling to 1x": lambda d: pillow(d, 1),
    "DCT scaling to 4x": lambda d: pillow(d, 4),
    "DCT scaling to 2x, reducing_gap 2": lambda d: pillow(d, 2, 2.0),
    "full decode, reducing_gap 3": lambda d: pillow(d, 0, 3.0),
    "simplejpeg, DCT scaling to 2x": lambda d: turbo(d, 2),
    "simplejpeg, DCT scaling to 1x": lambda d: turbo(d, 1),
}


def main(weights: str, n: int = 40) -> dict:
    import onnxruntime as ort
    from bench import make_photos

    from emr_job import network

    with tempfile.TemporaryDirectory() as tmp:
        make_photos(Path(tmp), n)
        datas = [p.read_bytes() for p in sorted(Path(tmp).rglob("*.jpg"))]
    session = ort.InferenceSession(network.onnx_model(network.read_weights(weights)))
    features, pixels, out = {}, {}, {}
    for name, decode in CHOICES.items():
        decode(datas[0])
        start = time.perf_counter()
        arrays = [decode(d) for d in datas]
        out[name] = {"ms_per_image": round(1000 * (time.perf_counter() - start) / len(datas), 1)}
        f = np.concatenate([session.run(None, {"images": np.stack(arrays[i : i + 16])})[0]
                            for i in range(0, len(arrays), 16)])  # fmt: skip
        features[name] = f / np.linalg.norm(f, axis=1, keepdims=True)
        pixels[name] = np.stack(arrays).astype(np.float32)
    reference = "full decode (the reference)"
    for name in CHOICES:
        cosine = (features[name] * features[reference]).sum(axis=1)
        moved = float(np.abs(pixels[name] - pixels[reference]).mean())
        out[name].update(cosine_min=round(float(cosine.min()), 5), cosine_mean=round(float(cosine.mean()), 5),
                         pixel_mean_abs_diff=round(moved, 2))  # fmt: skip
    for name, row in out.items():
        print(f"{name:48s} {row}", file=sys.stderr)
    return {"jpegs": len(datas), "choices": out}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], *(int(a) for a in sys.argv[2:]))))
