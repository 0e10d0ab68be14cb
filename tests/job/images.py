"""Small real image files of every kind the job must handle, written by tests."""

import io
import os

import numpy as np
from PIL import Image


def rgb(seed: int, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, 3)
    pixels = np.clip(base + rng.normal(0, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def every_mode() -> dict:
    """name -> Pillow image in each mode real uploads arrive in."""
    base = rgb(1)
    p_transparent = base.convert("P", palette=Image.ADAPTIVE, colors=16)
    p_transparent.info["transparency"] = 0
    i16 = Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16))
    return {
        "L": base.convert("L"),
        "LA": base.convert("LA"),
        "P": p_transparent,
        "RGBA": base.convert("RGBA"),
        "CMYK": base.convert("CMYK"),
        "I;16": i16,
    }


def encoded(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    """A 60x30 landscape (red left, blue right) tagged 'rotate 90 CW' (orientation 6)."""
    pixels = np.zeros((30, 60, 3), np.uint8)
    pixels[:, :30] = (255, 0, 0)
    pixels[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95)


def bomb_png() -> bytes:
    """A real, tiny PNG whose header declares more pixels than Pillow's limit allows."""
    return encoded(Image.new("1", (10000, 9000)), "PNG")


def write(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def make_tree(root: str, labels=("Apple Braeburn", "Pêche", "Kiwi"), per_label=4, seed=0) -> list:
    """Plain JPEGs in a Fruits-360 layout; returns their paths."""
    paths = []
    for li, label in enumerate(labels):
        for i in range(per_label):
            img = rgb(seed * 1000 + li * 100 + i)
            paths.append(write(os.path.join(root, label, f"{i}.jpg"), encoded(img, "JPEG", quality=92)))
    return paths
