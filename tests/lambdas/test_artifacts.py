"""The JobArtifacts custom resource: what it puts in place, what it refuses, how it keeps a running job's
version, and the one response CloudFormation waits for, sent on success, on error and before a timeout."""

import hashlib
import json
import threading
import time

import boto3
import pytest
from moto import mock_aws

from tests.lambdas.conftest import load

REGION = "eu-west-3"
BUCKET = "image-features-dev-1"
HDF5 = b"\x89HDF\r\n\x1a\n" + b"\0" * 200  # the signature every Keras .h5 file starts with


@pytest.fixture
def web(tmp_path, monkeypatch):
    """One loopback HTTPS server: GET serves `files`, PUT records CloudFormation responses."""
    from tests.tls import ResponseServer

    server = ResponseServer(tmp_path / "tls")
    monkeypatch.setenv("SSL_CERT_FILE", server.cert)
    yield server
    server.stop()


@pytest.fixture
def s3():
    with mock_aws():
        client = boto3.client("s3", region_name=REGION)
        client.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        yield client


def layer(tmp_path, main: bytes = b"print('job')\n"):
    """The JobRuntime layer's job/ folder as emr_job/package.py makes it."""
    job = tmp_path / "job"
    job.mkdir(parents=True, exist_ok=True)
    files = {"main.py": main, "emr_job.zip": b"PK zip", "runtime-arm64.tar.gz": b"\x1f\x8b runtime"}
    for name, body in files.items():
        (job / name).write_bytes(body)
    manifest = {"files": {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}, "architecture": "ARM64"}
    (job / "manifest.json").write_text(json.dumps(manifest))
    return str(job)


def request(source_dir, weights="s3://deployer/w.h5", sha="", keep_s=3600.0):
    from artifacts.publish import Request

    return Request(BUCKET, "artifacts/", source_dir, weights, sha, keep_s)


def keys(s3, prefix="artifacts/") -> set:
    return {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])}


def deployer_weights(s3, body=HDF5):
    s3.create_bucket(Bucket="deployer", CreateBucketConfiguration={"LocationConstraint": REGION})
    s3.put_object(Bucket="deployer", Key="w.h5", Body=body)


def test_create_puts_the_job_runtime_and_weights_in_content_keyed_folders(s3, tmp_path):
    from artifacts.publish import publish

    # Given a built layer and weights the deployer uploaded
    deployer_weights(s3)
    # When CloudFormation creates the resource
    data = publish(s3, request(layer(tmp_path)))
    # Then every file is where the returned URIs say, keyed by content, and the weights by their SHA-256
    job_version, weights_version = data["Version"].split("-")
    assert data["JobEntryUri"] == f"s3://{BUCKET}/artifacts/job/{job_version}/main.py"
    assert data["RuntimeArchiveUri"].endswith(f"/job/{job_version}/runtime-arm64.tar.gz")
    assert weights_version == hashlib.sha256(HDF5).hexdigest()[:16]
    assert data["WeightsUri"] == f"s3://{BUCKET}/artifacts/model/{weights_version}/mobilenet_v2.weights.h5"
    assert s3.get_object(Bucket=BUCKET, Key=data["WeightsUri"].split("/", 3)[3])["Body"].read() == HDF5
    assert len(keys(s3, f"artifacts/job/{job_version}/")) == 4  # three files and the deployed marker


def test_imagenet_weights_are_fetched_once_at_deploy_time_and_checked(s3, tmp_path, web, monkeypatch):
    from artifacts import publish as pub

    # Given the Keras URL (served here) and the SHA-256 the deployer pinned
    web.files["/keras/weights.h5"] = HDF5
    monkeypatch.setattr(pub, "IMAGENET_URL", web.url + "/keras/weights.h5")
    digest = hashlib.sha256(HDF5).hexdigest()
    # When the stack is created with ModelWeights=imagenet
    data = pub.publish(s3, request(layer(tmp_path), weights="imagenet", sha=digest))
    # Then the file is in the bucket; and a later deployment with the same pin does not download again
    assert data["WeightsUri"].endswith(f"/model/{digest[:16]}/mobilenet_v2.weights.h5")
    web.files.clear()
    assert pub.publish(s3, request(layer(tmp_path), weights="imagenet", sha=digest))["WeightsUri"] == data["WeightsUri"]


@pytest.mark.parametrize(
    "body, sha, message",
    [
        (b"<html>not found</html>", "", "is not an HDF5"),
        (HDF5, "0" * 64, "has SHA-256"),
    ],
)
def test_wrong_weights_fail_the_deployment_with_the_reason(s3, tmp_path, body, sha, message):
    from artifacts.publish import ArtifactsError, publish

    deployer_weights(s3, body)
    with pytest.raises(ArtifactsError, match=message):
        publish(s3, request(layer(tmp_path), sha=sha))
    assert not keys(s3, "artifacts/model/")


def test_missing_weights_and_unreachable_keras_name_what_to_do(s3, tmp_path, web, monkeypatch):
    from artifacts import publish as pub

    with pytest.raises(pub.ArtifactsError, match="could not read ModelWeights s3://deployer/w.h5"):
        pub.publish(s3, request(layer(tmp_path)))
    monkeypatch.setattr(pub, "IMAGENET_URL", web.url + "/gone.h5")
    with pytest.raises(pub.ArtifactsError, match="give ModelWeights=s3://bucket/key"):
        pub.publish(s3, request(layer(tmp_path), weights="imagenet"))


def test_a_layer_that_does_not_match_its_manifest_is_refused(s3, tmp_path):
    from artifacts.publish import ArtifactsError, publish

    deployer_weights(s3)
    source = layer(tmp_path)
    (tmp_path / "job" / "main.py").write_bytes(b"tampered")
    with pytest.raises(ArtifactsError, match="main.py does not match its manifest"):
        publish(s3, request(source))


def test_a_superseded_version_stays_while_a_run_may_read_it_then_goes(s3, tmp_path):
    from artifacts.publish import publish

    # Given version A deployed, then B (an update with a changed job)
    deployer_weights(s3)
    a = publish(s3, request(layer(tmp_path / "a", b"A")))
    b = publish(s3, request(layer(tmp_path / "b", b"B"), keep_s=3600))
    a_folder = a["JobEntryUri"].split("/", 3)[3].rsplit("/", 1)[0] + "/"
    # Then A stays: a run started on it may still read its runtime
    assert keys(s3, a_folder)
    # When a deployment (of B again: nothing changed) happens after the longest run has passed since B replaced A
    publish(s3, request(layer(tmp_path / "b", b"B"), keep_s=3600), now=time.time() + 3700)
    # Then A is gone and B, the current version, stays
    assert not keys(s3, a_folder)
    assert keys(s3, b["JobEntryUri"].split("/", 3)[3].rsplit("/", 1)[0] + "/")


def test_delete_removes_every_artifact(s3, tmp_path):
    from artifacts.publish import publish, remove

    deployer_weights(s3)
    publish(s3, request(layer(tmp_path)))
    remove(s3, request(layer(tmp_path)))
    assert keys(s3) == set()


# --- the handler, as CloudFormation invokes it -------------------------------------------------------------
def cfn_event(web, request_type, props, request_id, source):
    return {
        "RequestType": request_type, "ServiceToken": "arn:aws:lambda:eu-west-3:123456789012:function:artifacts",
        "ResponseURL": f"{web.url}/{request_id}", "StackId": "arn:aws:cloudformation:eu-west-3:123456789012:stack/s/1",
        "RequestId": request_id, "ResourceType": "Custom::JobArtifacts", "LogicalResourceId": "JobArtifacts",
        "ResourceProperties": {"ServiceToken": "x", "Bucket": BUCKET, "Prefix": "artifacts/", "Source": source,
                               **props},
    }  # fmt: skip


class Context:
    def __init__(self, seconds: float):
        self.deadline = time.time() + seconds
        self.log_stream_name, self.function_name, self.aws_request_id = "stream", "artifacts", "req"
        self.invoked_function_arn = "arn:aws:lambda:eu-west-3:123456789012:function:artifacts"

    def get_remaining_time_in_millis(self):
        return int((self.deadline - time.time()) * 1000)


@pytest.fixture
def handler(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SAM_LOCAL", "true")  # crhelper: no CloudWatch Events polling rule
    module = load("artifacts.app")
    module.source = layer(tmp_path)  # the layer's job/ folder (/opt/job in Lambda)
    return module


def test_every_request_gets_its_one_response_even_on_error(handler, s3, web):
    deployer_weights(s3)

    def cloudformation(request_type: str, weights: str, request_id: str) -> dict:
        event = cfn_event(web, request_type, {"ModelWeights": weights}, request_id, handler.source)
        handler.lambda_handler(event, Context(60))
        return web.responses[f"/{request_id}"]

    # Create: SUCCESS with the URIs as attributes for !GetAtt
    created = cloudformation("Create", "s3://deployer/w.h5", "c")
    assert created["Status"] == "SUCCESS" and created["PhysicalResourceId"] == f"s3://{BUCKET}/artifacts/"
    from artifacts.publish import ATTRIBUTES

    assert set(created["Data"]) == set(ATTRIBUTES)
    # An update to weights that are not there: FAILED with the reason
    failed = cloudformation("Update", "s3://deployer/none.h5", "u")
    assert failed["Status"] == "FAILED" and "could not read ModelWeights s3://deployer/none.h5" in failed["Reason"]
    # Delete: SUCCESS, and the artifacts are gone
    assert cloudformation("Delete", "s3://deployer/w.h5", "d")["Status"] == "SUCCESS" and keys(s3) == set()


def versions(s3) -> list:
    """Every object version and delete marker in the bucket."""
    found = []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=BUCKET):
        found += [(v["Key"], v["VersionId"]) for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
    return found


def test_a_failed_first_create_rolls_back_to_a_bucket_cloudformation_can_delete(handler, s3, web):
    # Given the stack's new bucket, versioned as template.yaml makes it
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})

    # When the first create fails at the weights (after the job and its runtime are uploaded), and CloudFormation's
    # rollback sends the Delete with the physical id the failed response gave
    create = cfn_event(web, "Create", {"ModelWeights": "s3://deployer/none.h5"}, "c", handler.source)
    handler.lambda_handler(create, Context(60))
    failed = web.responses["/c"]
    assert failed["Status"] == "FAILED" and "could not read ModelWeights" in failed["Reason"]
    assert versions(s3), "the job and its runtime were uploaded before the weights failed"
    delete = {**cfn_event(web, "Delete", {"ModelWeights": "s3://deployer/none.h5"}, "d", handler.source),
              "PhysicalResourceId": failed["PhysicalResourceId"]}  # fmt: skip
    handler.lambda_handler(delete, Context(60))

    # Then CloudFormation hears SUCCESS, and the bucket holds no object version at all: it can delete it, and
    # running the same deploy again creates it anew
    assert web.responses["/d"]["Status"] == "SUCCESS"
    assert versions(s3) == []


def test_delete_removes_every_version_of_the_artifacts_and_touches_nothing_else(s3, tmp_path):
    from artifacts.publish import publish, remove

    # Given a versioned bucket with images and results, and artifacts deployed twice (an older version superseded)
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    deployer_weights(s3)
    others = {"images/Kiwi/1.jpg", "results/report.json", "artifactsX/not-ours"}
    for key in others:
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"x")
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"y")
    publish(s3, request(layer(tmp_path / "a", b"A"), keep_s=0))
    publish(s3, request(layer(tmp_path / "b", b"B"), keep_s=0))  # prunes the first: noncurrent versions left

    # When the stack is deleted
    remove(s3, request(layer(tmp_path / "b", b"B")))

    # Then no version of an artifact is left, and every version of everything else is
    assert {key for key, _ in versions(s3)} == others
    assert len(versions(s3)) == 2 * len(others)


def test_versions_s3_refuses_to_delete_fail_the_delete_with_the_reason(s3, tmp_path):
    from artifacts.publish import ArtifactsError, publish, remove

    # Given artifacts in place, and S3 answering DeleteObjects with per-key errors (a bucket policy, say)
    deployer_weights(s3)
    publish(s3, request(layer(tmp_path)))

    def refused(Bucket, Delete):  # noqa: N803  (boto3's names)
        return {"Errors": [{"Key": o["Key"], "Code": "AccessDenied"} for o in Delete["Objects"]]}

    # When the stack is deleted: the Delete fails, saying how many and why (CloudFormation shows it), never silently
    with pytest.MonkeyPatch.context() as faulty:
        faulty.setattr(s3, "delete_objects", refused)
        expected = r"\d+ versions under s3://.*/artifacts/job/ were not deleted \(AccessDenied\)"
        with pytest.raises(ArtifactsError, match=expected):
            remove(s3, request(layer(tmp_path)))
    assert keys(s3)  # nothing was taken away


def test_a_request_that_would_outlive_the_function_is_answered_before_it_times_out(handler, s3, web, monkeypatch):
    from artifacts import app

    deployer_weights(s3)
    monkeypatch.setattr(app, "publish", lambda *a, **k: time.sleep(3))  # S3 hanging
    handler_thread = threading.Thread(
        target=handler.lambda_handler,
        args=(cfn_event(web, "Create", {"ModelWeights": "s3://deployer/w.h5"}, "t", handler.source), Context(1.5)),
        daemon=True,
    )
    handler_thread.start()
    deadline = time.time() + 2.5
    while "/t" not in web.responses and time.time() < deadline:
        time.sleep(0.05)
    # CloudFormation hears FAILED before the function's time is up, instead of waiting an hour
    assert web.responses["/t"]["Status"] == "FAILED"
    handler_thread.join(timeout=10)  # (its late second answer goes to the server before it stops)
