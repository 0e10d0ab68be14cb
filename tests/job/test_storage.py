"""Storage primitives the commit protocol relies on: deletes that report failure, local versions that see content."""

import os

import boto3
import pytest
from botocore.stub import Stubber

from emr_job import storage
from tests.job.images import encoded, make_tree, rgb, write
from tests.job.results import rows


def test_delete_files_raises_on_the_per_key_errors_of_delete_objects(monkeypatch):
    # Given S3 answering DeleteObjects with 200 but refusing one key (a bucket policy or object lock, say)
    client = boto3.client("s3", region_name="eu-west-3", aws_access_key_id="x", aws_secret_access_key="x")
    stub = Stubber(client)
    refused = {"Key": "results/b", "Code": "AccessDenied", "Message": "no"}
    stub.add_response("delete_objects", {"Deleted": [{"Key": "results/a"}], "Errors": [refused]})
    monkeypatch.setattr(storage, "s3_client", lambda: client)

    # When both are deleted, then the run hears of it, with the count and the code but not the key
    with stub, pytest.raises(storage.DeleteError, match=r"^1 of 2 objects were not deleted \(AccessDenied\)$"):
        storage.delete_files(["s3://bucket/results/a", "s3://bucket/results/b"])


@pytest.mark.parametrize("how", ["replaced", "rewritten in place"])
def test_new_content_with_the_same_size_and_a_restored_mtime_is_featurized_again(tmp_path, how):
    from emr_job.job import JobConfig, run

    # Given published features of a BMP (same size for any content of the same dimensions)
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(str(src), labels=("x",), per_label=2)
    path = write(str(src / "x" / "photo.bmp"), encoded(rgb(1), "BMP"))
    cfg = JobConfig(input=str(src), output=str(out), k=1)
    run(cfg, log=lambda _: None)
    before, st = rows(out, "features")[path], os.stat(path)

    # When other bytes of the same size take its place, and its mtime is restored (`cp -p`, `rsync -t`, `tar x`):
    # a new file renamed over it (a new inode), or a write into it (the same inode; its ctime moves, and no call
    # can set a ctime back)
    other = encoded(rgb(2), "BMP")
    assert len(other) == st.st_size
    if how == "replaced":
        os.replace(write(str(tmp_path / "other.bmp"), other), path)
    else:
        with open(path, "r+b") as fh:
            fh.write(other)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    rpt = run(cfg, log=lambda _: None)

    # Then the run sees a new version and featurizes the new content
    after = rows(out, "features")[path]
    assert rpt["images_featurized"] == 1 and after["version"] != before["version"]
    assert after["features"] != before["features"]
