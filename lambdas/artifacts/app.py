"""JobArtifacts custom resource: on Create and Update, put the job, its runtime and the weights in place under
artifacts/ (content-keyed folders) and return their URIs; on Delete, remove them. crhelper sends the one
response CloudFormation waits for, also on error and before the function times out."""

from __future__ import annotations

import boto3
from crhelper import CfnResource

from artifacts.publish import Request, publish, remove

helper = CfnResource(log_level="INFO", sleep_on_delete=0)  # INFO: DEBUG would log the presigned ResponseURL
S3 = boto3.client("s3")


def _request(event: dict) -> Request:
    props = event["ResourceProperties"]
    return Request(
        bucket=props["Bucket"],
        prefix=props.get("Prefix", "artifacts/"),
        source_dir=props["Source"],  # the JobRuntime layer's folder, mounted under /opt
        weights=props["ModelWeights"],
        weights_sha256=props.get("ModelWeightsSha256", ""),
        # a run is stopped at JobTimeoutMinutes; 15 more for its start and its last writes
        keep_superseded_s=(float(props.get("KeepSupersededMinutes", 180)) + 15) * 60,
    )


# A fixed physical id: an Update replaces the versions in place, so CloudFormation never sends a Delete that would
# take away files a running job still reads; superseded versions are pruned later (artifacts.publish.prune).
@helper.create
@helper.update
def put_in_place(event, context):
    req = _request(event)
    helper.Data.update(publish(S3, req))
    return f"s3://{req.bucket}/{req.prefix}"


@helper.delete
def take_away(event, context):
    remove(S3, _request(event))


def lambda_handler(event, context):
    helper(event, context)
