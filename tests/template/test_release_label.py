"""EmrReleaseLabel offers only the EMR releases whose release guide lists Python 3.9 on Amazon Linux 2023: the job's
runtime is a virtual environment over the image's own Python 3.9 (emr_job/package.py), on both engines."""

import json
import subprocess
import sys
from pathlib import Path

from tests.template.cfn import ROOT, TEMPLATE

# Amazon EMR Release Guide, "Application versions in Amazon EMR 7.x releases": its Python row, per release.
APP_VERSIONS = "https://docs.aws.amazon.com/emr/latest/ReleaseGuide/emr-release-app-versions-7.x.html"
# The same table where it already had 7.11.0 and 7.12.0 (AWS's China-region copy of the guide, in English).
APP_VERSIONS_LATER = "https://docs.amazonaws.cn/en_us/emr/latest/ReleaseGuide/emr-release-app-versions-7.x.html"
# "Amazon EMR release 7.13.0": its application-versions table (7.13.0 back to 7.10.0), released 21 April 2026.
RELEASE_7130 = "https://docs.aws.amazon.com/emr/latest/ReleaseGuide/emr-7130-release.html"
# Amazon EMR Management Guide, "Using the default Amazon Linux AMI for Amazon EMR": AL2023 for EMR 7.x.
AL2023 = "https://docs.aws.amazon.com/emr/latest/ManagementGuide/emr-default-ami.html"

# release label -> (the Python versions its release guide lists, where it says so); every 7.x release is on AL2023.
DOCUMENTED = {
    "emr-7.0.0": ("3.9", APP_VERSIONS),
    "emr-7.1.0": ("3.9, 3.11", APP_VERSIONS),
    "emr-7.2.0": ("3.9, 3.11", APP_VERSIONS),
    "emr-7.3.0": ("3.9, 3.11", APP_VERSIONS),
    "emr-7.4.0": ("3.9, 3.11", APP_VERSIONS),
    "emr-7.5.0": ("3.9, 3.11", APP_VERSIONS),
    "emr-7.6.0": ("3.9, 3.11", APP_VERSIONS),
    "emr-7.7.0": ("3.9, 3.11", APP_VERSIONS),
    "emr-7.8.0": ("3.9, 3.11", APP_VERSIONS),
    "emr-7.9.0": ("3.9, 3.11", APP_VERSIONS),
    "emr-7.10.0": ("3.9, 3.11", APP_VERSIONS),
    "emr-7.11.0": ("3.9, 3.11", APP_VERSIONS_LATER),
    "emr-7.12.0": ("3.9, 3.11", APP_VERSIONS_LATER),
    "emr-7.13.0": ("3.9, 3.11", RELEASE_7130),
}
PARAMETER = TEMPLATE["Parameters"]["EmrReleaseLabel"]


def test_the_releases_offered_are_exactly_those_documented_with_python_3_9():
    assert "AllowedPattern" not in PARAMETER
    assert PARAMETER["AllowedValues"] == list(DOCUMENTED)


def test_the_default_release_is_documented_and_the_functions_default_is_the_same():
    from pipeline.settings import ENV_VARS

    assert PARAMETER["Default"] == "emr-7.10.0" and PARAMETER["Default"] in DOCUMENTED
    assert ENV_VARS["EMR_RELEASE_LABEL"] == PARAMETER["Default"]


def test_cfn_lint_refuses_a_default_the_guide_does_not_list(tmp_path):
    """The list is enforced, not decorative: the tools that pass template.yaml fail it with an undocumented release."""
    lint = str(Path(sys.executable).parent / "cfn-lint")
    clean = subprocess.run([lint, str(ROOT / "template.yaml")], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    parameters = {"Parameters": {"EmrReleaseLabel": {**PARAMETER, "Default": "emr-7.99.0"}}}
    resources = {"Resources": {"Topic": {"Type": "AWS::SNS::Topic",
                                         "Properties": {"TopicName": {"Ref": "EmrReleaseLabel"}}}}}  # fmt: skip
    template = tmp_path / "template.json"
    template.write_text(json.dumps({"AWSTemplateFormatVersion": "2010-09-09", **parameters, **resources}))
    proc = subprocess.run([lint, str(template)], capture_output=True, text=True)
    assert proc.returncode != 0 and "E2015" in proc.stdout, proc.stdout + proc.stderr  # Default within AllowedValues
