"""Two engines behind one small interface: start(run_id, manifest_uri) -> job id; parse their state events."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Optional

from pipeline.settings import Settings

ACTIVE_CLUSTER_STATES = ["STARTING", "BOOTSTRAPPING", "RUNNING", "WAITING"]


@dataclass(frozen=True)
class JobOutcome:
    engine: str
    job_id: str
    succeeded: bool
    state: str
    detail: str = ""


class ServerlessLauncher:
    engine = "serverless"

    def __init__(self, client, settings: Settings):
        self.client, self.s = client, settings

    def start(self, run_id: str, manifest_uri: str) -> str:
        s = self.s
        params = f"--py-files {s.job_archive_uri} {s.spark_submit_parameters}".strip()
        response = self.client.start_job_run(
            applicationId=s.emr_application_id,
            clientToken=run_id,  # a retried start for the same run returns the same job run
            name=run_id,
            executionRoleArn=s.emr_runtime_role_arn,
            jobDriver={
                "sparkSubmit": {
                    "entryPoint": s.job_entry_uri,
                    "entryPointArguments": s.job_arguments(manifest_uri),
                    "sparkSubmitParameters": params,
                }
            },
            configurationOverrides={
                "monitoringConfiguration": {
                    "s3MonitoringConfiguration": {"logUri": f"s3://{s.bucket}/{s.logs_prefix}emr-serverless/"}
                }
            },
            executionTimeoutMinutes=s.job_timeout_minutes,
            tags={"run_id": run_id, "app": "image-features"},
        )
        return response["jobRunId"]


class Ec2Launcher:
    """A transient cluster per run: one step, terminated when the step ends, whatever its outcome."""

    engine = "ec2"

    def __init__(self, client, settings: Settings):
        self.client, self.s = client, settings

    def _cluster_name(self, run_id: str) -> str:
        return f"image-features-{run_id}"

    def start(self, run_id: str, manifest_uri: str) -> str:
        s = self.s
        name = self._cluster_name(run_id)
        # RunJobFlow has no client token: a retried start first looks for the cluster it may have made.
        for page in self.client.get_paginator("list_clusters").paginate(ClusterStates=ACTIVE_CLUSTER_STATES):
            for cluster in page["Clusters"]:
                if cluster["Name"] == name:
                    return cluster["Id"]
        market = "SPOT" if s.ec2_use_spot else "ON_DEMAND"
        instances = {
            "InstanceGroups": [
                {"Name": "primary", "InstanceRole": "MASTER", "InstanceType": s.ec2_instance_type,
                 "InstanceCount": 1, "Market": "ON_DEMAND"},
                {"Name": "core", "InstanceRole": "CORE", "InstanceType": s.ec2_instance_type,
                 "InstanceCount": s.ec2_core_instances, "Market": market},
            ],
            "KeepJobFlowAliveWhenNoSteps": False,
            "TerminationProtected": False,
        }  # fmt: skip
        if s.ec2_subnet_id:
            instances["Ec2SubnetId"] = s.ec2_subnet_id
        submit = ["spark-submit", "--deploy-mode", "cluster", "--py-files", s.job_archive_uri]
        submit += shlex.split(s.spark_submit_parameters) + [s.job_entry_uri, *s.job_arguments(manifest_uri)]
        response = self.client.run_job_flow(
            Name=name,
            ReleaseLabel=s.emr_release_label,
            LogUri=f"s3://{s.bucket}/{s.logs_prefix}emr-ec2/",
            Applications=[{"Name": "Spark"}],
            Instances=instances,
            Steps=[
                {
                    "Name": run_id,
                    "ActionOnFailure": "TERMINATE_CLUSTER",
                    "HadoopJarStep": {"Jar": "command-runner.jar", "Args": submit},
                }
            ],
            BootstrapActions=[
                {
                    "Name": "job-dependencies",
                    "ScriptBootstrapAction": {"Path": s.bootstrap_uri, "Args": s.bootstrap_args},
                }
            ],
            Configurations=[
                {
                    "Classification": "spark-defaults",
                    # The bootstrap script installs the pinned stack into this interpreter; pyspark stays EMR's.
                    "Properties": {"spark.pyspark.python": "/opt/image-features/venv/bin/python"},
                }
            ],
            AutoTerminationPolicy={"IdleTimeout": 3600},  # safety net should the step never be scheduled
            StepConcurrencyLevel=1,
            JobFlowRole=s.emr_instance_profile,
            ServiceRole=s.emr_service_role,
            VisibleToAllUsers=True,
            Tags=[{"Key": "run_id", "Value": run_id}, {"Key": "app", "Value": "image-features"}],
        )
        return response["JobFlowId"]


def make_launcher(settings: Settings, emr_serverless=None, emr=None):
    if settings.engine == "serverless":
        return ServerlessLauncher(emr_serverless, settings)
    return Ec2Launcher(emr, settings)


SERVERLESS_TERMINAL = {"SUCCESS": True, "FAILED": False, "CANCELLED": False}
STEP_TERMINAL = {"COMPLETED": True, "FAILED": False, "CANCELLED": False, "INTERRUPTED": False}
CLUSTER_FAILED = {"TERMINATED_WITH_ERRORS"}


def parse_state_event(event: dict) -> Optional[JobOutcome]:
    """EventBridge state change -> outcome if the job reached an end state; None for in-between states."""
    detail_type, detail = event.get("detail-type", ""), event.get("detail") or {}
    state = detail.get("state", "")
    if detail_type == "EMR Serverless Job Run State Change" and state in SERVERLESS_TERMINAL:
        return JobOutcome("serverless", detail["jobRunId"], SERVERLESS_TERMINAL[state], state,
                          detail.get("stateDetails", ""))  # fmt: skip
    if detail_type == "EMR Step Status Change" and state in STEP_TERMINAL:
        return JobOutcome("ec2", detail["clusterId"], STEP_TERMINAL[state], state, detail.get("message", ""))
    if detail_type == "EMR Cluster State Change" and state in CLUSTER_FAILED:
        # The cluster died without a step event (bootstrap failure, capacity): the run failed.
        return JobOutcome("ec2", detail["clusterId"], False, state, detail.get("stateChangeReason", ""))
    return None
