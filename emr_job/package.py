"""Package and publish what EMR runs.

python -m emr_job.package build [DIST]            emr_job.zip (--py-files), main.py, bootstrap.sh, pins
python -m emr_job.package fetch-imagenet FILE     ImageNet weights, once, on a machine with internet
python -m emr_job.package check --weights FILE --engine E --image URI
                                                  refuse to deploy a stack whose first run would fail
python -m emr_job.package overrides --config-env ENV [--image URI]
                                                  samconfig.toml's parameter overrides, plus the image
python -m emr_job.package upload --config-env ENV --weights FILE [DIST]
                                                  copy the artifacts to the stack's artifacts/ prefix
python -m emr_job.package image --config-env ENV --tag TAG [--dry-run]
                                                  the EMR Serverless job image: ECR repository (made once,
                                                  EMR Serverless allowed to pull), docker build for the
                                                  application's architecture, push; prints the image URI
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent
# dist file -> key under the stack's artifacts/ prefix (lambdas/pipeline/settings.py builds the same URIs).
ARTIFACTS = {
    "emr_job.zip": "job/emr_job.zip",
    "main.py": "job/main.py",
    "bootstrap.sh": "job/bootstrap.sh",
    "requirements.txt": "job/requirements.txt",
    "constraints.txt": "job/constraints.txt",
}
WEIGHTS_KEY = "model/mobilenet_v2.weights.h5"
REPOSITORY = "image-features"
PLATFORMS = {"X86_64": "linux/amd64", "ARM64": "linux/arm64"}  # EMR Serverless Architecture -> docker --platform


class DeployError(RuntimeError):
    """A piece the stack needs is missing; said before anything is deployed."""


def build(dest: str = "dist") -> list:
    os.makedirs(dest, exist_ok=True)
    archive = os.path.join(dest, "emr_job.zip")
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(PACKAGE.rglob("*.py")):
            if "__pycache__" not in path.parts:
                # Fixed timestamps: the same sources give the same archive (and the same S3 ETag).
                info = zipfile.ZipInfo(str(path.relative_to(ROOT)), date_time=(2020, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, path.read_bytes())
    for name, source in [
        ("main.py", PACKAGE / "main.py"),
        ("bootstrap.sh", PACKAGE / "bootstrap.sh"),
        ("requirements.txt", PACKAGE / "requirements.txt"),
        ("constraints.txt", ROOT / "constraints.txt"),
    ]:
        shutil.copyfile(source, os.path.join(dest, name))
    return [os.path.join(dest, name) for name in ARTIFACTS]


def fetch_imagenet(path: str) -> str:
    from emr_job.model import Weights, build_network, load_arrays

    arrays = load_arrays(Weights("imagenet", None, "imagenet", "imagenet"))
    net = build_network()
    net.set_weights(arrays)
    net.save_weights(path)
    return path


def check(weights: str, engine: str, image: str) -> None:
    """Everything a first run needs, verified before the stack changes."""
    from emr_job.model import WeightsError, load_arrays, resolve_weights

    if not weights or not os.path.isfile(weights):
        raise DeployError(
            f"no model weights file at {weights!r}: run `make weights` once on a machine with internet "
            "(it saves the ImageNet weights), or pass WEIGHTS_FILE=path/to/mobilenet_v2.weights.h5"
        )
    try:
        load_arrays(resolve_weights(weights, os.path.dirname(os.path.abspath(weights))))
    except WeightsError as exc:
        raise DeployError(str(exc)) from None
    if engine == "serverless" and not image:
        raise DeployError(
            "Engine=serverless needs the job image: build and push emr_job/Dockerfile, then pass "
            "IMAGE_URI=<account>.dkr.ecr.<region>.amazonaws.com/image-features:<tag> (README, Deploy)"
        )


def samconfig(config_env: str) -> dict:
    """stack_name, region and parameter_overrides of one samconfig.toml environment."""
    import tomllib  # Python 3.11+: this runs on the deploying machine, never on EMR

    with open(ROOT / "samconfig.toml", "rb") as fh:
        env = tomllib.load(fh)[config_env]
    deploy = env["deploy"]["parameters"]
    return {
        "stack_name": deploy["stack_name"],
        "region": env.get("global", {}).get("parameters", {}).get("region", "eu-west-3"),
        "parameter_overrides": deploy.get("parameter_overrides", ""),
    }


def overrides(config_env: str, image: str) -> str:
    merged = samconfig(config_env)["parameter_overrides"]
    return f"{merged} CustomImageUri={image}".strip() if image else merged


def upload(config_env: str, weights: str, dist: str = "dist") -> list:
    import boto3

    conf = samconfig(config_env)
    stack, region = conf["stack_name"], conf["region"]
    outputs = boto3.client("cloudformation", region_name=region).describe_stacks(StackName=stack)["Stacks"][0]
    artifacts = {o["OutputKey"]: o["OutputValue"] for o in outputs.get("Outputs", [])}["ArtifactsUri"]
    bucket, prefix = artifacts[len("s3://") :].split("/", 1)
    s3 = boto3.client("s3", region_name=region)
    done = []
    for name, key in [*ARTIFACTS.items(), (weights, WEIGHTS_KEY)]:
        source = name if name == weights else os.path.join(dist, name)
        s3.upload_file(source, bucket, prefix + key)
        done.append(f"s3://{bucket}/{prefix}{key}")
    return done


def application_architecture() -> str:
    """The EmrApplication's Architecture in template.yaml: the image must be built for it."""
    from cfnlint.decode import decode

    template, _ = decode(str(ROOT / "template.yaml"))
    return template["Resources"]["EmrApplication"]["Properties"]["Architecture"]


def pull_policy(region: str, account: str) -> dict:
    """EMR Serverless applications of this account may pull (EMR Serverless user guide, application-custom-image)."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "EmrServerlessCustomImageSupport",
                "Effect": "Allow",
                "Principal": {"Service": "emr-serverless.amazonaws.com"},
                "Action": ["ecr:BatchGetImage", "ecr:DescribeImages", "ecr:GetDownloadUrlForLayer"],
                "Condition": {
                    "StringEquals": {"aws:SourceAccount": account},
                    "ArnLike": {"aws:SourceArn": f"arn:aws:emr-serverless:{region}:{account}:/applications/*"},
                },
            }
        ],
    }


def image(config_env: str, tag: str, dry_run: bool = False, run=None) -> str:
    """Make (once) the ECR repository, build the job image for the application's architecture, push it."""
    import base64
    import subprocess

    import boto3

    region = samconfig(config_env)["region"]
    account = boto3.client("sts", region_name=region).get_caller_identity()["Account"]
    ecr = boto3.client("ecr", region_name=region)
    with contextlib.suppress(ecr.exceptions.RepositoryAlreadyExistsException):  # made by an earlier call
        ecr.create_repository(
            repositoryName=REPOSITORY,
            imageTagMutability="IMMUTABLE",  # an image a stack runs can never change under it
            imageScanningConfiguration={"scanOnPush": True},
        )
    ecr.set_repository_policy(repositoryName=REPOSITORY, policyText=json.dumps(pull_policy(region, account)))
    registry = f"{account}.dkr.ecr.{region}.amazonaws.com"
    uri = f"{registry}/{REPOSITORY}:{tag}"
    platform = PLATFORMS[application_architecture()]
    commands = [
        ["docker", "build", "--platform", platform, "-f", "emr_job/Dockerfile", "-t", uri, "."],
        ["docker", "push", uri],
    ]
    run = run or (lambda cmd, **kw: subprocess.run(cmd, check=True, cwd=ROOT, **kw))
    if dry_run:
        run = lambda cmd, **kw: print("$", " ".join(cmd))  # noqa: E731
    token = ecr.get_authorization_token()["authorizationData"][0]["authorizationToken"]
    password = base64.b64decode(token).decode().split(":", 1)[1]
    run(["docker", "login", "--username", "AWS", "--password-stdin", registry], input=password.encode())
    for command in commands:
        run(command)
    return uri


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build").add_argument("dist", nargs="?", default="dist")
    sub.add_parser("fetch-imagenet").add_argument("path")
    chk = sub.add_parser("check")
    chk.add_argument("--weights", required=True)
    chk.add_argument("--engine", default="serverless", choices=["serverless", "ec2"])
    chk.add_argument("--image", default="")
    ov = sub.add_parser("overrides")
    ov.add_argument("--config-env", default="default")
    ov.add_argument("--image", default="")
    up = sub.add_parser("upload")
    up.add_argument("--config-env", default="default")
    up.add_argument("--weights", required=True)
    up.add_argument("dist", nargs="?", default="dist")
    img = sub.add_parser("image")
    img.add_argument("--config-env", default="default")
    img.add_argument("--tag", required=True)
    img.add_argument("--dry-run", action="store_true", help="print the docker commands instead of running them")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            print("\n".join(build(args.dist)))
        elif args.command == "fetch-imagenet":
            print(f"saved ImageNet weights to {fetch_imagenet(args.path)}")
        elif args.command == "check":
            check(args.weights, args.engine, args.image)
            print("deploy check passed: weights load into MobileNetV2; engine has what it needs")
        elif args.command == "overrides":
            print(overrides(args.config_env, args.image))
        elif args.command == "image":
            print(f"IMAGE_URI={image(args.config_env, args.tag, args.dry_run)}")
        else:
            print("\n".join(upload(args.config_env, args.weights, args.dist)))
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
