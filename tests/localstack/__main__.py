"""`make demo` and `make demo-up`: the deployed flow on this machine, without Docker or an AWS account.

  python -m tests.localstack demo [--per-label N]   start the local stack, upload a sample tree, wait for the
                                                    run, erase two images and add three, wait again, stop
  python -m tests.localstack up                     start it and keep it running; use any S3 client on it

What is emulated and how it differs from AWS: docs/LOCAL.md."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]


def say(line: str) -> None:
    # The terminal itself: while a function runs, sys.stdout is its log file (functions.log).
    print(time.strftime("%H:%M:%S ") + line, file=sys.__stdout__, flush=True)


class Watcher:
    """Prints what the pipeline does, read from its state item, as it happens."""

    def __init__(self, stack):
        self.stack, self.last = stack, {}
        self.table = stack.outputs["StateTableName"]

    def state(self) -> dict:
        item = self.stack.client("dynamodb").get_item(TableName=self.table, Key={"id": {"S": "pipeline"}})
        plain = {k: next(iter(v.values())) for k, v in item.get("Item", {}).items()}
        for nested in ("run", "last_run"):
            if nested in plain:
                plain[nested] = {k: next(iter(v.values())) for k, v in plain[nested].items()}
        return plain

    def poll(self) -> dict:
        now = self.state()
        run, before = now.get("run") or {}, self.last.get("run") or {}
        if now.get("gen") != self.last.get("gen") and now.get("gen"):
            say(f"pipeline marked dirty: change #{now['gen']} (events received so far: {self.stack.events_seen})")
        if run.get("run_id") and run.get("run_id") != before.get("run_id"):
            say(f"run {run['run_id']} claimed (attempt {run.get('attempt')})")
        if run.get("job_id") and run.get("job_id") != before.get("job_id"):
            say(f"run {run['run_id']} started: EMR Serverless job {run['job_id']}")
        last = now.get("last_run") or {}
        if last and last != (self.last.get("last_run") or {}):
            say(f"run {last.get('run_id')} settled: {last.get('state')} {last.get('detail') or ''}".rstrip())
        self.last = now
        return now

    def wait_for_settled(self, after: str | None, timeout: float = 600) -> dict:
        """Until a run other than `after` has settled and nothing is active."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.poll()
            last = state.get("last_run") or {}
            if last.get("run_id") not in (None, after) and not state.get("run"):
                return last
            time.sleep(1)
        raise TimeoutError("no run settled in time")


def alerts(stack) -> list:
    got = stack.client("sqs").receive_message(QueueUrl=stack.alert_inbox, MaxNumberOfMessages=10)
    return [json.loads(m["Body"]) for m in got.get("Messages", [])]


def weights_or_seeded(weights: str | None) -> str:
    """The weights file the deployer gives the stack (ModelWeights=s3://...): WEIGHTS_FILE, or a seeded one."""
    if weights:
        return weights
    path = os.path.join(tempfile.mkdtemp(prefix="weights-"), "mobilenet_v2.weights.h5")
    say("weights: a seeded random MobileNetV2 (ImageNet's need internet; WEIGHTS_FILE=... to use a real file)")
    seeded_weights(path)
    return path


def seeded_weights(path: str) -> None:
    import subprocess

    code = ("import sys; from emr_job.model import build_network, _tf; tf = _tf(); tf.keras.utils.set_random_seed(0);"
            " build_network().save_weights(sys.argv[1])")  # fmt: skip
    subprocess.run([sys.executable, "-c", code, path], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})  # fmt: skip


def upload_tree(stack, root: Path) -> int:
    s3, count = stack.client("s3"), 0
    for path in sorted(root.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), stack.bucket, "images/" + path.relative_to(root).as_posix())
            count += 1
    return count


def show_results(stack) -> dict:
    from emr_job.report import summary

    report = json.loads(stack.client("s3").get_object(Bucket=stack.bucket, Key="results/report.json")["Body"].read())
    for line in summary(report).splitlines():
        say("  " + line)
    return report


def show_status(stack, when: str) -> None:
    """The operator's screen, as `image-features status --config-env local` prints it against this stack."""
    from ops import stack as stacks
    from ops import status
    from tests.localstack.template import REGION

    record = stacks.describe(stack.client("cloudformation"), stack.stack_name, REGION)
    screen = status.render(status.gather(record, stack.client, time.time()))
    say(f"{when}: image-features status --config-env local")
    print("\n".join("    " + line for line in screen.splitlines()), file=sys.__stdout__, flush=True)


def status_during_run(stack, watcher, timeout: float = 300) -> None:
    """Show the status once the run's job reports featurizing (or has run 40 s without), as a person would look in."""
    deadline, running_since = time.time() + timeout, None
    while time.time() < deadline:
        run = watcher.poll().get("run") or {}
        job = stack.jobs.get(run.get("job_id", ""))
        if (watcher.last.get("last_run") or {}).get("run_id") and not run:
            return  # it ended before it reported anything
        if job is not None and job.state == "RUNNING":
            running_since = running_since or time.time()
            progress = _progress(stack, run["run_id"])
            if progress.get("stage", "plan") != "plan" or time.time() - running_since > 40:
                show_status(stack, "during the run")
                return
        time.sleep(1)


def _progress(stack, run_id: str) -> dict:
    """What the run's job last reported (results/progress/<run id>.json), {} before it has."""
    with contextlib.suppress(Exception):
        body = stack.client("s3").get_object(Bucket=stack.bucket, Key=f"results/progress/{run_id}.json")["Body"]
        return json.loads(body.read())
    return {}


def start(config_env: str, weights: str | None):
    from tests.localstack.stack import LocalStack

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    weights = weights_or_seeded(weights)
    say("building the job's runtime layer (emr_job/Makefile, as sam build does; reused while unchanged)")
    stack = LocalStack(config_env, log=say, weights=weights).start()
    say(f"local stack up: moto server {stack.endpoint}, bucket {stack.bucket}, template.yaml resources created")
    say(f"JobArtifacts put the job in place: version {stack.outputs['ArtifactsVersion']}")
    return stack


def demo(args) -> int:
    from emr_job.sample import make_tree

    stack = start(args.config_env, args.weights)
    try:
        stack.serve()
        watcher = Watcher(stack)
        tree = Path(tempfile.mkdtemp(prefix="demo-images-"))
        files = make_tree(str(tree), per_label=args.per_label)
        say(f"uploading {upload_tree(stack, tree)} files to s3://{stack.bucket}/images/ ({files} made)")
        status_during_run(stack, watcher)
        first = watcher.wait_for_settled(None)
        show_results(stack)

        say("erasing 2 images and adding 3 (GDPR erasure and new uploads)")
        s3 = stack.client("s3")
        for key in ("images/Kiwi/00000.jpg", "images/Kiwi/00001.jpg"):
            s3.delete_object(Bucket=stack.bucket, Key=key)
        extra = Path(tempfile.mkdtemp(prefix="demo-more-"))
        make_tree(str(extra), per_label=1, broken=False, seed=7)
        for label in ("Banana", "Orange", "Pêche"):
            s3.upload_file(str(extra / label / "00000.jpg"), stack.bucket, f"images/{label}/new-00000.jpg")
        watcher.wait_for_settled(first["run_id"])
        report = show_results(stack)
        for alert in alerts(stack):
            say(f"alert: {alert['subject']}")
        show_status(stack, "after the runs")
        say(f"done: {report['images_ok']} images in results/, {report['images_removed']} removed by the last run")
        return 0
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        stack.stop()
        say("local stack stopped")


def up(args) -> int:
    stack = start(args.config_env, args.weights)
    try:
        stack.serve()
        say("ready. In another shell:")
        print(file=sys.__stdout__)
        print(f"  export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_DEFAULT_REGION=eu-west-3\n"
              f"  aws --endpoint-url {stack.endpoint} s3 cp --recursive ~/fruits s3://{stack.bucket}/images/\n"
              f"  aws --endpoint-url {stack.endpoint} s3 rm s3://{stack.bucket}/images/Apple/r_1.jpg\n"
              f"  aws --endpoint-url {stack.endpoint} s3 cp s3://{stack.bucket}/results/report.json -\n"
              f"  AWS_ENDPOINT_URL={stack.endpoint} make status STACK_ENV=local    # what the pipeline does now\n"
              "Ctrl-C stops everything.", file=sys.__stdout__, flush=True)  # fmt: skip
        watcher = Watcher(stack)
        seen = None
        while True:
            state = watcher.poll()
            last = (state.get("last_run") or {}).get("run_id")
            if last and last != seen and not state.get("run"):
                seen = last
                with contextlib.suppress(Exception):
                    show_results(stack)
            time.sleep(1)
    except KeyboardInterrupt:
        say("stopping")
        return 0
    finally:
        stack.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.localstack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("demo", "up"):
        p = sub.add_parser(name)
        p.add_argument("--config-env", default="local", help="samconfig.toml environment (default local)")
        p.add_argument("--weights", default=os.environ.get("WEIGHTS_FILE") or None, help="a MobileNetV2 weights file")
        if name == "demo":
            p.add_argument("--per-label", type=int, default=20)
    args = parser.parse_args(argv)
    return demo(args) if args.command == "demo" else up(args)


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message="No application metrics to publish")
    threading.excepthook = lambda hook: say(f"background error: {hook.exc_type.__name__}: {hook.exc_value}")
    raise SystemExit(main())
