"""Where images come from and results go: local folders and s3:// alike, through pyarrow and boto3.

The job never uses Hadoop's S3 connectors: the same code runs on EMR, locally, and against a moto server
(AWS_ENDPOINT_URL, boto3's own setting, points every client here at it)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import posixpath
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from emr_job.images import is_image_name

LISTING_SCHEMA = pa.schema(
    [("path", pa.string()), ("label", pa.string()), ("version", pa.string()), ("size", pa.int64())]
)


class ConflictError(RuntimeError):
    """A conditional write lost: someone else changed the object since it was read."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://") or uri.startswith("s3a://")


def split_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key), the key taken whole: S3 keys may hold '#', '?', '%' or spaces, which URL
    parsing would cut off or decode (an image then read as missing, and dropped)."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri.split("://", 1)[1].partition("/")
    return bucket, key


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def normalize(root: str) -> str:
    """Absolute local paths (executors may run elsewhere); s3a:// spelled s3://; no trailing slash."""
    if is_s3(root):
        return "s3://" + root.split("://", 1)[1].rstrip("/")
    return os.path.abspath(root)


_S3: dict = {}


def s3_client():
    """One client per process and endpoint, thread-safe; AWS_ENDPOINT_URL points it at a moto server in tests."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint not in _S3:
        import boto3
        from botocore.config import Config

        _S3[endpoint] = boto3.client("s3", config=Config(max_pool_connections=32, retries={"mode": "adaptive"}))
    return _S3[endpoint]


def io_properties() -> dict:
    """pyiceberg FileIO properties: the same endpoint and region boto3 uses."""
    props = {}
    if os.environ.get("AWS_ENDPOINT_URL"):
        props["s3.endpoint"] = os.environ["AWS_ENDPOINT_URL"]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:  # else pyarrow asks the bucket for its region: HeadBucket, which the job role may not do
        import boto3

        region = boto3.session.Session().region_name
    if region:
        props["s3.region"] = region
    return props


_FS: dict = {}


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a local path or an s3:// URI; one filesystem per process."""
    if not is_s3(uri):
        from pyarrow.fs import LocalFileSystem

        return _FS.setdefault("file", LocalFileSystem()), os.path.abspath(uri)
    props = io_properties()
    cache_key = ("s3", props.get("s3.endpoint"))
    if cache_key not in _FS:
        from pyarrow.fs import S3FileSystem

        _FS[cache_key] = S3FileSystem(endpoint_override=props.get("s3.endpoint"), region=props.get("s3.region"))
    bucket, key = split_s3_uri(uri)
    return _FS[cache_key], f"{bucket}/{key}"


def label_of(root: str, path: str) -> Optional[str]:
    """`<root>/<label>/.../<file>` -> label; None when the file sits directly under root."""
    rel = path[len(root.rstrip("/")) + 1 :]
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 else None


def list_images(root: str) -> tuple[pa.Table, int]:
    """Every image file under root (by extension, any case) as (path, label, version, size), and the count ignored.

    Versions are S3 ETags, or size:mtime:ctime:inode for local files: `cp -p`, `rsync -t` or `tar x` restore
    size and mtime, but a new content always gets a new ctime (or inode), which no user call can set. Arrow
    columns, not Python objects: a million images stay around 150 MB on the driver."""
    root = normalize(root)
    if is_s3(root):
        return _list_s3(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"input folder not found: {root}")
    paths, versions, sizes, ignored = [], [], [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if not is_image_name(name):
                ignored += 1
                continue
            try:
                st = os.stat(path)
                regular = stat.S_ISREG(st.st_mode)
                version, size = (local_version(st), st.st_size) if regular else ("special", 0)
            except FileNotFoundError:  # a symbolic link to nothing: listed, so that it is reported
                version, size = "dangling", 0
            paths.append(path)
            versions.append(version)
            sizes.append(size)
    return _listing(root, paths, versions, sizes), ignored


def local_version(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def _listing(root: str, paths: list, versions: list, sizes: list) -> pa.Table:
    return pa.table([paths, [label_of(root, p) for p in paths], versions, sizes], schema=LISTING_SCHEMA)


def _list_s3(root: str) -> tuple[pa.Table, int]:
    """Lists each top-level folder (label) in parallel: a million keys in 1,000 pages is minutes in series."""
    bucket, prefix = split_s3_uri(root + "/")
    client = s3_client()
    top = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
    folders, loose = [], []
    for page in top:
        folders += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        loose += page.get("Contents", [])

    def list_folder(folder: str) -> list:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder)
        return [(o["Key"], o["ETag"].strip('"'), o["Size"]) for page in pages for o in page.get("Contents", [])]

    with ThreadPoolExecutor(16) as pool:
        found = [(o["Key"], o["ETag"].strip('"'), o["Size"]) for o in loose]
        for chunk in pool.map(list_folder, folders):
            found += chunk
    paths, versions, sizes, ignored = [], [], [], 0
    for key, etag, size in found:
        if key.endswith("/") or not is_image_name(key):
            ignored += 1
            continue
        paths.append(f"s3://{bucket}/{key}")
        versions.append(etag)
        sizes.append(size)
    return _listing(root, paths, versions, sizes), ignored


def read_bytes(path: str) -> tuple[bytes, Optional[str]]:
    """The object's bytes and, for S3, its ETag. Raises FileNotFoundError if it is gone."""
    if is_s3(path):
        bucket, key = split_s3_uri(path)
        client = s3_client()
        try:
            obj = client.get_object(Bucket=bucket, Key=key)
        except client.exceptions.NoSuchKey:
            raise FileNotFoundError(path) from None
        return obj["Body"].read(), obj["ETag"].strip('"')
    _check_regular(path)
    with open(path, "rb") as fh:
        return fh.read(), None


class NotAFile(OSError):
    """An input path that is no regular file (a FIFO, socket, device, directory, or a link to nothing): reported
    as a failure, and never opened (reading a FIFO would block the run)."""


def _check_regular(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise NotAFile("a symbolic link to nothing") from None
        raise
    if not stat.S_ISREG(mode):
        kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                 (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))  # fmt: skip
        raise NotAFile(next((name for test, name in kinds if test(mode)), "not a regular file"))


def write_bytes(path: str, data: bytes, content_type: str = "application/octet-stream") -> None:
    if is_s3(path):
        bucket, key = split_s3_uri(path)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def copy(source: str, target: str) -> None:
    """One file to another place in the same store: server-side on S3 (CopyObject), nothing through this process."""
    if is_s3(source):
        bucket, key = split_s3_uri(source)
        to_bucket, to_key = split_s3_uri(target)
        s3_client().copy_object(CopySource={"Bucket": bucket, "Key": key}, Bucket=to_bucket, Key=to_key)
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{os.getpid()}.tmp"
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def read_versioned(path: str) -> tuple[Optional[bytes], Optional[str]]:
    """(content, version token for write_if) or (None, None) when absent."""
    if is_s3(path):
        try:
            data, etag = read_bytes(path)
        except FileNotFoundError:
            return None, None
        return data, etag
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None, None
    return data, hashlib.sha256(data).hexdigest()


def write_if(path: str, data: bytes, expected: Optional[str], content_type: str = "application/json") -> None:
    """Compare-and-swap: write only if the object is still at version `expected` (None: still absent).

    S3 conditional writes (If-Match / If-None-Match) on S3; a lock file and a content hash locally.
    Raises ConflictError when another writer got there first."""
    if is_s3(path):
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(path)
        condition = {"IfMatch": f'"{expected}"'} if expected else {"IfNoneMatch": "*"}
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type, **condition)
        except ClientError as exc:
            code = exc.response["Error"]["Code"]
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409"):
                raise ConflictError(f"{path} changed since this run read it ({code})") from None
            raise
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = read_versioned(path)[1]
        if current != expected:
            raise ConflictError(f"{path} changed since this run read it")
        write_bytes(path, data)


def list_prefix(root: str) -> list:
    """(uri, modified epoch seconds) of every file under a folder or S3 prefix."""
    if is_s3(root):
        bucket, prefix = split_s3_uri(root.rstrip("/") + "/")
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [
            (f"s3://{bucket}/{o['Key']}", o["LastModified"].timestamp()) for p in pages for o in p.get("Contents", [])
        ]
    found = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            found.append((path, os.stat(path).st_mtime))
    return found


class DeleteError(OSError):
    """Some objects could not be deleted (DeleteObjects answers 200 and lists per-key errors)."""


def delete_files(uris: list) -> None:
    """Delete files and objects (absent ones count as deleted). Raises DeleteError naming how many failed and
    why, never which keys: they may be image paths."""
    s3 = [u for u in uris if is_s3(u)]
    errors: list = []
    for start in range(0, len(s3), 1000):
        by_bucket: dict = {}
        for uri in s3[start : start + 1000]:
            bucket, key = split_s3_uri(uri)
            by_bucket.setdefault(bucket, []).append({"Key": key})
        for bucket, keys in by_bucket.items():
            answer = s3_client().delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            errors += answer.get("Errors", [])
    if errors:
        codes = sorted({e.get("Code", "?") for e in errors})
        raise DeleteError(f"{len(errors)} of {len(s3)} objects were not deleted ({', '.join(codes)})")
    for uri in uris:
        if not is_s3(uri):
            with contextlib.suppress(FileNotFoundError):
                os.remove(uri)


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))


def stem(uri: str) -> str:
    """A file's name without its extension: what names derived from a data file's are built on."""
    return basename(uri).rsplit(".", 1)[0]


def write_parquet(path: str, table: pa.Table) -> int:
    """Write a data file (local or s3://) and return its size. Used by executors and the driver alike."""
    fs, where = filesystem(path)
    if not is_s3(path):
        fs.create_dir(where.rsplit("/", 1)[0], recursive=True)
    # 16 MB row groups: Parquet buffers one whole group per writer, so memory stays flat in the row count.
    pq.write_table(table, where, filesystem=fs, compression="zstd", row_group_size=3000, write_statistics=True)
    return fs.get_file_info(where).size
