import importlib
import json
import sys
import time
from urllib.parse import quote_plus

import pytest
from moto import mock_aws

from tests.lambdas.stack import BUCKET, REGION, create_stack, job_runs, set_job_state  # noqa: F401  (tests import here)

# template.yaml's default prices for Architecture=ARM64 (its ServerlessListPrices mapping)
PRICES = {"PRICE_VCPU_HOUR": "0.042094", "PRICE_GB_HOUR": "0.004628"}


@pytest.fixture
def aws(monkeypatch):
    """The stack's AWS side in moto, and the environment template.yaml gives the functions."""
    with mock_aws():
        stack = create_stack()
        stack.env.update(PRICES)
        for name, value in stack.env.items():
            monkeypatch.setenv(name, value)
        stack.monkeypatch = monkeypatch
        yield stack


def load(module: str):
    """Import a handler module as a cold start would, under the current environment and mocks."""
    for name in [m for m in sys.modules if m.split(".")[0] in ("trigger", "job_state", "artifacts", "pipeline")]:
        del sys.modules[name]
    return importlib.import_module(module)


@pytest.fixture
def trigger(aws):
    return load("trigger.app")


@pytest.fixture
def job_state(aws):
    return load("job_state.app")


# --- event builders: the shapes S3, SQS and EventBridge really send ---------------------------------------
_seq = [0x5F0000000000000000]


def next_sequencer() -> str:
    _seq[0] += 1
    return f"{_seq[0]:X}"


def s3_record(
    key: str, action: str = "ObjectCreated:Put", bucket: str = BUCKET, sequencer: str = "", at: float = None
) -> dict:
    obj = {"key": quote_plus(key, safe="/"), "sequencer": sequencer or next_sequencer()}
    if action.startswith("ObjectCreated"):
        obj.update(size=1024, eTag="d41d8cd98f00b204e9800998ecf8427e")
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": REGION,
        "eventTime": iso(time.time() if at is None else at),
        "eventName": action,
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"}, "object": obj},
    }


def sqs_event(bodies: list) -> dict:
    return {
        "Records": [
            {
                "messageId": f"msg-{i:05d}",
                "receiptHandle": f"rh-{i}",
                "body": body if isinstance(body, str) else json.dumps(body),
                "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": str(int(time.time() * 1000))},
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": f"arn:aws:sqs:{REGION}:123456789012:uploads",
                "awsRegion": REGION,
            }
            for i, body in enumerate(bodies)
        ]
    }


def eventbridge_s3(key: str, detail_type: str = "Object Created", bucket: str = BUCKET, at: float = None) -> dict:
    return {
        "version": "0",
        "id": "17793124-05d4-b198-2fde-7ededc63b103",
        "detail-type": detail_type,
        "source": "aws.s3",
        "account": "123456789012",
        "time": iso(time.time() if at is None else at)[:19] + "Z",
        "region": REGION,
        "resources": [f"arn:aws:s3:::{bucket}"],
        "detail": {
            "version": "0",
            "bucket": {"name": bucket},
            "object": {
                "key": key,
                "size": 1024,
                "etag": "b1946ac92492d2347c6235b4d2611184",
                "sequencer": next_sequencer(),
            },
            "request-id": "N4N7GDK58NMKJ12R",
            "requester": "123456789012",
        },
    }


def serverless_state(job_run_id: str, app_id: str, state: str) -> dict:
    return {
        "version": "0",
        "id": "f3a2c7b9-1d35-4a3e-9d77-0123456789ab",
        "detail-type": "EMR Serverless Job Run State Change",
        "source": "aws.emr-serverless",
        "account": "123456789012",
        "time": "2026-11-24T11:00:00Z",
        "region": REGION,
        "resources": [],
        "detail": {
            "jobRunId": job_run_id,
            "jobRunName": "run",
            "applicationId": app_id,
            "arn": f"arn:aws:emr-serverless:{REGION}:123456789012:/applications/{app_id}/jobruns/{job_run_id}",
            "releaseLabel": "emr-7.10.0",
            "state": state,
            "previousState": "RUNNING",
            "createdBy": "arn:aws:sts::123456789012:assumed-role/trigger",
            "updatedAt": "2026-11-24T11:00:00.000000Z",
            "createdAt": "2026-11-24T10:05:00.000000Z",
        },
    }


def iso(epoch: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def state_item(aws) -> dict:
    """The pipeline's one DynamoDB item, as stored."""
    return aws.ddb.get_item(TableName="runs", Key={"id": {"S": "pipeline"}}).get("Item", {})


class Clock:
    """A clock the tests move; the functions read it through PipelineState.clock."""

    def __init__(self, start: float):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def metrics_out(text: str) -> dict:
    """Sum the EMF metrics Powertools printed: name -> value."""
    totals: dict = {}
    for line in text.splitlines():
        if '"_aws"' not in line:
            continue
        doc = json.loads(line)
        for spec in doc["_aws"]["CloudWatchMetrics"][0]["Metrics"]:
            value = doc[spec["Name"]]
            totals[spec["Name"]] = totals.get(spec["Name"], 0) + (sum(value) if isinstance(value, list) else value)
    return totals


@pytest.fixture
def logs(aws):
    """What the functions log, as CloudWatch would get it. Powertools' handler writes to the stream it found when
    first configured, out of capsys' reach: its stream is swapped for one the test reads."""
    import io
    import logging

    load("pipeline.observability")  # configures the service's logger once; later imports reuse its handler
    stream = io.StringIO()
    for handler in logging.getLogger("image-features").handlers:
        aws.monkeypatch.setattr(handler, "stream", stream)
    return stream


@pytest.fixture
def clock(aws, trigger, job_state):
    """One clock for both functions, starting now; events made with at=clock.now happen 'now'."""
    shared = Clock(time.time())
    for module in (trigger, job_state):
        module.PIPELINE.state.clock = shared
    return shared


def tune(aws, module, **fields) -> None:
    """Run a handler module with other settings, as if template.yaml gave it other values."""
    import dataclasses

    tuned = dataclasses.replace(module.SETTINGS, **fields)
    aws.monkeypatch.setattr(module, "SETTINGS", tuned)
    aws.monkeypatch.setattr(module.PIPELINE, "settings", tuned)
