"""make package / make deploy helpers: what EMR runs, the checks before a deploy, the upload after it."""

import sys
import zipfile
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from emr_job import package

ROOT = Path(__file__).resolve().parents[2]


def test_build_makes_the_archive_and_entry_file(tmp_path):
    built = package.build(str(tmp_path))
    assert [Path(p).name for p in built] == list(package.ARTIFACTS)
    with zipfile.ZipFile(tmp_path / "emr_job.zip") as zf:
        names = zf.namelist()
    assert "emr_job/main.py" in names and "emr_job/featurize.py" in names
    assert not any("__pycache__" in n for n in names)
    assert (
        package.build(str(tmp_path / "again"))
        and (tmp_path / "again" / "emr_job.zip").read_bytes() == (tmp_path / "emr_job.zip").read_bytes()
    )  # reproducible: unchanged sources, unchanged S3 object


def test_deploy_check_refuses_what_would_fail_the_first_run(tmp_path, weights_file):
    with pytest.raises(package.DeployError, match="no model weights file"):
        package.check(str(tmp_path / "missing.h5"), "serverless", "img:1")
    not_weights = tmp_path / "notes.h5"
    not_weights.write_bytes(b"not an HDF5 file")
    with pytest.raises(package.DeployError, match="is not a weights file for MobileNetV2"):
        package.check(str(not_weights), "ec2", "")
    with pytest.raises(package.DeployError, match="needs the job image"):
        package.check(weights_file, "serverless", "")
    package.check(weights_file, "ec2", "")  # nothing raised: ready to deploy


def test_overrides_keep_samconfig_and_add_the_image():
    merged = package.overrides("dev", "123.dkr.ecr.eu-west-3.amazonaws.com/image-features:7")
    assert merged.startswith("Stage=dev ") and merged.endswith(
        " CustomImageUri=123.dkr.ecr.eu-west-3.amazonaws.com/image-features:7"
    )


def test_upload_puts_artifacts_where_the_launchers_look(tmp_path, weights_file, monkeypatch):
    sys.path.insert(0, str(ROOT / "lambdas"))
    from pipeline.settings import load

    package.build(str(tmp_path / "dist"))
    with mock_aws():
        s3 = boto3.client("s3", region_name="eu-west-3")
        s3.create_bucket(Bucket="image-features-dev-1", CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
        cfn = boto3.client("cloudformation", region_name="eu-west-3")
        cfn.create_stack(
            StackName="image-features-dev",
            TemplateBody='{"Resources": {"Q": {"Type": "AWS::SQS::Queue"}},'
            ' "Outputs": {"ArtifactsUri": {"Value": "s3://image-features-dev-1/artifacts/"}}}',
        )
        uploaded = package.upload("dev", weights_file, str(tmp_path / "dist"))

        s = load({"BUCKET": "image-features-dev-1", "TABLE_NAME": "t", "EMR_APPLICATION_ID": "a",
                  "EMR_RUNTIME_ROLE_ARN": "r", "QUIET_SECONDS": "0"})  # fmt: skip
        needed = {s.job_entry_uri, s.job_archive_uri, s.bootstrap_uri, *s.bootstrap_args, s.weights_uri}
        assert set(uploaded) == needed
        for uri in needed:
            s3.head_object(Bucket="image-features-dev-1", Key=uri.split("/", 3)[3])


def test_image_makes_a_repository_emr_serverless_may_pull_and_builds_for_the_applications_architecture():
    # Given an account with no repository yet
    commands = []
    with mock_aws():
        # When `make image` runs (docker itself is recorded, not run: there is no Docker engine here)
        uri = package.image("dev", "42", run=lambda cmd, **kw: commands.append(cmd))
        again = package.image("dev", "43", run=lambda cmd, **kw: None)  # the repository already exists: fine

        # Then the repository exists, immutable and scanned, and lets this account's EMR Serverless apps pull
        ecr = boto3.client("ecr", region_name="eu-west-3")
        [repo] = ecr.describe_repositories(repositoryNames=["image-features"])["repositories"]
        assert repo["imageTagMutability"] == "IMMUTABLE" and repo["imageScanningConfiguration"]["scanOnPush"]
        import json

        policy = json.loads(ecr.get_repository_policy(repositoryName="image-features")["policyText"])
    [statement] = policy["Statement"]
    assert statement["Principal"] == {"Service": "emr-serverless.amazonaws.com"}
    assert set(statement["Action"]) == {"ecr:BatchGetImage", "ecr:DescribeImages", "ecr:GetDownloadUrlForLayer"}
    assert statement["Condition"]["ArnLike"]["aws:SourceArn"].endswith(":/applications/*")
    assert uri == "123456789012.dkr.ecr.eu-west-3.amazonaws.com/image-features:42" and again.endswith(":43")
    # ... and the image is built for the architecture template.yaml gives the application, then pushed
    login, build, push = commands
    assert login[:2] == ["docker", "login"] and push == ["docker", "push", uri]
    platform = build[build.index("--platform") + 1]
    assert platform == package.PLATFORMS[package.application_architecture()] == "linux/amd64"
