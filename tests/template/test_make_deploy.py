"""`make deploy`: a thin wrapper around `sam build && sam deploy` whose parameter overrides reach SAM intact,
spaces and quotes included (SAM's own parser reads them, as it would on a real deploy)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAM_PYTHON = ROOT / ".venv-sam" / "bin" / "python"


def fake_sam(tmp_path: Path) -> Path:
    """Records each call's arguments instead of calling AWS."""
    log = tmp_path / "calls.jsonl"
    script = tmp_path / "sam"
    script.write_text(f"#!{sys.executable}\nimport json, sys\n"
                      f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")  # fmt: skip
    script.chmod(0o755)
    return script


def make_deploy(tmp_path: Path, *variables: str) -> list:
    sam = fake_sam(tmp_path)  # stands in for image-features too: its preflight would call AWS
    command = ["make", "--no-print-directory", "deploy", f"SAM={sam}", f"IMAGE_FEATURES={sam}", *variables]
    proc = subprocess.run(command, cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "MAKEFLAGS": ""})  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]


def as_sam_reads(overrides: str) -> dict:
    """The overrides through SAM CLI's own --parameter-overrides type."""
    code = ("import json, sys; from samcli.cli.types import CfnParameterOverridesType as T; "
            "print(json.dumps(T().convert((sys.argv[1],), None, None)))")  # fmt: skip
    proc = subprocess.run([str(SAM_PYTHON), "-c", code, overrides], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def test_make_deploy_is_validate_build_deploy_and_keeps_values_with_spaces(tmp_path):
    # When make deploy runs with an environment whose overrides hold spaces, plus overrides of the user's
    calls = make_deploy(tmp_path, "STACK_ENV=dev", "OVERRIDES=MaxDisk='500 GB' AlertEmail=ops@example.org")

    # Then it runs the preflight of that environment and overrides, checks the template, builds, and deploys
    assert [c[0] for c in calls] == ["preflight", "validate", "build", "deploy"]
    assert calls[0][:5] == ["preflight", "--config-env", "dev", "--sam", str(tmp_path / "sam")]
    assert as_sam_reads(calls[0][calls[0].index("--parameter-overrides") + 1])["MaxDisk"] == "500 GB"
    assert calls[1] == ["validate", "--lint"]
    deploy = calls[3]
    assert deploy[:3] == ["deploy", "--config-env", "dev"]
    # And SAM reads every value whole: the environment's and the user's, the user's added, not replacing
    overrides = as_sam_reads(deploy[deploy.index("--parameter-overrides") + 1])
    assert overrides["MaxVcpu"] == "16 vCPU" and overrides["MaxMemory"] == "64 GB"
    assert overrides["MaxDisk"] == "500 GB" and overrides["AlertEmail"] == "ops@example.org"
    assert overrides["Stage"] == "dev"


def test_without_overrides_sam_reads_samconfig_itself(tmp_path):
    calls = make_deploy(tmp_path, "STACK_ENV=dev")
    assert calls[3] == ["deploy", "--config-env", "dev"]
    # ... whose quoted values SAM's parser keeps whole (without the quotes, '16 vCPU' would arrive as '16')
    code = "import sys; sys.path.insert(0, 'emr_job'); import package; print(package.overrides('dev'))"
    text = subprocess.run([str(SAM_PYTHON), "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert as_sam_reads(text.stdout.strip())["MaxVcpu"] == "16 vCPU"
    assert as_sam_reads("MaxVcpu=16 vCPU")["MaxVcpu"] == "16"  # what an unquoted value would become
