"""Security scanners over the template, in make test: checkov, and parliament over every IAM statement."""

import json
import subprocess

import pytest

from tests.template.cfn import ENGINES, MODES, RESOURCES, ROOT, policies, stack_values

SCAN = ROOT / ".venv-scan" / "bin"


@pytest.fixture(scope="module")
def scanners():
    if not (SCAN / "checkov").exists():
        pytest.fail("scanners missing: `make test` installs them into .venv-scan (make scan-setup)")
    return SCAN


def test_checkov_finds_nothing_that_is_not_skipped_with_a_reason(scanners):
    cmd = [str(scanners / "checkov"), "-f", "template.yaml", "--framework", "cloudformation", "--skip-download",
           "--output", "json", "--quiet"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    report = json.loads(proc.stdout)
    failed = report["results"]["failed_checks"] if isinstance(report, dict) else report
    assert failed == [], [(f["check_id"], f["resource"]) for f in failed]
    assert report["summary"]["passed"] > 20
    # every skip carries its one-line justification, in the template beside the resource
    for name, resource in RESOURCES.items():
        for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", []):
            assert skip["id"].startswith("CKV_") and len(skip["comment"]) > 20, (name, skip)


VALUES = stack_values(
    "123456789012", "eu-west-3", "image-features-dev-123456789012-eu-west-3", "runs", "00fabc123",
    {"UploadQueue": "uploads", "UploadDeadLetterQueue": "uploads-dlq", "AlertTopic": "alerts",
     "EmrRuntimeRole": "emr-runtime", "EmrServiceRole": "emr-service", "EmrInstanceRole": "emr-instance",
     "JobStateDeadLetterQueue": "job-state-dlq"},
)  # fmt: skip
VALUES["ModelWeights"] = "s3://deployer-bucket/uploads/mobilenet_v2.weights.h5"  # WeightsFromS3: its statement too


@pytest.mark.parametrize("conditions", [{**e, **m} for e in ENGINES for m in MODES],
                         ids=["serverless-kms", "serverless-s3", "ec2-kms", "ec2-s3"])  # fmt: skip
def test_parliament_finds_nothing_in_any_policy(scanners, conditions):
    docs = {principal: {"Version": "2012-10-17", "Statement": statements}
            for principal, statements in policies(conditions, VALUES).items()}  # fmt: skip
    code = (
        "import json, sys\n"
        "from parliament import analyze_policy_string\n"
        "docs = json.load(sys.stdin)\n"
        "print(json.dumps({name: [[f.issue, str(f.detail)] for f in analyze_policy_string(json.dumps(doc)).findings]"
        " for name, doc in docs.items()}))\n"
    )
    proc = subprocess.run([str(scanners / "python"), "-c", code], input=json.dumps(docs), capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {name: [] for name in docs}


def test_parliament_is_not_blind(scanners):
    # A policy with a misspelled action and an action on the wrong kind of resource must be reported
    bad = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:GetObjekt", "Resource": "arn:aws:s3:::b/*"},
        {"Effect": "Allow", "Action": "dynamodb:GetItem", "Resource": "arn:aws:s3:::b/*"}]}  # fmt: skip
    code = (
        "import json,sys; from parliament import analyze_policy_string as a; print(len(a(sys.stdin.read()).findings))"
    )
    proc = subprocess.run([str(scanners / "python"), "-c", code], input=json.dumps(bad), capture_output=True, text=True)
    assert int(proc.stdout) >= 1, proc.stderr
