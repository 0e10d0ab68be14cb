"""The rollout, rehearsed without an AWS account: the template as `sam build` leaves it, brought up on the local
stack; the JobArtifacts custom resource driven as CloudFormation drives it (Create, Update with a changed job,
Delete, each answered at its ResponseURL); images dropped and results checked. The job runs on the EMR image's
Python version with only what the stack shipped: no site-packages, no project venv."""

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from tests.job.images import make_tree

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def deployed(sam_build, tmp_path, weights_file, monkeypatch):
    """`sam deploy` of the built template with the local samconfig environment (ModelWeights=s3://...)."""
    from tests.localstack.__main__ import Watcher
    from tests.localstack.stack import LocalStack

    for name in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID"):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # restored afterwards; the stack sets them
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    lines = []
    stack = LocalStack("local", log=lines.append, workdir=str(tmp_path / "stack"), build_dir=str(sam_build),
                       weights=weights_file)  # fmt: skip
    stack.start()
    stack.serve(timers=False)
    stack.watcher = Watcher(stack)
    yield stack
    import requests

    requests.post(f"{stack.endpoint}/moto-api/reset", timeout=10)
    stack.stop()


def keys(stack, prefix: str) -> set:
    pages = stack.client("s3").get_paginator("list_objects_v2").paginate(Bucket=stack.bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def report(stack) -> dict:
    body = stack.client("s3").get_object(Bucket=stack.bucket, Key="results/report.json")["Body"].read()
    return json.loads(body)


def changed_layer(sam_build: Path, target: Path) -> Path:
    """The layer `sam build` makes after a change to the job (one line of main.py), its runtime unchanged."""
    source = target / "emr_job"
    shutil.copytree(ROOT / "emr_job", source, ignore=shutil.ignore_patterns("__pycache__"))
    main = source / "main.py"
    main.write_text(main.read_text() + "\n# a change to the job\n")
    runtime = next((sam_build / "JobRuntimeX86" / "job").glob("runtime-*.tar.gz"))
    content = target / "layer"
    subprocess.run([sys.executable, str(source / "package.py"), "layer", str(content / "job"), "--architecture",
                    "X86_64", "--runtime", str(runtime)], check=True, capture_output=True)  # fmt: skip
    return content


def test_sam_build_then_deploy_alone_gives_a_pipeline_that_processes_the_first_images(deployed, sam_build, tmp_path):
    stack, s3 = deployed, deployed.client("s3")

    # Given the stack as `sam deploy` creates it: JobArtifacts answered SUCCESS at its ResponseURL, having put
    # the job, its runtime and the weights in content-keyed folders, and the functions know where
    [created] = stack.responses.values()
    assert created["Status"] == "SUCCESS" and created["PhysicalResourceId"] == f"s3://{stack.bucket}/artifacts/"
    entry = stack.functions["TriggerFunction"].env["JOB_ENTRY_URI"]
    version = entry.split("/")[-2]
    assert keys(stack, f"artifacts/job/{version}/") == {
        f"artifacts/job/{version}/{name}" for name in ("emr_job.zip", "main.py", "runtime-x86_64.tar.gz", "deployed")
    }
    assert stack.functions["JobStateFunction"].env["WEIGHTS_URI"] == stack.outputs["WeightsUri"]

    # When the first images are dropped under images/
    paths = make_tree(str(tmp_path / "src"), labels=("Apple", "Kiwi"), per_label=3)
    for path in paths:
        s3.upload_file(path, stack.bucket, "images/" + os.path.relpath(path, tmp_path / "src"))
    first = stack.watcher.wait_for_settled(None)

    # Then the run succeeds and the results hold every image, computed by the shipped runtime on Python 3.9
    assert first["state"] == "SUCCESS", first
    rpt = report(stack)
    assert (rpt["images_total"], rpt["images_ok"], rpt["images_failed"]) == (6, 6, 0)
    assert rpt["engine"] == "onnxruntime 1.19.2"  # the runtime archive's, not the developer venv's
    [job] = stack.jobs.values()
    python = (stack.workdir / job.job_id / "environment" / "bin" / "python").resolve()
    assert python.name == "python3.9", python
    # and the run's model.onnx, made by the runtime's onnx, opens in another ONNX Runtime and names the run
    import onnxruntime

    model = s3.get_object(Bucket=stack.bucket, Key=f"results/{rpt['model_onnx']}")["Body"].read()
    assert onnxruntime.InferenceSession(model).get_modelmeta().custom_metadata_map["run_id"] == rpt["run_id"]

    # When the job changes and CloudFormation updates the stack: a new layer version, the function mounts it, and
    # JobArtifacts gets an Update with the old properties
    new_layer = changed_layer(sam_build, tmp_path / "update")
    new_arn = "arn:aws:lambda:eu-west-3:123456789012:layer:image-features-local-job-runtime:2"
    stack.layers[new_arn] = str(new_layer)
    stack.functions["ArtifactsFunction"].layers = [str(new_layer)]
    old_props = stack.template.value(stack.template.doc["Resources"]["JobArtifacts"]["Properties"])
    updated = stack.custom_resource("Update", "JobArtifacts", {**old_props, "Layer": new_arn}, old=old_props,
                                    physical=created["PhysicalResourceId"])  # fmt: skip

    # Then the new job is in a folder of its own, the old one stays for runs started on it, and the functions start
    # the next run with the new one
    assert updated["Status"] == "SUCCESS" and updated["PhysicalResourceId"] == created["PhysicalResourceId"]
    new_entry = stack.functions["TriggerFunction"].env["JOB_ENTRY_URI"]
    assert new_entry != entry and keys(stack, f"artifacts/job/{version}/")
    s3.put_object(Bucket=stack.bucket, Key="images/Kiwi/late.jpg", Body=Path(paths[0]).read_bytes())
    second = stack.watcher.wait_for_settled(first["run_id"])
    assert second["state"] == "SUCCESS" and report(stack)["images_ok"] == 7
    newest = max(stack.jobs.values(), key=lambda j: j.started)
    assert newest.driver["entryPoint"] == new_entry

    # When the stack is deleted: the artifacts go, and CloudFormation hears so
    deleted = stack.custom_resource("Delete", "JobArtifacts", {**old_props, "Layer": new_arn},
                                    physical=created["PhysicalResourceId"])  # fmt: skip
    assert deleted["Status"] == "SUCCESS"
    assert keys(stack, "artifacts/") == set()


def test_the_arm64_runtime_holds_the_same_packages_built_for_aarch64(sam_build):
    """Graviton cannot run here: its archive is checked for what differs, the machine code of every library."""
    import tarfile

    def contents(layer: str):
        [archive] = (sam_build / layer / "job").glob("runtime-*.tar.gz")
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            packages = {Path(m.name).name for m in members if m.name.endswith(".dist-info")}
            machines = {}
            for m in members:
                if m.isfile() and ".so" in Path(m.name).name:
                    header = tar.extractfile(m).read(20)
                    if header[:4] == b"\x7fELF":
                        machines[m.name] = int.from_bytes(header[18:20], "little")  # e_machine
        return packages, machines

    x86_packages, x86_machines = contents("JobRuntimeX86")
    arm_packages, arm_machines = contents("JobRuntimeArm64")
    assert arm_packages == x86_packages and len(arm_packages) > 40
    assert set(x86_machines.values()) == {62}  # EM_X86_64
    assert set(arm_machines.values()) == {183}, {k for k, v in arm_machines.items() if v != 183}  # EM_AARCH64
    assert len(arm_machines) > 50


def test_the_runtime_has_no_tensorflow_and_never_pyspark(sam_build):
    [archive] = (sam_build / "JobRuntimeX86" / "job").glob("runtime-*.tar.gz")
    import tarfile

    with tarfile.open(archive) as tar:
        tops = {Path(m.name).parts[3] for m in tar.getmembers() if len(Path(m.name).parts) > 3}
    assert "onnxruntime" in tops and "pyiceberg" in tops
    assert not {"tensorflow", "keras", "pyspark", "py4j"} & tops
    with zipfile.ZipFile(sam_build / "JobRuntimeX86" / "job" / "emr_job.zip") as zf:
        assert "emr_job/main.py" in zf.namelist()


def test_an_ec2_step_runs_the_shipped_runtime_as_yarn_does(sam_build, moto_server, tmp_path, weights_file, monkeypatch):
    """Engine=ec2: no bootstrap action installs anything; the step brings the runtime archive (--archives, which
    YARN unpacks beside the driver and each executor) and points PySpark at its interpreter, whatever EMR's
    spark-env.sh exports on the node that submits (the system Python, which the YARN client copies to the driver)."""
    import boto3
    from artifacts.publish import Request, publish
    from pipeline.launchers import Ec2Launcher
    from pipeline.settings import load

    from tests.lambdas.stack import BUCKET, create_stack
    from tests.localstack.stack import (
        emr_environment,
        local_submit_parameters,
        spark_home,
        submitter_environment,
        unpack_runtime,
        yarn_app_master_environment,
    )
    from tests.localstack.stack import fetch as localize

    # Given the stack's bucket with the artifacts JobArtifacts puts there from the sam-built layer
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    stack = create_stack()
    s3 = stack.s3
    s3.create_bucket(Bucket="deployer", CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
    s3.upload_file(weights_file, "deployer", "mobilenet_v2.weights.h5")
    data = publish(s3, Request(BUCKET, "artifacts/", str(sam_build / "JobRuntimeX86" / "job"),
                               "s3://deployer/mobilenet_v2.weights.h5", "", 3600))  # fmt: skip
    env = {**stack.env, "ENGINE": "ec2", "ARTIFACTS_VERSION": data["Version"], "JOB_ENTRY_URI": data["JobEntryUri"],
           "JOB_ARCHIVE_URI": data["JobArchiveUri"], "RUNTIME_ARCHIVE_URI": data["RuntimeArchiveUri"],
           "WEIGHTS_URI": data["WeightsUri"]}  # fmt: skip
    settings = load(env)
    for path in make_tree(str(tmp_path / "src"), labels=("Apple", "Kiwi"), per_label=2):
        s3.upload_file(path, BUCKET, "images/" + os.path.relpath(path, tmp_path / "src"))

    # When the launcher starts a cluster: no bootstrap action, one step
    cluster = Ec2Launcher(boto3.client("emr", region_name="eu-west-3"), settings).start("run-20261129T000000Z-0a1b2c3d")
    emr = boto3.client("emr", region_name="eu-west-3")
    assert emr.list_bootstrap_actions(ClusterId=cluster)["BootstrapActions"] == []
    [step] = emr.list_steps(ClusterId=cluster)["Steps"]
    words = step["Config"]["Args"]
    assert words[:5] == ["timeout", "180m", "spark-submit", "--deploy-mode", "cluster"]

    # And the step's spark-submit runs here as YARN would run it: the archive unpacked in the container's folder,
    # the driver's environment built by the YARN client from appMasterEnv and the submitter's spark-env.sh, EMR's
    # Python 3.9, no venv, no package index
    folder = tmp_path / "container"
    folder.mkdir()

    def fetch(uri: str) -> str:
        return localize(s3, uri, folder)

    entry = words.index(settings.job_entry_uri)
    unpack = lambda uri, alias: unpack_runtime(fetch(uri), folder / alias)  # noqa: E731
    submit, app_master_env = local_submit_parameters(words[5:entry], fetch, unpack)
    submitter = submitter_environment(emr_environment(moto_server, spark_home(), {}), tmp_path / "spark-conf")
    driver_env = yarn_app_master_environment(app_master_env, submitter)
    main = fetch(settings.job_entry_uri)
    command = [*words[:2], str(spark_home() / "bin" / "spark-submit"), "--master", "local[2]", *submit, main,
               *words[entry + 1 :]]  # fmt: skip
    with driver_interpreters(main) as drivers:
        proc = subprocess.run(command, cwd=folder, env=emr_environment(moto_server, spark_home(), driver_env),
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    # Then the run succeeds, its driver on the runtime's interpreter though the system Python reached its environment
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]  # PythonRunner: Python's stderr to stdout
    assert driver_env == {"PYSPARK_PYTHON": "./environment/bin/python", "PYSPARK_DRIVER_PYTHON": "/usr/bin/python3"}
    assert "spark.pyspark.driver.python=./environment/bin/python" in submit
    assert drivers == {str(folder / "environment" / "bin" / "python")}
    body = s3.get_object(Bucket=BUCKET, Key="results/report.json")["Body"].read()
    rpt = json.loads(body)
    assert rpt["images_ok"] == 4 and rpt["engine"] == "onnxruntime 1.19.2"


@contextlib.contextmanager
def driver_interpreters(main: str):
    """The interpreters that ran `main` while the block ran, as absolute paths the way the driver's sys.executable
    names them: PythonRunner starts `<interpreter> <main> <args>` (Linux's /proc tells, without touching the job)."""
    seen, stop = set(), threading.Event()

    def watch():
        while not stop.wait(0.05):
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
                    if main in argv[1:3]:
                        seen.add(os.path.normpath(os.path.join(os.readlink(proc / "cwd"), argv[0])))
                except OSError:
                    continue  # the process ended meanwhile

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


def newest_python() -> str:
    import glob

    found = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[3-9].*/bin/python3.1[3-9]")))
    return found[-1] if found else shutil.which("python3.14") or shutil.which("python3.13")


def test_the_built_functions_run_on_the_newest_python_here_with_only_their_folder(sam_build):
    """Lambda runs them on python3.14 (no such interpreter can be installed here): the folder `sam build` made
    is imported and invoked by the newest one available, isolated from any site-packages."""
    python = newest_python()
    if not python:
        pytest.skip("no Python 3.13+ on this machine")
    event = {"Records": [{"messageId": "m1", "receiptHandle": "r", "eventSource": "aws:sqs", "body": json.dumps(
        {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "photos-eu"})}]}  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "AWS_DEFAULT_REGION": "eu-west-3", "AWS_ACCESS_KEY_ID": "x",
           "POWERTOOLS_SERVICE_NAME": "image-features", "POWERTOOLS_METRICS_NAMESPACE": "ImageFeatures",
           "AWS_SECRET_ACCESS_KEY": "x", "POWERTOOLS_TRACE_DISABLED": "true", "BUCKET": "photos-eu",
           "TABLE_NAME": "runs", "QUIET_SECONDS": "0", "EMR_APPLICATION_ID": "app", "EMR_RUNTIME_ROLE_ARN": "role",
           "ARTIFACTS_VERSION": "v", "JOB_ENTRY_URI": "s3://b/k/main.py", "JOB_ARCHIVE_URI": "s3://b/k/emr_job.zip",
           "RUNTIME_ARCHIVE_URI": "s3://b/k/runtime.tar.gz", "WEIGHTS_URI": "s3://b/k/w.h5"}  # fmt: skip
    code = ("import json, sys, types; sys.path.insert(0, '.'); import trigger.app as app, job_state.app, "
            "artifacts.app; ctx = types.SimpleNamespace(function_name='f', memory_limit_in_mb=512, "
            "invoked_function_arn='arn:aws:lambda:eu-west-3:1:function:f', aws_request_id='r'); "
            "print(json.dumps(app.lambda_handler(json.loads(sys.argv[1]), ctx)))")  # fmt: skip
    proc = subprocess.run([python, "-I", "-c", code, json.dumps(event)], cwd=sam_build / "TriggerFunction", env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == '{"batchItemFailures": []}'  # the test event is ignored
