"""What a run executes, put in place by the stack itself (the JobArtifacts custom resource).

`sam build` makes the job, its Python runtime archive and a manifest of their SHA-256 (the JobRuntime layer,
emr_job/package.py); this copies them to artifacts/job/<version>/ and the model weights to
artifacts/model/<version>/, each version keyed by content. A run keeps the version it started with: a folder is
deleted only once a newer one has been deployed for longer than a run may last."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from typing import Callable, Optional

# Where tf.keras.applications.MobileNetV2(include_top=False, weights="imagenet") downloads its weights from.
IMAGENET_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
)
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # every Keras .h5 weights file starts with it
WEIGHTS_NAME = "mobilenet_v2.weights.h5"
MARKER = "deployed"  # holds when the version last became current
VERSION_LEN = 16
ATTRIBUTES = ("Version", "JobEntryUri", "JobArchiveUri", "RuntimeArchiveUri", "WeightsUri")  # for !GetAtt


class ArtifactsError(RuntimeError):
    """A piece of the deployment is missing or wrong; CloudFormation shows this text and rolls back."""


@dataclass(frozen=True)
class Request:
    bucket: str
    prefix: str  # "artifacts/"
    source_dir: str  # the layer's job/ folder (/opt/job in Lambda)
    weights: str  # imagenet | s3://bucket/key
    weights_sha256: str  # "" or the SHA-256 the weights file must have
    keep_superseded_s: float  # a superseded version is kept this long (a run started on it may still read it)


def publish(s3, req: Request, fetch: Optional[Callable[[str, str], None]] = None, now: Optional[float] = None) -> dict:
    """Create and Update: upload what is missing, mark the versions current, prune old ones. Returns the URIs."""
    now = time.time() if now is None else now
    manifest = read_manifest(req.source_dir)
    job = f"{req.prefix}job/{version_of(manifest)}/"
    for name, digest in sorted(manifest.items()):
        _upload_once(s3, req.bucket, job + name, os.path.join(req.source_dir, name), digest)
    weights_key = _publish_weights(s3, req, fetch or download)
    for folder, current in ((f"{req.prefix}job/", job), (f"{req.prefix}model/", weights_key.rsplit("/", 1)[0] + "/")):
        make_current(s3, req.bucket, folder, current)
        prune(s3, req.bucket, folder, current, req.keep_superseded_s, now)
    runtime = next(name for name in manifest if name.startswith("runtime-"))
    uri = f"s3://{req.bucket}/"
    return {
        "Version": version_of(manifest) + "-" + weights_key.split("/")[-2],
        "JobEntryUri": uri + job + "main.py",
        "JobArchiveUri": uri + job + "emr_job.zip",
        "RuntimeArchiveUri": uri + job + runtime,
        "WeightsUri": uri + weights_key,
    }


def remove(s3, req: Request) -> int:
    """Delete: every version and delete marker of what this resource put in place, nothing else. A stack deletion
    retains the bucket with the data; the rollback of a failed first create deletes the bucket it made, which S3
    allows only once no version is left in it (RetainExceptOnCreate, docs/DEPLOY.md)."""
    removed = 0
    for folder in (f"{req.prefix}job/", f"{req.prefix}model/"):
        removed += _delete_versions(s3, req.bucket, folder)
    return removed


# --- the job -----------------------------------------------------------------------------------------------
def read_manifest(source_dir: str) -> dict:
    """file name -> SHA-256, as emr_job/package.py wrote them; each file is checked against it."""
    path = os.path.join(source_dir, "manifest.json")
    try:
        with open(path) as fh:
            manifest = json.load(fh)["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactsError(f"no job manifest at {path} ({exc}): is the JobRuntime layer built?") from None
    needed = {"main.py", "emr_job.zip"}
    if not needed <= set(manifest) or not any(n.startswith("runtime-") for n in manifest):
        raise ArtifactsError(f"{path} lists {sorted(manifest)}; it needs main.py, emr_job.zip and runtime-*.tar.gz")
    return manifest


def version_of(manifest: dict) -> str:
    text = json.dumps(manifest, sort_keys=True).encode()
    return hashlib.sha256(text).hexdigest()[:VERSION_LEN]


def _upload_once(s3, bucket: str, key: str, path: str, digest: str) -> None:
    if _exists(s3, bucket, key):
        return  # the folder is keyed by content: what is there is this file
    if sha256_file(path) != digest:
        raise ArtifactsError(f"{os.path.basename(path)} does not match its manifest entry: rebuild with sam build")
    s3.upload_file(path, bucket, key)


# --- the weights -------------------------------------------------------------------------------------------
def _publish_weights(s3, req: Request, fetch) -> str:
    """Returns the key of the weights under model/<sha256[:16]>/. The file is fetched or copied, checked, uploaded."""
    if req.weights_sha256:
        key = f"{req.prefix}model/{req.weights_sha256[:VERSION_LEN]}/{WEIGHTS_NAME}"
        if _exists(s3, req.bucket, key):
            return key  # already checked when it was put there
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, WEIGHTS_NAME)
        if req.weights == "imagenet":
            fetch(IMAGENET_URL, local)
        elif req.weights.startswith("s3://") and "/" in req.weights[len("s3://") :]:
            bucket, key = req.weights[len("s3://") :].split("/", 1)
            try:
                s3.download_file(bucket, key, local)
            except Exception as exc:
                raise ArtifactsError(f"could not read ModelWeights {req.weights}: {exc}") from None
        else:
            raise ArtifactsError(f"ModelWeights must be imagenet or s3://bucket/key, got {req.weights!r}")
        digest = check_weights(local, req.weights, req.weights_sha256)
        key = f"{req.prefix}model/{digest[:VERSION_LEN]}/{WEIGHTS_NAME}"
        if not _exists(s3, req.bucket, key):
            s3.upload_file(local, req.bucket, key)
    return key


def check_weights(path: str, source: str, expected_sha256: str) -> str:
    """An HDF5 file with the expected SHA-256 when one is given. Its arrays are checked against MobileNetV2's
    shapes by the job itself before any image is featurized (emr_job/network.py read_weights)."""
    with open(path, "rb") as fh:
        head = fh.read(len(HDF5_SIGNATURE))
    if head != HDF5_SIGNATURE:
        raise ArtifactsError(f"ModelWeights {source} is not an HDF5 (Keras .h5) file")
    digest = sha256_file(path)
    if expected_sha256 and digest != expected_sha256.lower():
        raise ArtifactsError(f"ModelWeights {source} has SHA-256 {digest}, not ModelWeightsSha256 {expected_sha256}")
    return digest


def download(url: str, path: str, timeout: float = 60.0) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(path, "wb") as out:  # noqa: S310
            while chunk := response.read(1 << 20):
                out.write(chunk)
    except OSError as exc:
        raise ArtifactsError(
            f"could not download the ImageNet weights from {url} ({exc}); give ModelWeights=s3://bucket/key of a "
            "MobileNetV2 weights file instead (docs/DEPLOY.md)"
        ) from None


# --- versions ------------------------------------------------------------------------------------------------
def versions(s3, bucket: str, folder: str) -> list:
    """(when it last became current, version folder) under `folder`, oldest first."""
    deployed = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder, Delimiter="/"):
        for common in page.get("CommonPrefixes", []):
            sub = common["Prefix"]
            try:  # the marker holds the time (S3's LastModified has whole seconds only)
                at = float(s3.get_object(Bucket=bucket, Key=sub + MARKER)["Body"].read())
            except Exception:
                at = 0.0  # no marker: an upload that never completed
            deployed.append((at, sub))
    return sorted(deployed)


def make_current(s3, bucket: str, folder: str, current: str) -> None:
    """Mark the version current now, unless it already is (a deployment that changed nothing keeps the time its
    predecessor was superseded; a rollback to an older version makes it current again)."""
    marked = [sub for at, sub in versions(s3, bucket, folder) if at > 0]
    if not marked or marked[-1] != current:
        s3.put_object(Bucket=bucket, Key=current + MARKER, Body=repr(time.time()).encode())


def prune(s3, bucket: str, folder: str, current: str, keep_s: float, now: float) -> list:
    """Delete the version folders under `folder` that stopped being current more than keep_s ago. A version stops
    being current when the next one becomes current: its successor's marker time."""
    deployed = versions(s3, bucket, folder)
    removed = []
    for (_, sub), (successor_at, _) in zip(deployed, deployed[1:]):
        if sub != current and now - successor_at > keep_s:
            _delete_prefix(s3, bucket, sub)
            removed.append(sub)
    return removed


def _delete_prefix(s3, bucket: str, prefix: str) -> int:
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            count += len(keys)
    return count


def _delete_versions(s3, bucket: str, prefix: str) -> int:
    """Every object version and delete marker under prefix, for good (a versioned bucket keeps what DeleteObject
    removes as a noncurrent version). Raises ArtifactsError if S3 refuses some of them."""
    count = 0
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        versions = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                    for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]  # fmt: skip
        if versions:
            errors = s3.delete_objects(Bucket=bucket, Delete={"Objects": versions, "Quiet": True}).get("Errors", [])
            if errors:
                codes = ", ".join(sorted({e.get("Code", "?") for e in errors}))
                raise ArtifactsError(f"{len(errors)} versions under s3://{bucket}/{prefix} were not deleted ({codes})")
            count += len(versions)
    return count


def _exists(s3, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        s3.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
