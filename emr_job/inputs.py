"""The digest of the images a run planned from, recorded in report.json: the image files' count, total bytes, and
a SHA-256 over their sorted (key, ETag) pairs. The daily pass (lambdas/pipeline/inputs.py, this function's twin:
the two deployables are packaged apart) lists images/ the same way and starts a run only if the digests differ."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from emr_job.images import is_image_name


def inputs_digest(objects: Iterable[tuple]) -> dict:
    """(key, etag, size) of the objects under the images prefix, in any order -> {images, bytes, sha256}. Only
    image files count, recognised as the job recognises them: other files come and go without starting a run."""
    records, total = [], 0
    for key, etag, size in objects:
        if key.endswith("/") or not is_image_name(key):
            continue
        # Keys hold no NUL (S3 keys are XML text) and ETags no newline: each record reads back one way only.
        records.append(key.encode() + b"\0" + etag.strip('"').encode() + b"\n")
        total += size
    records.sort()  # UTF-8 byte order is code point order: the order S3 lists in
    sha = hashlib.sha256()
    for record in records:
        sha.update(record)
    return {"images": len(records), "bytes": total, "sha256": sha.hexdigest()}
