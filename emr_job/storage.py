"""Where images come from and results go: local folders and s3:// alike."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlparse

from emr_job.images import is_image_name


@dataclass(frozen=True)
class Image:
    path: str  # local path or s3:// URI; the key of every output row
    label: Optional[str]  # the folder directly under the input root; None for a file outside any folder
    version: Optional[str]  # ETag or size:mtime; None when unknown until fetched (manifest entries)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://") or uri.startswith("s3a://")


def split_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


_S3 = None


def s3_client():
    """One client per process; AWS_ENDPOINT_URL (boto3's own setting) points it at a moto server in tests."""
    global _S3
    if _S3 is None:
        import boto3
        from botocore.config import Config

        _S3 = boto3.client("s3", config=Config(max_pool_connections=32, retries={"mode": "adaptive"}))
    return _S3


def label_of(root: str, path: str) -> Optional[str]:
    """`<root>/<label>/.../<file>` -> label; None when the file sits directly under root."""
    rel = path[len(root.rstrip("/")) + 1 :]
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 else None


def list_images(root: str) -> tuple[list[Image], int]:
    """Every image file under root (by extension, any case) and the number of other files ignored."""
    if is_s3(root):
        return _list_s3(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"input folder not found: {root}")
    images, ignored = [], 0
    root = os.path.abspath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if not is_image_name(name):
                ignored += 1
                continue
            st = os.stat(path)
            images.append(Image(path, label_of(root, path), f"{st.st_size}:{st.st_mtime_ns}"))
    return images, ignored


def _list_s3(root: str) -> tuple[list[Image], int]:
    bucket, prefix = split_s3_uri(root)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    images, ignored = [], 0
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.endswith("/") or not is_image_name(key):
                ignored += 1
                continue
            uri = f"s3://{bucket}/{key}"
            images.append(Image(uri, label_of(f"s3://{bucket}/{prefix}", uri), obj["ETag"].strip('"')))
    return images, ignored


def read_bytes(path: str) -> tuple[bytes, Optional[str]]:
    """Executor side: the object's bytes and, for S3, its ETag. Raises FileNotFoundError if gone."""
    if is_s3(path):
        bucket, key = split_s3_uri(path)
        client = s3_client()
        try:
            obj = client.get_object(Bucket=bucket, Key=key)
        except client.exceptions.NoSuchKey:
            raise FileNotFoundError(path) from None
        return obj["Body"].read(), obj["ETag"].strip('"')
    with open(path, "rb") as fh:
        return fh.read(), None


def read_text(uri: str) -> str:
    if is_s3(uri):
        bucket, key = split_s3_uri(uri)
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")
    with open(uri, encoding="utf-8") as fh:
        return fh.read()


@dataclass(frozen=True)
class Manifest:
    run_id: str
    added: list
    removed: list


def read_manifest(uri: str) -> Manifest:
    """The run manifest of DESIGN.md: {"run_id", "added": [uris], "removed": [uris]}."""
    try:
        doc = json.loads(read_text(uri))
    except json.JSONDecodeError as exc:
        raise ValueError(f"manifest {uri} is not JSON: {exc}") from None
    for field in ("added", "removed"):
        value = doc.get(field, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"manifest {uri}: field '{field}' must be a list of URIs")
    return Manifest(str(doc.get("run_id", "")), list(doc.get("added", [])), list(doc.get("removed", [])))


class Output:
    """The output folder through Hadoop's FileSystem API: one code path for local, s3:// (EMRFS) and s3a://."""

    def __init__(self, spark, root: str):
        self.root = root.rstrip("/")
        jvm = spark._jvm
        self._Path = jvm.org.apache.hadoop.fs.Path
        self._fs = self._Path(self.root).getFileSystem(spark._jsc.hadoopConfiguration())

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, path: str) -> bool:
        return self._fs.exists(self._Path(path))

    def delete(self, path: str) -> None:
        self._fs.delete(self._Path(path), True)

    def rename(self, src: str, dst: str) -> None:
        self._fs.mkdirs(self._Path(dst).getParent())
        if not self._fs.rename(self._Path(src), self._Path(dst)):
            raise OSError(f"could not move {src} to {dst}")

    def list_files(self, path: str, suffix: str) -> list:
        """Data files in a folder Spark wrote, as URIs the executors can open (file:/... or s3://...)."""
        found = [str(status.getPath().toString()) for status in self._fs.listStatus(self._Path(path))]
        return sorted(f for f in found if f.endswith(suffix))

    def write_bytes(self, path: str, data: bytes) -> None:
        stream = self._fs.create(self._Path(path), True)
        try:
            stream.write(bytearray(data))
        finally:
            stream.close()
