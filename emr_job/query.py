"""Which stored images look like this photo? `python -m emr_job.query --results DIR|s3://... IMAGE [IMAGE ...]`

Each image is decoded as the job decodes (model.json's recipe) and run through the published run's model.onnx,
the graph any client of the results gets: the run's network and weights, then its PCA projection. Its
coordinates are compared with every stored image's. Prints the nearest stored images (path, label, distance)
and the label they vote for."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from botocore.exceptions import BotoCoreError, ClientError

from emr_job import fitted, quality, storage
from emr_job.images import ImageError, decode_image

BATCH = 32  # images per call: memory stays bounded for any number of images


class QueryError(ValueError):
    """Bad input to a query: one line, naming the file or option."""


@dataclass
class Stored:
    paths: list
    labels: list
    coords: np.ndarray


@dataclass
class Answer:
    image: str
    coords: list
    neighbours: list  # dicts: path, label, distance; nearest first
    label: Optional[str]
    votes: int
    timings_s: dict = field(default_factory=dict)


def load_results(root: str) -> tuple:
    """(fitted model, stored coordinates) of the published run."""
    from emr_job.store import Results

    results = Results(root)
    fit = fitted.load(results)
    table = results.read("pca", ("path", "label", "pca"))
    if table.num_rows == 0:
        raise QueryError(f"the results at {results.root} hold no images to compare with")
    coords = table.column("pca").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(table.num_rows, -1)
    return fit, Stored(table.column("path").to_pylist(), table.column("label").to_pylist(), coords)


def read_images(paths: list) -> np.ndarray:
    """Decoded pixels of every image; QueryError naming each file that cannot be used."""
    pixels, errors = [], []
    for path in paths:
        try:
            pixels.append(decode_image(storage.read_bytes(path)[0]))
        except FileNotFoundError:
            errors.append(f"{path}: file not found")
        except IsADirectoryError:
            errors.append(f"{path}: is a folder, not an image")
        except ImageError as exc:
            errors.append(f"{path}: {exc}")
    if errors:
        raise QueryError("; ".join(errors))
    return np.stack(pixels)


def session(onnx: bytes):
    """An ONNX Runtime session on the run's model.onnx."""
    import onnxruntime as ort

    return ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])


def run_model(sess, pixels: np.ndarray) -> tuple:
    """(features, pca) of decoded images, as model.onnx computes them."""
    parts = [sess.run(["features", "pca"], {"images": pixels[i : i + BATCH]}) for i in range(0, len(pixels), BATCH)]
    return np.concatenate([f for f, _ in parts]), np.concatenate([p for _, p in parts])


def query(root: str, images: list, top: int = 5) -> list:
    """Answers for each image, nearest stored images first."""
    if top < 1:
        raise QueryError(f"--top must be at least 1, got {top}")
    clock = time.monotonic()
    fit, stored = load_results(storage.normalize(root))
    sess = session(fitted.onnx_bytes(fit))
    loaded = time.monotonic()
    pixels = read_images(images)
    _, coords = run_model(sess, pixels)
    featurized = time.monotonic()
    index, dist = quality.nearest(coords, stored.coords, top)
    searched = time.monotonic()
    timings = {"load_results": loaded - clock, "featurize": featurized - loaded, "search": searched - featurized}
    answers = []
    for i, image in enumerate(images):
        neighbours = [{"path": stored.paths[j], "label": stored.labels[j], "distance": float(d)}
                      for j, d in zip(index[i], dist[i])]  # fmt: skip
        label, votes = quality.vote([n["label"] for n in neighbours])
        answers.append(Answer(image, [float(x) for x in coords[i]], neighbours, label, votes, timings))
    return answers


def render(answers: list) -> str:
    lines = []
    for a in answers:
        lines.append(f"{a.image}: likely {a.label} ({a.votes} of {len(a.neighbours)} nearest)")
        width = max(len(str(n["label"])) for n in a.neighbours)
        lines.append(f"  {'#':>2}  {'distance':>9}  {'label':<{width}}  path")
        for rank, n in enumerate(a.neighbours, 1):
            lines.append(f"  {rank:>2}  {n['distance']:>9.4g}  {str(n['label']):<{width}}  {n['path']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emr_job.query", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--results", required=True, help="the job's --output: a folder or s3:// prefix")
    parser.add_argument("--top", type=int, default=5, help="nearest stored images to show (default 5)")
    parser.add_argument("--json", action="store_true", help="one JSON document instead of tables")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or s3:// URIs")
    args = parser.parse_args(argv)
    try:
        answers = query(args.results, args.images, args.top)
    except (QueryError, fitted.ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (BotoCoreError, ClientError) as exc:  # no credentials, no such bucket, access denied
        print(f"error: cannot read {args.results}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([a.__dict__ for a in answers], indent=2, ensure_ascii=False))
    else:
        print(render(answers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
