"""Package what EMR runs. `sam build` calls `layer` (through emr_job/Makefile) in a copy of this folder, with
any Python 3.9+ that has pip: it needs neither Docker nor the project's virtual environment.

python -m emr_job.package layer DEST --architecture X86_64|ARM64 [--runtime ARCHIVE]
                                                  the JobRuntime layer: job/ with emr_job.zip, main.py, the
                                                  runtime archive and manifest.json (their SHA-256)
python -m emr_job.package build [DIST]            emr_job.zip (--py-files) and main.py only
python -m emr_job.package runtime DIST --architecture X86_64|ARM64
                                                  the runtime archive only
python -m emr_job.package fetch-imagenet FILE     ImageNet weights saved as a weights file (needs TensorFlow
                                                  and internet)
python -m emr_job.package overrides --config-env ENV
                                                  samconfig.toml's parameter overrides of ENV (make deploy)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent
# The job's files, as the launchers name them (lambdas/pipeline/launchers.py: --py-files and the entry point).
JOB_FILES = ("emr_job.zip", "main.py")
# EMR 7.x images run Amazon Linux 2023, whose system Python is 3.9 at this path (docs/DEPLOY.md, sources).
EMR_PYTHON = "/usr/bin/python3.9"
EMR_PYTHON_VERSION = "3.9"
# Application Architecture -> the manylinux platform tags pip may take wheels for (AL2023 has glibc 2.34).
WHEEL_PLATFORMS = {
    arch: [f"manylinux_2_{minor}_{machine}" for minor in (34, 28, 27, 26, 17)] + [f"manylinux2014_{machine}"]
    for arch, machine in (("X86_64", "x86_64"), ("ARM64", "aarch64"))
}
# Wheels without a cp39 build for every architecture: their pure-Python files are taken from this platform's wheel
# and their optional compiled accelerators left out (requirements.txt says why for each).
PURE_PYTHON_FROM_X86 = ("pyiceberg",)
# Test suites and headers inside the wheels: never imported by the job, and a large part of the archive.
PRUNED = ("*/tests", "onnx/backend/test", "pyarrow/include", "pyarrow/src", "*/__pycache__")


class DeployError(RuntimeError):
    """A piece the stack needs cannot be built; said before anything is deployed."""


def build(dest: str = "dist") -> list:
    """emr_job.zip (the package, for --py-files) and main.py (the entry point), byte for byte reproducible."""
    os.makedirs(dest, exist_ok=True)
    archive = os.path.join(dest, "emr_job.zip")
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(PACKAGE.rglob("*.py")):
            if "__pycache__" not in path.parts:
                # Fixed timestamps: the same sources give the same archive (and the same content key).
                name = "emr_job/" + path.relative_to(PACKAGE).as_posix()
                info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, path.read_bytes())
    shutil.copyfile(PACKAGE / "main.py", os.path.join(dest, "main.py"))
    return [os.path.join(dest, name) for name in JOB_FILES]


def layer(dest: str, architecture: str, pip: list | None = None, runtime: str | None = None) -> dict:
    """What the JobArtifacts custom resource copies to S3: the job, the runtime, and a manifest of their SHA-256.
    `runtime`: an archive built before for the same requirements.txt, reused instead of built again."""
    if runtime:
        os.makedirs(dest, exist_ok=True)
        target = os.path.join(dest, f"runtime-{architecture.lower()}.tar.gz")
        if os.path.abspath(runtime) != os.path.abspath(target):
            shutil.copyfile(runtime, target)
    else:
        target = build_runtime(dest, architecture, pip)
    files = [*build(dest), target]
    manifest = {"files": {os.path.basename(f): sha256_file(f) for f in files}, "architecture": architecture}
    with open(os.path.join(dest, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
    return manifest


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_runtime(dest: str, architecture: str, pip: list | None = None) -> str:
    """The job's Python runtime for EMR, built without Docker: requirements.txt's wheels for cp39 on the
    architecture, laid out as a virtual environment whose interpreter is the EMR image's own Python. Spark
    unpacks it as ./environment (spark.archives=...#environment). Returns the archive's path."""
    import subprocess
    import tempfile

    if architecture not in WHEEL_PLATFORMS:
        raise DeployError(f"Architecture must be one of {sorted(WHEEL_PLATFORMS)}, got {architecture!r}")
    pip = pip or [sys.executable, "-m", "pip"]
    os.makedirs(dest, exist_ok=True)
    target = os.path.join(dest, f"runtime-{architecture.lower()}.tar.gz")
    with tempfile.TemporaryDirectory(prefix="emr-runtime-") as work:
        venv = Path(work) / "environment"
        site = venv / "lib" / f"python{EMR_PYTHON_VERSION}" / "site-packages"
        lines = [ln.split("#")[0].strip() for ln in (PACKAGE / "requirements.txt").read_text().splitlines()]
        pins = [ln for ln in lines if ln]
        pure = [p for p in pins if p.split("==")[0] in PURE_PYTHON_FROM_X86]
        common = [
            "install",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--no-compile",
            "--target",
            str(site),
            "--python-version",
            EMR_PYTHON_VERSION,
            "--implementation",
            "cp",
            "--disable-pip-version-check",
        ]
        for platforms, requirements in ((WHEEL_PLATFORMS[architecture], [p for p in pins if p not in pure]),
                                        (WHEEL_PLATFORMS["X86_64"], pure)):  # fmt: skip
            if requirements:
                tags = [arg for tag in platforms for arg in ("--platform", tag)]
                subprocess.run([*pip, *common, *tags, *requirements], check=True)
        for name in PURE_PYTHON_FROM_X86:
            for compiled in (site / name).rglob("*.so"):
                compiled.unlink()
        for pattern in PRUNED:
            for folder in list(site.glob(pattern)):
                shutil.rmtree(folder, ignore_errors=True)
        # Console scripts and headers land outside the packages, shaped by the builder's Python: left out, and
        # their lines dropped from RECORD, so any machine builds the same bytes (the same content key).
        for outside in ("bin", "include"):
            shutil.rmtree(site / outside, ignore_errors=True)
        for record in site.glob("*.dist-info/RECORD"):
            lines = record.read_text().splitlines(keepends=True)
            record.write_text("".join(line for line in lines if not line.startswith("../")))
        (venv / "bin").mkdir()
        for name in ("python", "python3", f"python{EMR_PYTHON_VERSION}"):
            os.symlink(EMR_PYTHON, venv / "bin" / name)
        (venv / "pyvenv.cfg").write_text(
            f"home = {os.path.dirname(EMR_PYTHON)}\ninclude-system-site-packages = false\n"
            f"version = {EMR_PYTHON_VERSION}\n"
        )
        _reproducible_tar(venv, target)
    return target


def _reproducible_tar(folder: Path, target: str) -> None:
    """Same files, same bytes: sorted entries, fixed owners and times, no gzip timestamp."""
    import gzip

    def clean(info):
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 946684800  # 2000-01-01
        return info

    with open(target, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=6) as gz:
        _tar_into(gz, folder, clean)


def _tar_into(stream, folder: Path, clean) -> None:
    import tarfile

    with tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(folder)), recursive=False, filter=clean)


def fetch_imagenet(path: str) -> str:
    from emr_job.model import Weights, build_network, load_arrays

    arrays = load_arrays(Weights("imagenet", None, "imagenet", "imagenet"))
    net = build_network()
    net.set_weights(arrays)
    net.save_weights(path)
    return path


def overrides(config_env: str) -> str:
    """parameter_overrides of one samconfig.toml environment, as written there (quotes kept)."""
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # the SAM CLI's own virtual environment has tomlkit
        import tomlkit as tomllib

    with open(ROOT / "samconfig.toml", "rb") as fh:
        config = tomllib.loads(fh.read().decode())
    return str(config[config_env]["deploy"]["parameters"].get("parameter_overrides", ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("layer", "runtime"):
        cmd = sub.add_parser(name)
        cmd.add_argument("dest")
        cmd.add_argument("--architecture", required=True, choices=sorted(WHEEL_PLATFORMS))
    sub.choices["layer"].add_argument("--runtime", help="reuse this runtime archive (same requirements.txt)")
    sub.add_parser("build").add_argument("dist", nargs="?", default="dist")
    sub.add_parser("fetch-imagenet").add_argument("path")
    sub.add_parser("overrides").add_argument("--config-env", default="default")
    args = parser.parse_args(argv)
    try:
        if args.command == "layer":
            print(json.dumps(layer(args.dest, args.architecture, runtime=args.runtime), indent=2, sort_keys=True))
        elif args.command == "runtime":
            print(build_runtime(args.dest, args.architecture))
        elif args.command == "build":
            print("\n".join(build(args.dist)))
        elif args.command == "fetch-imagenet":
            print(f"saved ImageNet weights to {fetch_imagenet(args.path)}")
        else:
            print(overrides(args.config_env))
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
