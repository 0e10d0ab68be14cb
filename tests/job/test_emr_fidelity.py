"""What EMR runs: Spark 3.5 (EMR 7.x) and emr_job/ loadable by EMR's default Python 3.9."""

import ast
import glob
import os
import shutil
import subprocess

import pyspark

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "emr_job", "*.py")))


def test_tests_run_on_the_spark_minor_emr_ships():
    assert pyspark.__version__.startswith("3.5.")


def test_emr_job_parses_as_python_39():
    for path in SOURCES:
        with open(path, encoding="utf-8") as fh:
            ast.parse(fh.read(), filename=path, feature_version=(3, 9))


def python39():
    pyenv_root = os.path.expanduser("~/.pyenv/versions")
    versions = sorted(glob.glob(os.path.join(pyenv_root, "3.9.*", "bin", "python3.9")))
    # pyenv's shim exists even where 3.9 is not selected, so real interpreters come first.
    return versions[-1] if versions else shutil.which("python3.9")


def test_emr_job_compiles_on_a_real_python_39():
    interpreter = python39()
    if interpreter is None:
        import pytest

        pytest.skip("no Python 3.9 interpreter on this machine (the ast check above still ran)")
    proc = subprocess.run([interpreter, "-m", "py_compile", *SOURCES], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
