"""The digest of images/ that the job records in report.json is the one the daily pass computes from its own
listing (lambdas/pipeline/inputs.py): the two copies of one function, in two deployables, agree."""

import json

import boto3
import pytest
from pipeline.inputs import current_inputs
from pipeline.inputs import inputs_digest as lambda_digest

from emr_job.inputs import inputs_digest as job_digest
from emr_job.job import JobConfig, run
from tests.job.images import encoded, rgb

BUCKET = "photos"


def test_both_copies_give_the_same_digest_of_the_same_listing():
    listing = [
        ("images/Kiwi/0.jpg", '"9b2cf535f27731c974343645a3985328"', 1200),
        ("images/Zoë Dupont+copy 1.JPEG", '"e2fc714c4727ee9395f324cd2e7f331f-2"', 9000000),
        ("images/Kiwi/notes.txt", '"0cc175b9c0f1b6a831c399e269772661"', 5),
        ("images/Kiwi/", '"d41d8cd98f00b204e9800998ecf8427e"', 0),
        ("images/a\nb.png", '"92eb5ffee6ae2fec3ad71c777531578f"', 77),
    ]
    assert job_digest(listing) == lambda_digest(listing) == lambda_digest(reversed(listing))
    assert job_digest(listing)["images"] == 3 and job_digest(listing)["bytes"] == 9001277
    images_only = [listing[0], listing[1], listing[4]]
    assert lambda_digest(images_only) == lambda_digest(listing)  # a note and a folder marker count for nothing


@pytest.fixture
def bucket(moto_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    s3 = boto3.client("s3", endpoint_url=moto_server)
    s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
    return s3


def published(s3) -> dict:
    return json.loads(s3.get_object(Bucket=BUCKET, Key="results/report.json")["Body"].read())


def test_report_records_the_digest_the_daily_pass_computes_of_the_same_bucket(bucket):
    # Given images in labels (one named with a space, a '+' and an accent) and at the top level, and files the
    # job ignores
    images = ["images/Kiwi/0.jpg", "images/Kiwi/Zoë Dupont+copy 1.png", "images/Apple/0.JPG", "images/top.jpg"]
    for i, key in enumerate(images):
        bucket.put_object(Bucket=BUCKET, Key=key, Body=encoded(rgb(i), "PNG" if key.endswith("png") else "JPEG"))
    bucket.put_object(Bucket=BUCKET, Key="images/Kiwi/notes.txt", Body=b"not an image")
    bucket.put_object(Bucket=BUCKET, Key="images/Apple/", Body=b"")
    cfg = JobConfig(input=f"s3://{BUCKET}/images/", output=f"s3://{BUCKET}/results/", k=2)

    # When the job runs (small work: in the driver, without Spark)
    rpt = run(cfg, log=lambda *_: None)

    # Then report.json holds the digest of the listing it planned from: the daily pass's digest of the bucket
    daily = current_inputs(bucket, BUCKET, "images/")
    assert rpt["published"] and published(bucket)["inputs"] == daily
    assert daily["images"] == 4
    assert daily["bytes"] == sum(bucket.head_object(Bucket=BUCKET, Key=key)["ContentLength"] for key in images)

    # When an image changes and the job runs again, the report follows the bucket
    bucket.put_object(Bucket=BUCKET, Key="images/Kiwi/0.jpg", Body=encoded(rgb(9), "JPEG"))
    assert run(cfg, log=lambda *_: None)["published"]
    assert published(bucket)["inputs"] == current_inputs(bucket, BUCKET, "images/") != daily

    # When a report from an older job holds no digest, a run with nothing to do records it, publishing nothing else
    old = {k: v for k, v in published(bucket).items() if k != "inputs"}
    bucket.put_object(Bucket=BUCKET, Key="results/report.json", Body=json.dumps(old, indent=2).encode())
    again = run(cfg, log=lambda *_: None)
    assert again["published"] is False
    assert published(bucket) == {**old, "inputs": current_inputs(bucket, BUCKET, "images/")}
