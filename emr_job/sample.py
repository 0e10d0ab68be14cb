"""Make a small Fruits-360-like image tree offline: `python -m emr_job.sample DIR [--per-label N]`."""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw

# label -> (RGB colour, shape); the folder names carry the spaces and accents real datasets have.
FRUITS = {
    "Apple Red": ((200, 30, 40), "round"),
    "Banana": ((235, 205, 60), "long"),
    "Blueberry": ((60, 70, 160), "small"),
    "Kiwi": ((120, 140, 60), "oval"),
    "Orange": ((245, 140, 30), "round"),
    "Pêche": ((250, 170, 130), "round"),
}


def fruit_image(colour, shape: str, rng: np.random.Generator, size: int = 100) -> Image.Image:
    """A coloured blob on white, jittered in place, size and shade, with sensor-like noise."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    cx, cy = rng.uniform(0.4, 0.6, 2) * size
    r = rng.uniform(0.25, 0.38) * size
    rx, ry = {"round": (r, r), "long": (r * 1.2, r * 0.45), "small": (r * 0.5, r * 0.5), "oval": (r, r * 0.75)}[shape]
    shade = np.clip(np.array(colour) * rng.uniform(0.8, 1.15), 0, 255).astype(int)
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=tuple(int(c) for c in shade))
    pixels = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, (size, size, 3)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_tree(root: str, per_label: int = 20, broken: bool = True, seed: int = 0, size: int = 100) -> int:
    """Write per_label JPEGs for each fruit (plus two broken files if asked); returns the number of files."""
    rng = np.random.default_rng(seed)
    count = 0
    for label, (colour, shape) in FRUITS.items():
        folder = os.path.join(root, label)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_label):
            fruit_image(colour, shape, rng, size).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
            count += 1
    if broken:
        # What real uploads contain: an interrupted transfer and an empty file. Both must be reported.
        banana = os.path.join(root, "Banana")
        with open(os.path.join(banana, "00000.jpg"), "rb") as fh:
            data = fh.read()
        with open(os.path.join(banana, "truncated.jpg"), "wb") as fh:
            fh.write(data[: len(data) // 2])
        open(os.path.join(banana, "empty.png"), "wb").close()
        count += 2
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root")
    parser.add_argument("--per-label", type=int, default=20)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--no-broken", action="store_true", help="only valid images")
    args = parser.parse_args(argv)
    n = make_tree(args.root, args.per_label, broken=not args.no_broken, size=args.size)
    print(f"wrote {n} files under {args.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
