"""Image files -> 224x224 RGB arrays, with a readable reason for every file that cannot be used."""

from __future__ import annotations

import io
import posixpath
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
SIZE = 224

# Truncated files must fail, not be padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# We raise our own error above Pillow's limit (decode_image); the warning would only be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


# decode_image, step by step, for a client that must give the published model.onnx the same input: saved in each
# run's model.json and in the graph's metadata. With Pillow, following it reproduces the job's pixels exactly.
DECODE_RECIPE = {
    "library": "Pillow",
    "steps": [
        {"step": "draft", "formats": ["JPEG"], "mode": "RGB", "size": [SIZE, SIZE],
         "pillow": f"img.draft('RGB', ({SIZE}, {SIZE})) before img.load()",
         "what": "libjpeg's DCT scaling: decoded at 1/2, 1/4 or 1/8 size, the smallest that keeps both sides at "
                 f"least {SIZE}"},
        {"step": "exif_orientation", "pillow": "img = ImageOps.exif_transpose(img)",
         "what": "the EXIF Orientation tag applied, then dropped"},
        {"step": "rgb", "background": [255, 255, 255], "pillow": "img.convert('RGB'), transparency first composited "
         "on the background (Image.alpha_composite)",
         "what": "any mode to 8-bit RGB; 16-bit greys above 255 divided by 257; transparent pixels over white"},
        {"step": "resize", "size": [SIZE, SIZE], "filter": "bilinear", "keep_aspect": False,
         "pillow": f"img.resize(({SIZE}, {SIZE}), Image.BILINEAR)",
         "what": "to 224x224 whatever the aspect ratio; Pillow's bilinear filter widens as it shrinks (antialiased)"},
    ],
    "output": f"uint8 RGB, shape ({SIZE}, {SIZE}, 3), rows top to bottom; stack N images as (N, {SIZE}, {SIZE}, 3)",
}  # fmt: skip


class ImageError(ValueError):
    """A file that is named like an image but cannot be used as one."""


def is_image_name(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def decode_image(data: bytes) -> np.ndarray:
    """Bytes of any supported format -> uint8 array (224, 224, 3); raises ImageError with a reason."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        limit = Image.MAX_IMAGE_PIXELS
        if limit and img.width * img.height > limit:
            raise ImageError(f"decompression bomb: {img.width}x{img.height} pixels exceeds the limit of {limit}")
        if img.format == "JPEG":
            # libjpeg's DCT scaling decodes large photos at 1/2..1/8 size, just above the target: a 12 MP photo
            # in 42 ms instead of 190, features at cosine 0.99999 to a full decode (docs/PERFORMANCE.md, decoding).
            img.draft("RGB", (SIZE, SIZE))
        img.load()
        img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
        img = img.resize((SIZE, SIZE), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not a recognised image format") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for corrupt data
        raise ImageError(f"undecodable: {type(exc).__name__}: {exc}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited on white (the Fruits-360 background)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and float greys: scale to 8 bits instead of clipping everything above 255 to white.
        arr = np.asarray(img, dtype=np.float64)
        scale = 257.0 if img.mode != "F" and arr.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(arr / scale, 0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img
