"""Every key S3 can hold is processed or reported: '#', '?', '%', '+', '&', spaces (trailing ones too), unicode
and keys over 512 bytes. A key is never parsed as a URL, so none is cut short, read as missing and dropped."""

import json
import os
import uuid

import boto3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emr_job import storage
from tests.job.images import encoded, rgb

# What URL parsing would misread, then letters of several scripts
SPECIAL = "#?%+&= ;:@!$'()*,~[]"
PART = st.text(alphabet=st.sampled_from(SPECIAL + "aZ09_-.éüß日本語ñ€"), min_size=1, max_size=12)
# Long names: multibyte letters make a key of 512 bytes and more (S3 allows 1,024)
LONG = st.text(alphabet=st.sampled_from("é日€"), min_size=180, max_size=300)


@st.composite
def keys(draw):
    count = draw(st.integers(1, 4))
    out = set()
    for i in range(count):
        label = draw(PART) + draw(st.sampled_from(["", " ", "  "]))  # a folder whose name ends with spaces
        name = draw(st.one_of(PART, LONG)) + f"-{i}"
        ext = draw(st.sampled_from([".jpg", ".JPEG", ".png"]))
        key = f"images/{label}/{name}{ext}"
        if len(key.encode()) <= 1024 and "//" not in key and not label.startswith("."):
            out.add(key)
    return sorted(out) or ["images/x#1/a?b.jpg"]


def test_split_s3_uri_takes_the_key_whole():
    for key in ("images/x#1/a?b=c.jpg", "images/50%25/a%20b.jpg", "images/a+b/ c .jpg", "images/é/日本.png"):
        assert storage.split_s3_uri(f"s3://photos/{key}") == ("photos", key)
    with pytest.raises(ValueError, match="not an s3:// URI"):
        storage.split_s3_uri("/tmp/images/a.jpg")


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys=keys(), broken=st.integers(0, 3))
def test_listed_images_are_featurized_or_failed_and_a_second_run_publishes_nothing(moto_server, weights_file,
                                                                                   keys, broken):  # fmt: skip
    from emr_job.job import JobConfig, run
    from tests.job.results import rows

    before = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = moto_server
    try:
        # Given a bucket whose image keys hold anything S3 allows, one of them unreadable
        s3 = boto3.client("s3", endpoint_url=moto_server)
        bucket = f"photos-{uuid.uuid4().hex[:12]}"
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
        for i, key in enumerate(keys):
            body = b"not an image" if i == broken else encoded(rgb(i), "PNG" if key.endswith(".png") else "JPEG")
            s3.put_object(Bucket=bucket, Key=key, Body=body)
        s3.upload_file(weights_file, bucket, "artifacts/w.weights.h5")
        cfg = JobConfig(input=f"s3://{bucket}/images/", output=f"s3://{bucket}/results/",
                        weights=f"s3://{bucket}/artifacts/w.weights.h5", k=1)  # fmt: skip

        # When the job runs, twice
        first = run(cfg, log=lambda *a: None, session=lambda: pytest.fail("small work needs no Spark"))
        second = run(cfg, log=lambda *a: None, session=lambda: pytest.fail("small work needs no Spark"))

        # Then every listed image is in the features or in the failures, under its own key, and nothing else
        listed = {f"s3://{bucket}/{k}" for k in keys}
        featurized = set(rows(f"s3://{bucket}/results", "features"))
        failed = set(rows(f"s3://{bucket}/results", "failures"))
        assert featurized | failed == listed and not featurized & failed
        assert (first["images_total"], first["images_failed"]) == (len(keys), int(broken < len(keys)))
        # ... and the second run finds nothing changed
        assert second["published"] is False
        report = json.loads(s3.get_object(Bucket=bucket, Key="results/report.json")["Body"].read())
        assert report["run_id"] == first["run_id"]
    finally:
        if before is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = before
