"""The functions' configuration: environment variables declared in template.yaml, read and checked here only."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

ENGINES = ("serverless", "ec2")

# name -> default (None: required). template.yaml declares exactly these (tests/template checks it).
ENV_VARS: dict = {
    "BUCKET": None,
    "TABLE_NAME": None,
    "ENGINE": "serverless",
    "IMAGES_PREFIX": "images/",
    "RESULTS_PREFIX": "results/",
    "LOGS_PREFIX": "logs/",
    "QUEUE_URL": "",
    "QUIET_SECONDS": "60",
    "MAX_WAIT_SECONDS": "900",
    "RETRY_BASE_SECONDS": "300",
    "DEAD_LETTER_QUEUE_URL": "",
    "ALERT_TOPIC_ARN": "",
    "MAX_ATTEMPTS": "3",
    "JOB_TIMEOUT_MINUTES": "180",
    "PCA_VARIANCE": "0.95",
    "PCA_REFIT": "auto",
    "EMR_APPLICATION_ID": "",
    "EMR_RUNTIME_ROLE_ARN": "",
    "SPARK_SUBMIT_PARAMETERS": "",
    "EMR_RELEASE_LABEL": "emr-7.10.0",
    "EC2_INSTANCE_TYPE": "m6i.xlarge",
    "EC2_CORE_INSTANCES": "2",
    "EC2_USE_SPOT": "false",
    "EC2_SUBNET_ID": "",
    "EMR_SERVICE_ROLE": "",
    "EMR_INSTANCE_PROFILE": "",
    "RUN_NAME_PREFIX": "image-features",
    "STAGE": "",  # the deployment's name (dev, prod), in the events a downstream job routes on
    "GLUE_DATABASE": "",
    # USD per vCPU-hour and per GB-hour of memory of EMR Serverless, to estimate each run's cost; empty: no estimate.
    "PRICE_VCPU_HOUR": "",
    "PRICE_GB_HOUR": "",
    # What a run executes, put in place by the stack's JobArtifacts custom resource under content-keyed folders, so
    # a run keeps the version it started with (lambdas/artifacts/, emr_job/package.py).
    "ARTIFACTS_VERSION": None,
    "JOB_ENTRY_URI": None,
    "JOB_ARCHIVE_URI": None,
    "RUNTIME_ARCHIVE_URI": None,
    "WEIGHTS_URI": None,
}
# Read by Powertools itself; declared in template.yaml Globals too.
POWERTOOLS_ENV_VARS = ("POWERTOOLS_SERVICE_NAME", "POWERTOOLS_METRICS_NAMESPACE", "POWERTOOLS_LOG_LEVEL")


class SettingsError(ValueError):
    """A missing or malformed environment variable, named in the message."""


@dataclass(frozen=True)
class Settings:
    bucket: str
    table_name: str
    engine: str
    images_prefix: str
    results_prefix: str
    logs_prefix: str
    queue_url: str
    quiet_seconds: int
    max_wait_seconds: int
    retry_base_seconds: int
    dead_letter_queue_url: str
    alert_topic_arn: str
    max_attempts: int
    job_timeout_minutes: int
    pca_variance: float
    pca_refit: str
    emr_application_id: str
    emr_runtime_role_arn: str
    spark_submit_parameters: str
    emr_release_label: str
    ec2_instance_type: str
    ec2_core_instances: int
    ec2_use_spot: bool
    ec2_subnet_id: Optional[str]
    emr_service_role: str
    emr_instance_profile: str
    run_name_prefix: str
    stage: str
    glue_database: str
    price_vcpu_hour: Optional[float]
    price_gb_hour: Optional[float]
    artifacts_version: str
    job_entry_uri: str
    job_archive_uri: str
    runtime_archive_uri: str
    weights_uri: str

    def job_arguments(self, run_id: str) -> list:
        """The whole job: it lists images/ and diffs it with results/ itself; no list of keys is passed. The run id
        tells the job which launch it is: run markers that other launches left belong to dead runs (one at a time)."""
        return [
            "--input", f"s3://{self.bucket}/{self.images_prefix}",
            "--output", f"s3://{self.bucket}/{self.results_prefix}",
            "--weights", self.weights_uri,
            "--variance", str(self.pca_variance),
            "--refit", self.pca_refit,
            "--launch-id", run_id,
        ] + (["--glue-database", self.glue_database] if self.glue_database else []) + (
            # The job's report estimates its cost with the same prices as the state item's last_run
            ["--price-vcpu-hour", str(self.price_vcpu_hour), "--price-gb-hour", str(self.price_gb_hour)]
            if self.price_vcpu_hour is not None else []
        )  # fmt: skip


def _prefix(name: str, value: str) -> str:
    if not value or value.startswith("/"):
        raise SettingsError(f"{name} must be a key prefix like 'images/', got {value!r}")
    return value if value.endswith("/") else value + "/"


def _s3_uri(name: str, value: str) -> str:
    if not value.startswith("s3://") or "/" not in value[len("s3://") :]:
        raise SettingsError(f"{name} must be an s3://bucket/key URI, got {value!r}")
    return value


def _int(name: str, value: str, low: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {value!r}") from None
    if number < low:
        raise SettingsError(f"{name} must be at least {low}, got {number}")
    return number


def _price(name: str, value: str) -> Optional[float]:
    if not value.strip():
        return None
    try:
        price = float(value)
    except ValueError:
        price = -1.0
    if not 0 <= price < math.inf:
        raise SettingsError(f"{name} must be a price in USD (a number, 0 or more), got {value!r}")
    return price


def load(environ: Mapping[str, str] = os.environ) -> Settings:
    raw = {name: environ.get(name, default) for name, default in ENV_VARS.items()}
    missing = [name for name, value in raw.items() if value is None or (ENV_VARS[name] is None and not value)]
    if missing:
        raise SettingsError(f"missing environment variable(s): {', '.join(missing)}")
    engine = raw["ENGINE"].strip().lower()
    if engine not in ENGINES:
        raise SettingsError(f"ENGINE must be one of {ENGINES}, got {raw['ENGINE']!r}")
    required = ("EMR_APPLICATION_ID", "EMR_RUNTIME_ROLE_ARN") if engine == "serverless" else (
        "EMR_SERVICE_ROLE", "EMR_INSTANCE_PROFILE")  # fmt: skip
    for name in required:
        if not raw[name]:
            raise SettingsError(f"{name} is required when ENGINE={engine}")
    quiet = _int("QUIET_SECONDS", raw["QUIET_SECONDS"], 0)
    if quiet > 900:  # SQS DelaySeconds limit: the tick that starts the run is a delayed message
        raise SettingsError(f"QUIET_SECONDS must be at most 900, got {quiet}")
    if quiet and not raw["QUEUE_URL"]:
        raise SettingsError("QUEUE_URL is required when QUIET_SECONDS > 0 (the delayed start goes through it)")
    try:
        variance = float(raw["PCA_VARIANCE"])
    except ValueError:
        variance = -1.0
    if not 0 < variance <= 1:
        raise SettingsError(f"PCA_VARIANCE must be in (0, 1], got {raw['PCA_VARIANCE']!r}")
    if raw["PCA_REFIT"] not in ("auto", "always", "never"):
        raise SettingsError(f"PCA_REFIT must be auto, always or never, got {raw['PCA_REFIT']!r}")
    prices = _price("PRICE_VCPU_HOUR", raw["PRICE_VCPU_HOUR"]), _price("PRICE_GB_HOUR", raw["PRICE_GB_HOUR"])
    if (prices[0] is None) != (prices[1] is None):
        raise SettingsError("PRICE_VCPU_HOUR and PRICE_GB_HOUR are set together, or both left empty (no estimate)")
    return Settings(
        bucket=raw["BUCKET"],
        table_name=raw["TABLE_NAME"],
        engine=engine,
        images_prefix=_prefix("IMAGES_PREFIX", raw["IMAGES_PREFIX"]),
        results_prefix=_prefix("RESULTS_PREFIX", raw["RESULTS_PREFIX"]),
        logs_prefix=_prefix("LOGS_PREFIX", raw["LOGS_PREFIX"]),
        queue_url=raw["QUEUE_URL"],
        quiet_seconds=quiet,
        max_wait_seconds=_int("MAX_WAIT_SECONDS", raw["MAX_WAIT_SECONDS"], 60),
        retry_base_seconds=_int("RETRY_BASE_SECONDS", raw["RETRY_BASE_SECONDS"], 0),
        dead_letter_queue_url=raw["DEAD_LETTER_QUEUE_URL"],
        alert_topic_arn=raw["ALERT_TOPIC_ARN"],
        max_attempts=_int("MAX_ATTEMPTS", raw["MAX_ATTEMPTS"], 1),
        job_timeout_minutes=_int("JOB_TIMEOUT_MINUTES", raw["JOB_TIMEOUT_MINUTES"], 5),
        pca_variance=variance,
        pca_refit=raw["PCA_REFIT"],
        emr_application_id=raw["EMR_APPLICATION_ID"],
        emr_runtime_role_arn=raw["EMR_RUNTIME_ROLE_ARN"],
        spark_submit_parameters=raw["SPARK_SUBMIT_PARAMETERS"],
        emr_release_label=raw["EMR_RELEASE_LABEL"],
        ec2_instance_type=raw["EC2_INSTANCE_TYPE"],
        ec2_core_instances=_int("EC2_CORE_INSTANCES", raw["EC2_CORE_INSTANCES"], 1),
        ec2_use_spot=raw["EC2_USE_SPOT"].strip().lower() in ("1", "true", "yes"),
        ec2_subnet_id=raw["EC2_SUBNET_ID"] or None,
        emr_service_role=raw["EMR_SERVICE_ROLE"],
        emr_instance_profile=raw["EMR_INSTANCE_PROFILE"],
        run_name_prefix=raw["RUN_NAME_PREFIX"],
        stage=raw["STAGE"],
        glue_database=raw["GLUE_DATABASE"],
        price_vcpu_hour=prices[0],
        price_gb_hour=prices[1],
        artifacts_version=raw["ARTIFACTS_VERSION"],
        job_entry_uri=_s3_uri("JOB_ENTRY_URI", raw["JOB_ENTRY_URI"]),
        job_archive_uri=_s3_uri("JOB_ARCHIVE_URI", raw["JOB_ARCHIVE_URI"]),
        runtime_archive_uri=_s3_uri("RUNTIME_ARCHIVE_URI", raw["RUNTIME_ARCHIVE_URI"]),
        weights_uri=_s3_uri("WEIGHTS_URI", raw["WEIGHTS_URI"]),
    )
