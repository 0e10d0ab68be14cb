"""A cheap summary of what images/ holds, for the daily pass: the image files' count, total bytes, and a SHA-256
over their sorted (key, ETag) pairs. Keys are hashed here and never kept, logged or stored.

The job records the same digest of the listing it planned from in report.json (emr_job/inputs.py is the twin of
inputs_digest: the two deployables are packaged apart; tests/job/test_inputs_digest.py checks they agree)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import boto3
import botocore.session
from botocore.exceptions import ClientError

from pipeline.notifications import is_image_key

LIST_THREADS = 10  # botocore's default connection pool size
# Within the function's 120 s timeout: a listing that cannot finish fails here, and the daily pass runs the job.
LIST_BUDGET_S = 60


def s3_client(config):
    """S3 for listing, with LastModified left as text: botocore's date parsing takes most of a listing's CPU (a
    1,000-key page parses 4 to 7 times faster without it: `make bench`, daily section), and the function gets
    under a third of a vCPU."""
    core = botocore.session.Session()
    if boto3.DEFAULT_SESSION is not None:  # share the service models the other clients loaded (0.2 s per cold start)
        core.register_component("data_loader", boto3.DEFAULT_SESSION._session.get_component("data_loader"))
    core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    return boto3.Session(botocore_session=core).client("s3", config=config)


def inputs_digest(objects: Iterable[tuple]) -> dict:
    """(key, etag, size) of the objects under the images prefix, in any order -> {images, bytes, sha256}. Only
    image files count, recognised as the job recognises them: other files come and go without starting a run."""
    records, total = [], 0
    for key, etag, size in objects:
        if key.endswith("/") or not is_image_key(key):
            continue
        # Keys hold no NUL (S3 keys are XML text) and ETags no newline: each record reads back one way only.
        records.append(key.encode() + b"\0" + etag.strip('"').encode() + b"\n")
        total += size
    records.sort()  # UTF-8 byte order is code point order: the order S3 lists in
    sha = hashlib.sha256()
    for record in records:
        sha.update(record)
    return {"images": len(records), "bytes": total, "sha256": sha.hexdigest()}


def list_objects(s3, bucket: str, prefix: str) -> Iterator[tuple]:
    """(key, etag, size) of every object under prefix. Each top-level folder (label) is listed in parallel, as the
    job lists: a million keys are 1,000 pages, minutes in series. Raises TimeoutError past LIST_BUDGET_S."""
    deadline = time.monotonic() + LIST_BUDGET_S
    folders = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        folders += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        yield from _triples(page, deadline)

    def folder_objects(folder: str) -> list:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder)
        return [triple for page in pages for triple in _triples(page, deadline)]

    with ThreadPoolExecutor(LIST_THREADS) as pool:
        for objects in pool.map(folder_objects, folders):
            yield from objects


def _triples(page: dict, deadline: float) -> list:
    if time.monotonic() > deadline:
        raise TimeoutError("listing images/ took longer than its budget")
    return [(o["Key"], o["ETag"], o["Size"]) for o in page.get("Contents", [])]


def current_inputs(s3, bucket: str, prefix: str) -> dict:
    return inputs_digest(list_objects(s3, bucket, prefix))


def published_report(s3, bucket: str, results_prefix: str) -> Optional[dict]:
    """The published run's report.json; None before the first run. Listed before it is read: without s3:ListBucket
    S3 answers a missing key with 403, not 404 (S3 API reference, GetObject), and the function may list this one
    key alone, so "no results yet" never reads as "unreadable"."""
    key = results_prefix + "report.json"
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1).get("Contents", [])
    if not any(o["Key"] == key for o in listed):
        return None
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:  # deleted between the listing and the read
        if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
            return None
        raise
    return json.loads(body)
