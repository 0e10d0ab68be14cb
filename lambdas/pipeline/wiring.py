"""Clients and collaborators, built once per cold start from the settings."""

from __future__ import annotations

import boto3
from botocore.config import Config

from pipeline.control import Pipeline
from pipeline.inputs import s3_client
from pipeline.launchers import make_launcher
from pipeline.settings import Settings
from pipeline.state import PipelineState

# Throttling on StartJobRun is retried by the SDK first; an unconfirmed start is retried with the same token.
CLIENT_CONFIG = Config(retries={"mode": "standard", "max_attempts": 4}, connect_timeout=5, read_timeout=20)


def build_pipeline(settings: Settings) -> Pipeline:
    client = lambda name: boto3.client(name, config=CLIENT_CONFIG)  # noqa: E731
    engine_client = client("emr-serverless") if settings.engine == "serverless" else client("emr")
    return Pipeline(
        settings=settings,
        state=PipelineState(client("dynamodb"), settings.table_name),
        launcher=make_launcher(settings, emr_serverless=engine_client, emr=engine_client),
        sqs=client("sqs"),
        sns=client("sns"),
        s3=s3_client(CLIENT_CONFIG),  # the daily pass lists images/ and reads report.json
        events=client("events"),  # Results Published, Run Failed, Pipeline Gave Up on the default bus
    )
