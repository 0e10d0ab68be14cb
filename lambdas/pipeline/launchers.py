"""Two engines behind one small interface: start(run_id) -> job id, find(run_id) -> the job a run started or None,
status(job_id) -> outcome or None while it runs, usage(job_id) -> what the job used, cancel(job_id), and their
EventBridge state events -> outcome."""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

from botocore.exceptions import ClientError

from pipeline.costs import ec2_usage, serverless_usage
from pipeline.settings import Settings

ACTIVE_CLUSTER_STATES = ["STARTING", "BOOTSTRAPPING", "RUNNING", "WAITING"]
# A step in these states is a job that runs or will: its cluster is not merely winding down after the step ended.
ACTIVE_STEP_STATES = ["PENDING", "CANCEL_PENDING", "RUNNING"]
# Every non-terminal state of a job run (EMR Serverless API reference, ListJobRuns `states`; job-states guide).
ACTIVE_JOB_RUN_STATES = ["SUBMITTED", "QUEUED", "PENDING", "SCHEDULED", "RUNNING", "CANCELLING"]
FIND_WINDOW_S = 86400  # a run's job is created after its claim; a day earlier covers clock skew with room to spare
# Errors that prove the start request was refused, so no job exists: anything else (throttling, 5xx, a lost
# response) may hide a job that did start, and the start is retried with the same idempotency token instead.
REFUSED = {"ValidationException", "AccessDeniedException", "ResourceNotFoundException", "ConflictException"}


# The job's runtime: the stack's archive of wheels, unpacked by Spark beside each driver and executor as
# ./environment, a virtual environment over the EMR image's own Python 3.9 (emr_job/package.py build_runtime).
# Nothing is installed from an index at run time, so private subnets without internet work.
RUNTIME_ALIAS = "environment"
RUNTIME_PYTHON = f"./{RUNTIME_ALIAS}/bin/python"
# EMR Serverless: the driver's environment goes through spark.emr-serverless.driverEnv (aws-samples/
# emr-serverless-samples). For executors AWS's samples write spark.emr-serverless.executorEnv and others Spark's
# own spark.executorEnv: both are given, for the same value.
SERVERLESS_PYTHON = (
    f"spark.emr-serverless.driverEnv.PYSPARK_DRIVER_PYTHON={RUNTIME_PYTHON}",
    f"spark.emr-serverless.driverEnv.PYSPARK_PYTHON={RUNTIME_PYTHON}",
    f"spark.emr-serverless.executorEnv.PYSPARK_PYTHON={RUNTIME_PYTHON}",
    f"spark.executorEnv.PYSPARK_PYTHON={RUNTIME_PYTHON}",
)
# YARN cluster mode (EMR on EC2): the driver runs in the application master's container (Spark's Python package
# management guide). The spark.pyspark.* confs outrank the system Python that the YARN client copies from EMR's
# spark-env.sh into it (Spark v3.5.9: yarn/Client.scala L934-942; deploy/PythonRunner.scala L43-47 reads confs first).
# The PYSPARK_PYTHON variables are redundant beside the confs (PythonRunner.scala L85 passes the conf on), not wrong.
YARN_PYTHON = (
    f"spark.pyspark.driver.python={RUNTIME_PYTHON}",
    f"spark.pyspark.python={RUNTIME_PYTHON}",
    f"spark.yarn.appMasterEnv.PYSPARK_PYTHON={RUNTIME_PYTHON}",
    f"spark.executorEnv.PYSPARK_PYTHON={RUNTIME_PYTHON}",
)


def runtime_options(s: Settings, yarn: bool) -> list:
    """spark-submit options that bring the job, its runtime archive and its interpreter. On YARN, --archives
    becomes spark.yarn.dist.archives, which also reaches the application master (the driver in cluster mode)."""
    archive = f"{s.runtime_archive_uri}#{RUNTIME_ALIAS}"
    confs = YARN_PYTHON if yarn else (f"spark.archives={archive}", *SERVERLESS_PYTHON)
    return (
        (["--archives", archive] if yarn else [])
        + ["--py-files", s.job_archive_uri]
        + [word for conf in confs for word in ("--conf", conf)]
    )


# EMR's own texts, which hold no object key: kept as they are. Anything else a job's end reports (its last
# exception, a step's failure reason) may quote a key, and is never copied into the state item, logs or alerts.
EMR_TEXTS = [
    re.compile(r"Job failed, please check complete logs in configured logging destination\. ExitCode: -?\d+\."),
    re.compile(r"Job run timed out\.?"),
    re.compile(r"Job run (was )?cancelled( by user)?\.?", re.I),
]
ERROR_NAME = re.compile(r"\b[A-Z][A-Za-z0-9]*(?:Error|Exception|Exit|Timeout)\b")


def safe_detail(text: str) -> str:
    """A job's end message fit to keep: EMR's own texts whole; otherwise only the error names in it, its length and
    a hash, and where the whole text is (the run's logs, which expire with LogsRetentionDays)."""
    text = (text or "").strip()
    if not text or any(p.fullmatch(text) for p in EMR_TEXTS):
        return text
    names = ", ".join(dict.fromkeys(ERROR_NAME.findall(text))) or "none"
    sha = hashlib.sha256(text.encode()).hexdigest()[:12]
    return (f"EMR's message withheld, it may quote an object key ({len(text)} chars, sha256 {sha}; errors named: "
            f"{names}); its text is in the run's logs under logs/")  # fmt: skip


class StartRefused(RuntimeError):
    """The engine refused to start the run (bad configuration or permissions): no job exists."""


class StartBlocked(RuntimeError):
    """EMR runs a job of this stack that is not this run's: a start now would make two (the state item was
    reset, or a job outlived what the pipeline knows). No job is started; the reconciler tries again later."""


@dataclass(frozen=True)
class JobOutcome:
    engine: str
    job_id: str
    succeeded: bool
    state: str
    detail: str = ""
    usage: Optional[dict] = None  # what the job used, when the answer that ended it said (None: ask usage())


def run_time(run_id: str) -> float:
    """run-YYYYmmddTHHMMSSZ-xxxx -> epoch seconds (0 when the id has another shape)."""
    try:
        stamp = datetime.strptime(run_id.split("-")[1], "%Y%m%dT%H%M%SZ")
    except (IndexError, ValueError):
        return 0.0
    return stamp.replace(tzinfo=timezone.utc).timestamp()


def _start(call, **kwargs) -> dict:
    try:
        return call(**kwargs)
    except ClientError as exc:
        code = exc.response["Error"]["Code"]
        if code in REFUSED:
            raise StartRefused(f"{code}: {exc.response['Error'].get('Message', '')}") from exc
        raise


class ServerlessLauncher:
    engine = "serverless"
    TERMINAL = {"SUCCESS": True, "FAILED": False, "CANCELLED": False}

    def __init__(self, client, settings: Settings):
        self.client, self.s = client, settings

    def _job_runs(self, **filters):
        pages = self.client.get_paginator("list_job_runs").paginate(applicationId=self.s.emr_application_id, **filters)
        try:
            for page in pages:
                yield from page["jobRuns"]
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ResourceNotFoundException":
                raise  # (moto's answer for an application without runs; on AWS StartJobRun then refuses)

    def find(self, run_id: str) -> Optional[str]:
        """The job run this run already started, in any state, if a start whose answer was lost did start one."""
        since = datetime.fromtimestamp(run_time(run_id) - FIND_WINDOW_S, tz=timezone.utc)
        return next((job["id"] for job in self._job_runs(createdAtAfter=since) if job.get("name") == run_id), None)

    def others_active(self, run_id: str) -> int:
        """How many job runs of the stack's application are active and not this run's."""
        return sum(job.get("name") != run_id for job in self._job_runs(states=ACTIVE_JOB_RUN_STATES))

    def start(self, run_id: str) -> str:
        s = self.s
        found = self.find(run_id)  # the client token deduplicates too; this does not rely on it alone
        if found:
            return found
        _refuse_a_second_job(self.others_active(run_id))
        params = " ".join([*runtime_options(s, yarn=False), s.spark_submit_parameters]).strip()
        response = _start(
            self.client.start_job_run,
            applicationId=s.emr_application_id,
            clientToken=run_id,  # a retried start for the same run returns the same job run
            name=run_id,
            executionRoleArn=s.emr_runtime_role_arn,
            jobDriver={
                "sparkSubmit": {
                    "entryPoint": s.job_entry_uri,
                    "entryPointArguments": s.job_arguments(run_id),
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

    def status(self, job_id: str) -> Optional[JobOutcome]:
        try:
            run = self.client.get_job_run(applicationId=self.s.emr_application_id, jobRunId=job_id)["jobRun"]
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ResourceNotFoundException":
                return JobOutcome(self.engine, job_id, False, "NOT_FOUND", "EMR Serverless has no such job run", {})
            raise
        state = run["state"]
        if state not in self.TERMINAL:
            return None
        return JobOutcome(self.engine, job_id, self.TERMINAL[state], state, safe_detail(run.get("stateDetails", "")),
                          serverless_usage(run))  # fmt: skip

    def usage(self, job_id: str) -> dict:
        """What the job run used (its state-change event does not say)."""
        run = self.client.get_job_run(applicationId=self.s.emr_application_id, jobRunId=job_id)["jobRun"]
        return serverless_usage(run)

    def cancel(self, job_id: str) -> None:
        """Ask EMR to cancel the job run: it goes CANCELLING, then CANCELLED (asynchronous, like its end event)."""
        self.client.cancel_job_run(applicationId=self.s.emr_application_id, jobRunId=job_id)


class Ec2Launcher:
    """A transient cluster per run: one step, terminated when the step ends, whatever its outcome."""

    engine = "ec2"
    STEP_TERMINAL = {"COMPLETED": True, "FAILED": False, "CANCELLED": False, "INTERRUPTED": False}

    def __init__(self, client, settings: Settings):
        self.client, self.s = client, settings

    def cluster_name(self, run_id: str) -> str:
        """Also the step's name: the stack's EventBridge rules match this stack's clusters by its prefix."""
        return f"{self.s.run_name_prefix}-{run_id}"

    def _clusters(self, **filters):
        for page in self.client.get_paginator("list_clusters").paginate(**filters):
            yield from page["Clusters"]

    def find(self, run_id: str) -> Optional[str]:
        """The cluster this run already made, in any state (RunJobFlow has no client token)."""
        name = self.cluster_name(run_id)
        since = datetime.fromtimestamp(run_time(run_id) - FIND_WINDOW_S, tz=timezone.utc)
        return next((c["Id"] for c in self._clusters(CreatedAfter=since) if c["Name"] == name), None)

    def others_active(self, run_id: str) -> int:
        """How many other clusters of this stack still run or will run their step. A cluster whose step ended is
        only winding down (TerminateJobFlows and auto-termination take minutes) and runs no job."""
        prefix, name = self.cluster_name("run-"), self.cluster_name(run_id)
        others = [c["Id"] for c in self._clusters(ClusterStates=ACTIVE_CLUSTER_STATES)
                  if c["Name"].startswith(prefix) and c["Name"] != name]  # fmt: skip
        busy = [c for c in others if self.client.list_steps(ClusterId=c, StepStates=ACTIVE_STEP_STATES).get("Steps")]
        return len(busy)

    def start(self, run_id: str) -> str:
        s = self.s
        name = self.cluster_name(run_id)
        # RunJobFlow has no client token: a retried start first looks for the cluster it may have made.
        found = self.find(run_id)
        if found:
            return found
        _refuse_a_second_job(self.others_active(run_id))
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
        # `timeout` enforces JOB_TIMEOUT_MINUTES on the step: EMR steps have no timeout of their own.
        submit = ["timeout", f"{s.job_timeout_minutes}m", "spark-submit", "--deploy-mode", "cluster",
                  *runtime_options(s, yarn=True)]  # fmt: skip
        submit += shlex.split(s.spark_submit_parameters) + [s.job_entry_uri, *s.job_arguments(run_id)]
        response = _start(
            self.client.run_job_flow,
            Name=name,
            ReleaseLabel=s.emr_release_label,
            LogUri=f"s3://{s.bucket}/{s.logs_prefix}emr-ec2/",
            Applications=[{"Name": "Spark"}],
            Instances=instances,
            Steps=[
                {
                    "Name": name,
                    "ActionOnFailure": "TERMINATE_CLUSTER",
                    "HadoopJarStep": {"Jar": "command-runner.jar", "Args": submit},
                }
            ],
            AutoTerminationPolicy={"IdleTimeout": 3600},  # safety net should the step never be scheduled
            StepConcurrencyLevel=1,
            JobFlowRole=s.emr_instance_profile,
            ServiceRole=s.emr_service_role,
            VisibleToAllUsers=True,
            Tags=[
                {"Key": "run_id", "Value": run_id},
                {"Key": "app", "Value": "image-features"},
                # AmazonEMRServicePolicy_v2 acts only on resources carrying this tag (EMR management guide).
                {"Key": "for-use-with-amazon-emr-managed-policies", "Value": "true"},
            ],
        )
        return response["JobFlowId"]

    def status(self, job_id: str) -> Optional[JobOutcome]:
        """The step's end state; a cluster that ended without one (bootstrap failure, capacity) failed."""
        steps = self.client.list_steps(ClusterId=job_id).get("Steps", [])
        for step in steps:
            state = step["Status"]["State"]
            if state in self.STEP_TERMINAL:
                reason = step["Status"].get("FailureDetails", {}).get("Reason", "")
                return JobOutcome(self.engine, job_id, self.STEP_TERMINAL[state], state, safe_detail(reason))
        cluster = self.client.describe_cluster(ClusterId=job_id)["Cluster"]
        status = cluster["Status"]
        if status["State"].startswith("TERMINATED"):
            reason = safe_detail(status.get("StateChangeReason", {}).get("Message", ""))
            return JobOutcome(self.engine, job_id, False, status["State"], reason, ec2_usage(cluster))
        return None

    def usage(self, job_id: str) -> dict:
        """The cluster's normalized instance hours so far: a step's end comes before the cluster's termination."""
        return ec2_usage(self.client.describe_cluster(ClusterId=job_id)["Cluster"])

    def cancel(self, job_id: str) -> None:
        """Terminate the run's cluster: EMR cancels its step and stops the instances (asynchronous, minutes)."""
        self.client.terminate_job_flows(JobFlowIds=[job_id])


def _refuse_a_second_job(active: int) -> None:
    if active:
        raise StartBlocked(f"{active} active job(s) of this stack that the state item does not know")


def make_launcher(settings: Settings, emr_serverless=None, emr=None):
    if settings.engine == "serverless":
        return ServerlessLauncher(emr_serverless, settings)
    return Ec2Launcher(emr, settings)


def parse_state_event(event: dict) -> Optional[JobOutcome]:
    """EventBridge state change -> outcome if the job reached an end state; None for in-between states."""
    if not isinstance(event, dict):
        return None
    detail_type, detail = event.get("detail-type", ""), event.get("detail") or {}
    state = detail.get("state", "")
    if detail_type == "EMR Serverless Job Run State Change" and state in ServerlessLauncher.TERMINAL:
        return JobOutcome("serverless", detail["jobRunId"], ServerlessLauncher.TERMINAL[state], state,
                          safe_detail(detail.get("stateDetails", "")))  # fmt: skip
    if detail_type == "EMR Step Status Change" and state in Ec2Launcher.STEP_TERMINAL:
        return JobOutcome("ec2", detail["clusterId"], Ec2Launcher.STEP_TERMINAL[state], state,
                          safe_detail(detail.get("message", "")))  # fmt: skip
    if detail_type == "EMR Cluster State Change" and state == "TERMINATED_WITH_ERRORS":
        # The cluster died without a step event (bootstrap failure, capacity): the run failed.
        return JobOutcome("ec2", detail["clusterId"], False, state, safe_detail(detail.get("stateChangeReason", "")))
    return None
