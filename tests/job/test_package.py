"""emr_job.package: what `sam build` puts in the JobRuntime layer (emr_job/Makefile), byte for byte reproducible
so that its content key changes only when the job does. The runtime archive itself is built by the session's
`sam build` and checked in tests/test_rollout.py."""

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from emr_job import package

ROOT = Path(__file__).resolve().parents[2]


def test_build_makes_the_archive_and_entry_file(tmp_path):
    built = package.build(str(tmp_path))
    assert [Path(p).name for p in built] == list(package.JOB_FILES)
    with zipfile.ZipFile(tmp_path / "emr_job.zip") as zf:
        names = zf.namelist()
    assert "emr_job/main.py" in names and "emr_job/featurize.py" in names
    assert not any("__pycache__" in n for n in names)
    assert (
        package.build(str(tmp_path / "again"))
        and (tmp_path / "again" / "emr_job.zip").read_bytes() == (tmp_path / "emr_job.zip").read_bytes()
    )  # reproducible: unchanged sources, unchanged content key


def test_the_layer_lists_each_file_with_its_sha256(tmp_path):
    # Given a runtime archive built before for the same requirements (building one takes a minute)
    runtime = tmp_path / "prebuilt.tar.gz"
    runtime.write_bytes(b"\x1f\x8b stand-in archive")
    # When the layer is made as emr_job/Makefile makes it, from a copy of emr_job/ run as a plain script
    copy = tmp_path / "src"
    import shutil

    shutil.copytree(ROOT / "emr_job", copy, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "layer" / "job"
    subprocess.run([sys.executable, str(copy / "package.py"), "layer", str(out), "--architecture", "ARM64",
                    "--runtime", str(runtime)], check=True, capture_output=True)  # fmt: skip
    # Then the manifest names every file with its SHA-256, which the custom resource checks before uploading
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["architecture"] == "ARM64"
    assert set(manifest["files"]) == {"emr_job.zip", "main.py", "runtime-arm64.tar.gz"}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    # ... and the job is the same bytes as one built from the repository
    assert (out / "emr_job.zip").read_bytes() == Path(package.build(str(tmp_path / "repo"))[0]).read_bytes()


def test_an_unknown_architecture_is_refused_before_anything_is_built(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "emr_job.package", "runtime", str(tmp_path), "--architecture",
                           "MIPS"], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "invalid choice: 'MIPS'" in proc.stderr


def test_overrides_are_the_environments_text_with_its_quotes():
    assert package.overrides("dev").endswith("MaxVcpu='16 vCPU' MaxMemory='64 GB'")
    assert package.overrides("local").startswith("Stage=local ")
