"""The deployed stack on one machine: a moto server holding every resource template.yaml declares, the
functions it names invoked as Lambda would invoke them, and an EMR Serverless that runs the real job.

What is emulated, and how it differs from AWS, is in docs/LOCAL.md."""

from __future__ import annotations

import contextlib
import gzip
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

from tests.localstack.template import ACCOUNT, REGION, ROOT, Template

PY = sys.executable
FUNCTION_PACKAGES = ("trigger", "job_state", "artifacts", "pipeline", "crhelper")  # reloaded at a cold start
FUNCTION_CONTEXT = SimpleNamespace(function_name="local", memory_limit_in_mb=512, aws_request_id="local",
                                   invoked_function_arn=f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:local",
                                   get_remaining_time_in_millis=lambda: 120000)  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Function:
    name: str
    handler: str  # module.attribute, relative to its code folder
    env: dict
    events: dict  # template Events, resolved
    code: Path = None  # its CodeUri: lambdas/, or the folder `sam build` made for it
    layers: list = field(default_factory=list)  # content folders of its layers, mounted at /opt as Lambda does
    module: object = None
    sqs: dict = None  # its SQS event source, if any
    dlq: str = None  # its dead-letter queue URL, if any


@dataclass
class JobRun:
    job_id: str
    name: str
    driver: dict
    timeout_min: int
    log_uri: str
    state: str = "SUBMITTED"
    process: subprocess.Popen = None
    started: float = field(default_factory=time.time)


class LocalStack:
    """Start with start(); stop with stop(). log: where the live log lines go."""

    def __init__(self, config_env: str = "local", log=print, workdir: str | None = None, overrides: dict = None,
                 build_dir: str | None = None, weights: str | None = None):  # fmt: skip
        """build_dir: what `sam build` left (its template.yaml, function and layer folders); without it, the
        source template, lambdas/ and emr_job/Makefile's layer build (cached in out/). weights: the file the
        deployer put at ModelWeights, when that is an s3:// URI."""
        path = Path(build_dir) / "template.yaml" if build_dir else None
        self.template = Template(config_env, overrides, path)
        self.built = build_dir is not None
        self.weights = weights
        self.layers: dict = {}  # layer version ARN -> content folder
        self.responses: dict = {}  # ResponseURL path -> the custom resource's response
        self.log = log
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="image-features-local-"))
        self.functions: dict = {}
        self.rules: list = []  # (function, event name, pattern, retry policy)
        self.schedules: list = []  # (function, event name, seconds between, input)
        self.jobs: dict = {}
        self.drop_end_event_of: set = set()  # job ids whose end event is "lost" (tests)
        self._stop = threading.Event()
        self._threads: list = []
        self._lock = threading.RLock()  # one function invocation at a time, as reserved concurrency would not
        self.events_seen = 0
        self.queue_urls: dict = {}  # ARN -> URL
        self.workdir.mkdir(parents=True, exist_ok=True)
        # CloudWatch Logs' stand-in; one stream for the stack's life, as Powertools keeps the one it starts with
        self.function_logs = open(self.workdir / "functions.log", "a", buffering=1)  # noqa: SIM115

    # --- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> LocalStack:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port)
        self.server.start()
        os.environ.update(AWS_ENDPOINT_URL=self.endpoint, AWS_DEFAULT_REGION=REGION, AWS_REGION=REGION)
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
        _documented_s3_notifications()
        self._serve_responses()
        self._deployer_uploads()
        self._create_resources()
        self._record_stack()
        return self

    def _deployer_uploads(self) -> None:
        """What the deployer did before `sam deploy`: put the weights file at ModelWeights when it is an S3 URI."""
        spec = self.template.parameters.get("ModelWeights", "imagenet")
        if not spec.startswith("s3://"):
            return
        if not self.weights:
            raise ValueError(f"ModelWeights={spec}: give the local stack the weights file to put there")
        bucket, key = spec[len("s3://") :].split("/", 1)
        s3 = self.client("s3")
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
        s3.upload_file(self.weights, bucket, key)

    def _serve_responses(self) -> None:
        """The presigned https:// ResponseURL CloudFormation gives custom resources: it takes one PUT of the
        response. Its certificate is trusted through SSL_CERT_FILE, as S3's is on AWS."""
        from tests.tls import ResponseServer

        self.response_server = ResponseServer(self.workdir / "tls")
        self.responses = self.response_server.responses
        os.environ["SSL_CERT_FILE"] = self.response_server.cert

    def custom_resource(self, request_type: str, logical: str, props: dict, old: dict | None = None,
                        physical: str | None = None, timeout: float = 900) -> dict:  # fmt: skip
        """Invoke a custom resource's function as CloudFormation does, and wait for the response it PUTs to the
        ResponseURL (CloudFormation user guide, crpg-ref-requests and crpg-ref-responses). Returns the response."""
        token = props["ServiceToken"]
        function = next(name for name, fn in self.functions.items() if self.template.values[f"{name}.Arn"] == token)
        request_id = str(uuid.uuid4())
        stack_id = f"arn:aws:cloudformation:{REGION}:{ACCOUNT}:stack/{self.template.values['AWS::StackName']}/local"
        event = {
            "RequestType": request_type, "ServiceToken": token, "StackId": stack_id, "RequestId": request_id,
            "ResponseURL": f"{self.response_server.url}/{request_id}",
            "ResourceType": self.template.doc["Resources"][logical]["Type"], "LogicalResourceId": logical,
            "ResourceProperties": _cfn_strings(props, self.functions[function].layers),
        }  # fmt: skip
        if physical:
            event["PhysicalResourceId"] = physical
        if old is not None:
            event["OldResourceProperties"] = _cfn_strings(old, self.functions[function].layers)
        self.invoke(function, event)
        deadline = time.time() + timeout
        while f"/{request_id}" not in self.responses:
            if time.time() > deadline:
                raise TimeoutError(f"{logical}: no response at the ResponseURL")
            time.sleep(0.1)
        response = self.responses[f"/{request_id}"]
        if response["Status"] != "SUCCESS":
            raise RuntimeError(f"{logical} {request_type} failed: {response.get('Reason')}")
        if request_type != "Delete":
            values = self.template.values
            values[logical] = response["PhysicalResourceId"]
            values.update({f"{logical}.{k}": v for k, v in response.get("Data", {}).items()})
            self._refresh_environments()
        return response

    def _refresh_environments(self) -> None:
        """Functions whose environment names a custom resource's output get the new value, as an update would."""
        for logical, fn in self.functions.items():
            env = self._environment(logical)
            if env != fn.env:
                fn.env, fn.module = env, None  # a new cold start with the new configuration

    def _environment(self, logical: str) -> dict:
        """A function's variables as Lambda gets them: the template's Globals, then its own, resolved."""
        t = self.template
        own = t.doc["Resources"][logical].get("Properties", {}).get("Environment", {}).get("Variables", {})
        env = {**t.value(t.doc["Globals"]["Function"]["Environment"]["Variables"]), **t.value(own)}
        return {k: str(v) for k, v in env.items()}

    def serve(self, timers: bool = True) -> None:
        """Run the event source poller, the schedules (unless a test fires them itself) and the EMR runner."""
        for target in (self._poll_queue, self._run_jobs) + ((self._run_schedules,) if timers else ()):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop everything, even when interrupted again meanwhile (a second Ctrl-C)."""
        self._stop.set()
        with contextlib.suppress(KeyboardInterrupt):
            for job in self.jobs.values():
                if job.process and job.process.poll() is None:
                    job.process.kill()
            for thread in self._threads:
                thread.join(timeout=3)  # daemons: whatever is still blocked ends with the process
        with contextlib.suppress(Exception, KeyboardInterrupt):
            self.response_server.stop()
            os.environ.pop("SSL_CERT_FILE", None)
            self.server.stop()
        self.function_logs.close()

    def client(self, service: str):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION)

    # --- resources, from template.yaml ----------------------------------------------------------------------
    def _create_resources(self) -> None:
        t = self.template
        for logical, resource in t.resources():
            kind = resource["Type"]
            props = t.value(resource.get("Properties", {}))
            create = CREATORS.get(kind)
            if create is None:
                raise NotImplementedError(f"the local stack cannot create {kind} ({logical}): add it to CREATORS")
            create(self, logical, props)
        self.bucket = t.values["DataBucket"]
        self.outputs = {name: t.value(o["Value"]) for name, o in t.doc["Outputs"].items()
                        if not o.get("Condition") or t.conditions[o["Condition"]]}  # fmt: skip

    def _record_stack(self) -> None:
        """The stack's record, as CloudFormation keeps it after `sam deploy`: DescribeStacks answers with the deployed
        parameters and outputs, so the operator's commands (image-features status --config-env local) find this stack
        as they find a deployed one. Its one resource, a wait condition handle, creates nothing."""
        import warnings

        t = self.template
        self.stack_name = t.values["AWS::StackName"]
        body = {"Parameters": {name: {"Type": "String", "Default": value} for name, value in t.parameters.items()},
                "Resources": {"Record": {"Type": "AWS::CloudFormation::WaitConditionHandle"}},
                "Outputs": {name: {"Value": str(value)} for name, value in self.outputs.items()}}  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # moto: "not supported by moto's CloudFormation" (nothing to create)
            self.client("cloudformation").create_stack(StackName=self.stack_name, TemplateBody=json.dumps(body))

    def _function(self, logical: str, props: dict) -> None:
        t = self.template
        globals_ = t.value(t.doc["Globals"]["Function"])
        env = self._environment(logical)
        code = t.path.parent / props.get("CodeUri", globals_.get("CodeUri"))
        layers = [self.layers[arn] for arn in props.get("Layers", [])]
        fn = Function(logical, props.get("Handler", globals_.get("Handler")), env, props.get("Events", {}), code,
                      layers)  # fmt: skip
        self.functions[logical] = fn
        t.values[logical] = f"image-features-{t.parameters['Stage']}-{logical}"
        t.values[f"{logical}.Arn"] = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{t.values[logical]}"
        for name, event in fn.events.items():
            p = event.get("Properties", {})
            if event["Type"] == "EventBridgeRule":
                self.rules.append((fn, name, p["Pattern"], p.get("RetryPolicy", {})))
            elif event["Type"] == "ScheduleV2":
                self.schedules.append((fn, name, schedule_seconds(p["ScheduleExpression"]), json.loads(p["Input"])))
            elif event["Type"] == "SQS":
                fn.sqs = p

    # --- functions ----------------------------------------------------------------------------------------
    def invoke(self, logical: str, event: dict) -> dict:
        """Run a function's handler as Lambda would: its environment, a cold start the first time."""
        fn = self.functions[logical]
        with self._lock, contextlib.redirect_stdout(self.function_logs):
            os.environ.update(fn.env)
            if fn.module is None:
                codes = {str(f.code) for f in self.functions.values()}
                sys.path[:] = [str(fn.code)] + [p for p in sys.path if p not in codes]
                for name in [m for m in sys.modules if m.split(".")[0] in FUNCTION_PACKAGES]:
                    del sys.modules[name]
                fn.module = importlib.import_module(fn.handler.rsplit(".", 1)[0].replace("/", "."))
            handler = getattr(fn.module, fn.handler.rsplit(".", 1)[1])
            return handler(event, FUNCTION_CONTEXT)

    def invoke_async(self, logical: str, event: dict, retries: int = 2) -> None:
        """Asynchronous invocation: retried on error, then sent to the function's dead-letter queue."""
        for attempt in range(retries + 1):
            try:
                self.invoke(logical, event)
                return
            except Exception as exc:  # the function raised: Lambda retries
                self.log(f"  {logical} failed (attempt {attempt + 1}): {type(exc).__name__}: {exc}")
        dlq = self.functions[logical].dlq
        if dlq:
            self.client("sqs").send_message(QueueUrl=dlq, MessageBody=json.dumps(event))

    # --- the SQS event source mapping -------------------------------------------------------------------------
    def _poll_queue(self) -> None:
        fn = next(f for f in self.functions.values() if f.sqs)
        source = fn.sqs
        sqs = self.client("sqs")
        arn = source["Queue"]
        url = self.queue_urls[arn]
        window, size = float(source.get("MaximumBatchingWindowInSeconds", 0)), int(source.get("BatchSize", 10))
        while not self._stop.is_set():
            batch, first = [], None
            while len(batch) < size and not self._stop.is_set():
                try:
                    wanted = min(10, size - len(batch))
                    got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=wanted, WaitTimeSeconds=1,
                                              AttributeNames=["All"]).get("Messages", [])  # fmt: skip
                except Exception as exc:  # the stack is going away, or SQS hiccups: the event source polls again
                    if self._stop.is_set():
                        return
                    self.log(f"  polling the queue failed: {type(exc).__name__}: {exc}")
                    self._stop.wait(1)
                    continue
                batch += got
                first = first or (time.time() if batch else None)
                if batch and (not got or time.time() - first >= window):
                    break
            if not batch:
                continue
            self.events_seen += len(batch)
            event = {"Records": [sqs_record(m, arn) for m in batch]}
            try:
                failed = {f["itemIdentifier"] for f in self.invoke(fn.name, event).get("batchItemFailures", [])}
            except Exception as exc:  # the whole batch comes back after the visibility timeout
                self.log(f"  trigger failed: {type(exc).__name__}: {exc}")
                continue
            done = [m for m in batch if m["MessageId"] not in failed]
            for start in range(0, len(done), 10):
                sqs.delete_message_batch(
                    QueueUrl=url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                        for i, m in enumerate(done[start : start + 10])
                    ],
                )

    # --- schedules and the event bus ------------------------------------------------------------------------
    def _run_schedules(self) -> None:
        due = {(fn.name, name): time.time() + seconds for fn, name, seconds, _ in self.schedules}
        while not self._stop.wait(1):
            for fn, name, seconds, payload in self.schedules:
                if time.time() >= due[(fn.name, name)]:
                    due[(fn.name, name)] = time.time() + seconds
                    self.invoke_async(fn.name, payload)

    def fire_schedule(self, name: str) -> None:
        fn, _, _, payload = next(s for s in self.schedules if s[1] == name)
        self.invoke_async(fn.name, payload)

    def emit(self, event: dict) -> int:
        """Put an event on the bus: every rule whose pattern matches delivers it. Returns how many did."""
        from moto.events.models import EventPattern

        delivered = 0
        for fn, _, pattern, retry in self.rules:
            if EventPattern.load(json.dumps(pattern)).matches_event(event):
                self.invoke_async(fn.name, event, retries=min(2, retry.get("MaximumRetryAttempts", 2)))
                delivered += 1
        return delivered

    # --- EMR Serverless ----------------------------------------------------------------------------------------
    def _run_jobs(self) -> None:
        emr = self.client("emr-serverless")
        app = self.template.values["EmrApplication"]
        while not self._stop.wait(1):
            with contextlib.suppress(emr.exceptions.ResourceNotFoundException):  # moto: no runs yet
                for summary in emr.list_job_runs(applicationId=app)["jobRuns"]:
                    if summary["id"] not in self.jobs:
                        run = emr.get_job_run(applicationId=app, jobRunId=summary["id"])["jobRun"]
                        monitoring = run.get("configurationOverrides", {}).get("monitoringConfiguration", {})
                        job = JobRun(run["jobRunId"], run.get("name", ""), run["jobDriver"]["sparkSubmit"],
                                     run.get("executionTimeoutMinutes") or 720,
                                     monitoring.get("s3MonitoringConfiguration", {}).get("logUri", ""))  # fmt: skip
                        self.jobs[job.job_id] = job
                        self._set_state(job, "SUBMITTED")
                        threading.Thread(target=self._execute, args=(job,), daemon=True).start()

    def _execute(self, job: JobRun) -> None:
        """Run exactly the job driver StartJobRun was given, with spark-submit on a local master, as the EMR image
        would: its Spark (the developer's pyspark here), its Python 3.9 with only the runtime archive the stack
        shipped (spark.archives, unpacked as EMR does), never the developer's virtual environment."""
        folder = self.workdir / job.job_id
        folder.mkdir(parents=True, exist_ok=True)
        entry = self._fetch(job.driver["entryPoint"], folder)
        args = [entry if a == job.driver["entryPoint"] else a for a in job.driver.get("entryPointArguments", [])]
        submit, driver_env = local_submit_parameters(
            job.driver.get("sparkSubmitParameters", ""), lambda uri: self._fetch(uri, folder),
            lambda uri, alias: unpack_runtime(self._fetch(uri, folder), folder / alias),
        )  # fmt: skip
        command = [str(spark_home() / "bin" / "spark-submit"), "--master", "local[2]", *submit, entry, *args]
        env = emr_environment(self.endpoint, spark_home(), driver_env)
        self._set_state(job, "RUNNING")
        stdout, stderr = folder / "stdout", folder / "stderr"
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            job.process = subprocess.Popen(command, cwd=folder, env=env, stdout=out, stderr=subprocess.PIPE)
            for line in job.process.stderr:
                err.write(line)
                text = line.decode(errors="replace").rstrip()
                if " INFO emr_job: " in text or text.lstrip().startswith("partition "):
                    self.log(f"  [job {job.job_id[:8]}] {text.split(' INFO emr_job: ')[-1].strip()}")
            try:
                code = job.process.wait(timeout=job.timeout_min * 60)
            except subprocess.TimeoutExpired:
                job.process.kill()
                code = None
        self._keep_logs(job, stdout, stderr)
        if code == 0:
            self._set_state(job, "SUCCESS")
        else:
            detail = (
                "Job run timed out."
                if code is None
                else (f"Job failed, please check complete logs in configured logging destination. ExitCode: {code}.")
            )
            self._set_state(job, "FAILED", detail)

    def _fetch(self, uri: str, folder: Path) -> str:
        return fetch(self.client("s3"), uri, folder)

    def _keep_logs(self, job: JobRun, stdout: Path, stderr: Path) -> None:
        """As EMR Serverless does: <logUri>/applications/<app>/jobs/<job>/SPARK_DRIVER/std{out,err}.gz."""
        if not job.log_uri:
            return
        bucket, prefix = job.log_uri[len("s3://") :].split("/", 1)
        app = self.template.values["EmrApplication"]
        for path in (stdout, stderr):
            key = f"{prefix.rstrip('/')}/applications/{app}/jobs/{job.job_id}/SPARK_DRIVER/{path.name}.gz"
            self.client("s3").put_object(Bucket=bucket, Key=key, Body=gzip.compress(path.read_bytes()))

    def _set_state(self, job: JobRun, state: str, detail: str = "") -> None:
        from moto.emrserverless.models import emrserverless_backends

        previous, job.state = job.state, state
        app = self.template.values["EmrApplication"]
        for run in emrserverless_backends[ACCOUNT][REGION].job_runs.get(app, []):
            if run.id == job.job_id:
                run.state, run.state_details = state, detail
        self.log(f"EMR Serverless job {job.job_id[:8]} ({job.name}): {state}{' - ' + detail if detail else ''}")
        lost = job.job_id in self.drop_end_event_of or "*" in self.drop_end_event_of
        if state in ("SUCCESS", "FAILED", "CANCELLED") and lost:
            self.log(f"  (its state change event is lost on purpose: job {job.job_id[:8]})")
            return
        self.emit(job_state_event(app, job, state, previous, detail))


def _mounted(value: str, layers: list) -> str:
    """Lambda mounts a function's layers at /opt: a path there is the layer's content folder here."""
    if value.startswith("/opt/") and layers:
        return str(Path(layers[0]) / value[len("/opt/") :])
    return value


def _cfn_strings(props: dict, layers: list) -> dict:
    """CloudFormation passes a custom resource's scalar properties as strings; a path under /opt names what the
    function's layer holds there."""
    return {k: v if isinstance(v, (dict, list)) else _mounted(str(v), layers) for k, v in props.items()}


# --- resource creators: one per type template.yaml uses ---------------------------------------------------
def _kms_key(stack, logical, props):
    key = stack.client("kms").create_key(Description=props.get("Description", ""))["KeyMetadata"]
    stack.template.values[logical], stack.template.values[f"{logical}.Arn"] = key["KeyId"], key["Arn"]


def _kms_alias(stack, logical, props):
    stack.client("kms").create_alias(AliasName=props["AliasName"], TargetKeyId=props["TargetKeyId"])


def _bucket(stack, logical, props):
    s3, name = stack.client("s3"), props["BucketName"]
    s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})
    stack.template.values[logical], stack.template.values[f"{logical}.Arn"] = name, f"arn:aws:s3:::{name}"
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration=props["VersioningConfiguration"])
    rules = [  # CloudFormation's shape -> the API's
        {
            "ApplyServerSideEncryptionByDefault": r["ServerSideEncryptionByDefault"],
            "BucketKeyEnabled": r["BucketKeyEnabled"],
        }
        for r in props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    ]
    s3.put_bucket_encryption(Bucket=name, ServerSideEncryptionConfiguration={"Rules": rules})
    s3.put_public_access_block(Bucket=name, PublicAccessBlockConfiguration=props["PublicAccessBlockConfiguration"])
    rules = []
    for rule in props["LifecycleConfiguration"]["Rules"]:
        lifecycle = {"ID": rule["Id"], "Status": rule["Status"], "Filter": {"Prefix": rule.get("Prefix", "")}}
        if "ExpirationInDays" in rule:
            lifecycle["Expiration"] = {"Days": int(rule["ExpirationInDays"])}
        if "NoncurrentVersionExpiration" in rule:
            lifecycle["NoncurrentVersionExpiration"] = {
                "NoncurrentDays": int(rule["NoncurrentVersionExpiration"]["NoncurrentDays"])
            }
        if rule.get("ExpiredObjectDeleteMarker"):
            lifecycle.setdefault("Expiration", {})["ExpiredObjectDeleteMarker"] = True
        rules.append(lifecycle)
    s3.put_bucket_lifecycle_configuration(Bucket=name, LifecycleConfiguration={"Rules": rules})
    queues = [{"QueueArn": q["Queue"], "Events": [q["Event"]],
               "Filter": {"Key": {"FilterRules": [{"Name": r["Name"], "Value": r["Value"]}
                                                  for r in q["Filter"]["S3Key"]["Rules"]]}}}
              for q in props["NotificationConfiguration"]["QueueConfigurations"]]  # fmt: skip
    s3.put_bucket_notification_configuration(Bucket=name, NotificationConfiguration={"QueueConfigurations": queues})


def _bucket_policy(stack, logical, props):
    stack.client("s3").put_bucket_policy(
        Bucket=props["Bucket"], Policy=json.dumps(_plain_http(props["PolicyDocument"]))
    )


def _plain_http(document: dict) -> dict:
    """The moto server speaks plain HTTP on loopback: statements that refuse non-TLS requests are left out."""
    kept = [s for s in document["Statement"] if "aws:SecureTransport" not in json.dumps(s.get("Condition", {}))]
    return {
        **document,
        "Statement": kept
        or [
            {
                "Effect": "Allow",
                "Principal": {"AWS": ACCOUNT},
                "Action": "s3:GetObject",
                "Resource": "arn:aws:s3:::placeholder/*",
            }
        ],
    }


def _table(stack, logical, props):
    name = f"image-features-{stack.template.parameters['Stage']}-{logical}"
    ddb = stack.client("dynamodb")
    ddb.create_table(TableName=name, KeySchema=props["KeySchema"], AttributeDefinitions=props["AttributeDefinitions"],
                     BillingMode=props["BillingMode"])  # fmt: skip
    arn = ddb.describe_table(TableName=name)["Table"]["TableArn"]
    stack.template.values[logical], stack.template.values[f"{logical}.Arn"] = name, arn


def _queue(stack, logical, props):
    name = f"image-features-{stack.template.parameters['Stage']}-{logical}"
    attributes = {k: str(props[k]) for k in ("VisibilityTimeout", "MessageRetentionPeriod") if k in props}
    if "RedrivePolicy" in props:
        attributes["RedrivePolicy"] = json.dumps(props["RedrivePolicy"])
    sqs = stack.client("sqs")
    url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
    arn = f"arn:aws:sqs:{REGION}:{ACCOUNT}:{name}"
    values = stack.template.values
    values[logical], values[f"{logical}.Arn"], values[f"{logical}.QueueName"] = url, arn, name
    stack.queue_urls[arn] = url


def _queue_policy(stack, logical, props):
    for url in props["Queues"]:
        stack.client("sqs").set_queue_attributes(
            QueueUrl=url, Attributes={"Policy": json.dumps(_plain_http(props["PolicyDocument"]))}
        )


def _topic_policy(stack, logical, props):
    for arn in props["Topics"]:
        stack.client("sns").set_topic_attributes(
            TopicArn=arn, AttributeName="Policy", AttributeValue=json.dumps(_plain_http(props["PolicyDocument"]))
        )


def _managed_policy(stack, logical, props):
    name = f"image-features-{stack.template.parameters['Stage']}-{logical}"
    arn = stack.client("iam").create_policy(PolicyName=name, PolicyDocument=json.dumps(props["PolicyDocument"]))
    stack.template.values[logical] = arn["Policy"]["Arn"]


def _role(stack, logical, props):
    name = f"image-features-{stack.template.parameters['Stage']}-{logical}"
    iam = stack.client("iam")
    role = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(props["AssumeRolePolicyDocument"]))
    for arn in props.get("ManagedPolicyArns", []):
        if arn.startswith(f"arn:aws:iam::{ACCOUNT}:"):  # the stack's own; AWS-managed ones are not in moto
            iam.attach_role_policy(RoleName=name, PolicyArn=arn)
    for policy in props.get("Policies", []):
        iam.put_role_policy(RoleName=name, PolicyName=policy["PolicyName"],
                            PolicyDocument=json.dumps(policy["PolicyDocument"]))  # fmt: skip
    stack.template.values[logical], stack.template.values[f"{logical}.Arn"] = name, role["Role"]["Arn"]


def _instance_profile(stack, logical, props):
    iam = stack.client("iam")
    iam.create_instance_profile(InstanceProfileName=props["InstanceProfileName"])
    for role in props["Roles"]:
        iam.add_role_to_instance_profile(InstanceProfileName=props["InstanceProfileName"], RoleName=role)
    stack.template.values[logical] = props["InstanceProfileName"]


def _log_group(stack, logical, props):
    stack.client("logs").create_log_group(logGroupName=props["LogGroupName"])
    stack.template.values[logical] = props["LogGroupName"]


def _application(stack, logical, props):
    app = stack.client("emr-serverless").create_application(name=props["Name"], releaseLabel=props["ReleaseLabel"],
                                                            type="SPARK")  # fmt: skip
    values = stack.template.values
    values[logical], values[f"{logical}.Arn"] = app["applicationId"], app["arn"]


def _topic(stack, logical, props):
    name = f"image-features-{stack.template.parameters['Stage']}-{logical}"
    arn = stack.client("sns").create_topic(Name=name)["TopicArn"]
    stack.template.values[logical], stack.template.values[f"{logical}.TopicName"] = arn, name
    # An inbox standing in for the email subscription: the demo prints what would be mailed.
    sqs = stack.client("sqs")
    inbox = sqs.create_queue(QueueName=f"{name}-inbox")["QueueUrl"]
    inbox_arn = sqs.get_queue_attributes(QueueUrl=inbox, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    stack.client("sns").subscribe(TopicArn=arn, Protocol="sqs", Endpoint=inbox_arn,
                                  Attributes={"RawMessageDelivery": "true"})  # fmt: skip
    stack.alert_inbox = inbox


def _alarm(stack, logical, props):
    keep = {k: props[k] for k in ("AlarmDescription", "Namespace", "MetricName", "Dimensions", "Statistic", "Period",
                                  "EvaluationPeriods", "Threshold", "ComparisonOperator", "TreatMissingData",
                                  "AlarmActions") if k in props}  # fmt: skip
    keep["Dimensions"] = [{"Name": d["Name"], "Value": str(d["Value"])} for d in keep.get("Dimensions", [])]
    stack.client("cloudwatch").put_metric_alarm(AlarmName=logical, **keep)
    stack.template.values[logical] = logical
    stack.template.values[f"{logical}.Arn"] = f"arn:aws:cloudwatch:{REGION}:{ACCOUNT}:alarm:{logical}"


def _dashboard(stack, logical, props):
    stack.client("cloudwatch").put_dashboard(DashboardName=props["DashboardName"], DashboardBody=props["DashboardBody"])
    stack.template.values[logical] = props["DashboardName"]


def _glue_database(stack, logical, props):
    stack.client("glue").create_database(DatabaseInput=props["DatabaseInput"])
    stack.template.values[logical] = props["DatabaseInput"]["Name"]


def _work_group(stack, logical, props):
    stack.client("athena").create_work_group(Name=props["Name"], Description=props["Description"],
                                             Configuration=props["WorkGroupConfiguration"])  # fmt: skip
    stack.template.values[logical] = props["Name"]


def _layer(stack, logical, props):
    """A layer's content: the folder `sam build` made, or emr_job/Makefile's target run here (the same recipe)."""
    name = props.get("LayerName", logical)
    arn = f"arn:aws:lambda:{REGION}:{ACCOUNT}:layer:{name}:1"
    content = stack.template.path.parent / props["ContentUri"] if stack.built else local_layer_build(logical)
    stack.layers[arn] = str(content)
    stack.template.values[logical] = arn


def local_layer_build(logical: str) -> Path:
    """make build-<logical> of emr_job/Makefile into out/local-build/<logical>; the runtime archive is reused
    while requirements.txt is unchanged (it takes a minute and some downloads to build)."""
    from emr_job import package

    arch = {"JobRuntimeX86": "X86_64", "JobRuntimeArm64": "ARM64"}[logical]
    content = ROOT / "out" / "local-build" / logical
    job = content / "job"
    requirements = package.sha256_file(str(ROOT / "emr_job" / "requirements.txt"))
    stamp = content / "requirements.sha256"
    runtime = job / f"runtime-{arch.lower()}.tar.gz"
    reuse = runtime.is_file() and stamp.is_file() and stamp.read_text() == requirements
    package.layer(str(job), arch, runtime=str(runtime) if reuse else None)
    stamp.write_text(requirements)
    return content


def _custom_resource(stack, logical, props):
    stack.custom_resource("Create", logical, props)


def _function(stack, logical, props):
    stack._function(logical, props)
    fn = stack.functions[logical]
    if "DeadLetterQueue" in props:
        fn.dlq = stack.queue_urls[props["DeadLetterQueue"]["TargetArn"]]


CREATORS = {
    "AWS::KMS::Key": _kms_key,
    "AWS::KMS::Alias": _kms_alias,
    "AWS::S3::Bucket": _bucket,
    "AWS::S3::BucketPolicy": _bucket_policy,
    "AWS::DynamoDB::Table": _table,
    "AWS::SQS::Queue": _queue,
    "AWS::SQS::QueuePolicy": _queue_policy,
    "AWS::IAM::ManagedPolicy": _managed_policy,
    "AWS::IAM::Role": _role,
    "AWS::IAM::InstanceProfile": _instance_profile,
    "AWS::Logs::LogGroup": _log_group,
    "AWS::EMRServerless::Application": _application,
    "AWS::SNS::Topic": _topic,
    "AWS::SNS::TopicPolicy": _topic_policy,
    "AWS::SNS::Subscription": lambda stack, logical, props: None,  # the topic's inbox stands in for email
    "AWS::CloudWatch::Alarm": _alarm,
    "AWS::CloudWatch::Dashboard": _dashboard,
    "AWS::Serverless::Function": _function,
    "AWS::Serverless::LayerVersion": _layer,
    "Custom::JobArtifacts": _custom_resource,
    "AWS::Glue::Database": _glue_database,
    "AWS::Athena::WorkGroup": _work_group,
}


# --- shapes AWS sends ----------------------------------------------------------------------------------------
def sqs_record(message: dict, queue_arn: str) -> dict:
    return {
        "messageId": message["MessageId"], "receiptHandle": message["ReceiptHandle"], "body": message["Body"],
        "attributes": message.get("Attributes", {}), "messageAttributes": message.get("MessageAttributes", {}),
        "md5OfBody": message.get("MD5OfBody", ""), "eventSource": "aws:sqs", "eventSourceARN": queue_arn,
        "awsRegion": REGION,
    }  # fmt: skip


def job_state_event(app: str, job: JobRun, state: str, previous: str, detail: str) -> dict:
    """An "EMR Serverless Job Run State Change" event, as EventBridge delivers it (docs: using-eventbridge)."""
    now = datetime.now(timezone.utc)
    return {
        "version": "0", "id": str(uuid.uuid4()), "detail-type": "EMR Serverless Job Run State Change",
        "source": "aws.emr-serverless", "account": ACCOUNT, "time": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": REGION, "resources": [],
        "detail": {"jobRunId": job.job_id, "jobRunName": job.name, "applicationId": app,
                   "arn": f"arn:aws:emr-serverless:{REGION}:{ACCOUNT}:/applications/{app}/jobruns/{job.job_id}",
                   "releaseLabel": "emr-7.10.0", "state": state, "previousState": previous,
                   "stateDetails": detail, "updatedAt": now.isoformat()},
    }  # fmt: skip


def schedule_seconds(expression: str) -> float:
    """rate(N minutes|hours) -> N in seconds; cron(M H ...) -> seconds until its next H:M UTC, then daily."""
    rate = re.fullmatch(r"rate\((\d+) (minute|minutes|hour|hours|day|days)\)", expression)
    if rate:
        unit = {"minute": 60, "hour": 3600, "day": 86400}[rate.group(2).rstrip("s")]
        return int(rate.group(1)) * unit
    return 86400.0


def local_submit_parameters(parameters, fetch, unpack) -> tuple:
    """spark-submit options of EMR Serverless (a string) or of an EMR on EC2 step (a list) for a local master ->
    (spark-submit options, driver environment). --py-files are fetched from S3; spark.archives and --archives
    are fetched and unpacked into the job's folder under their alias, as EMR does beside each driver and
    executor; spark.emr-serverless.driverEnv.* and spark.yarn.appMasterEnv.* (the driver's container in YARN
    cluster mode) become the driver's environment; other confs, spark.pyspark.* among them (which PythonRunner reads
    before any environment), go to the local spark-submit; sizes a laptop does not have, and the deploy mode, go."""
    out, env = [], {}
    words = shlex.split(parameters) if isinstance(parameters, str) else list(parameters)
    driver_env = ("spark.emr-serverless.driverEnv.", "spark.yarn.appMasterEnv.")
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--py-files":
            out += ["--py-files", ",".join(fetch(u) for u in words[i + 1].split(","))]
        elif word in ("--archives", "--conf") and (word == "--archives" or words[i + 1].startswith("spark.archives=")):
            for archive in words[i + 1].split("=", 1)[-1].split(","):
                uri, _, alias = archive.partition("#")
                unpack(uri, alias or Path(uri).name)
        elif word == "--deploy-mode":
            pass
        elif word == "--conf":
            key, _, value = words[i + 1].partition("=")
            prefix = next((p for p in driver_env if key.startswith(p)), None)
            if prefix:
                env[key[len(prefix) :]] = value
            elif not (key.startswith("spark.emr-serverless.")
                      or key in ("spark.executor.memory", "spark.driver.memory", "spark.executor.cores",
                                 "spark.driver.cores", "spark.dynamicAllocation.maxExecutors",
                                 "spark.executor.memoryOverhead", "spark.driver.memoryOverhead")):  # fmt: skip
                out += ["--conf", words[i + 1]]
        else:
            out.append(word)
            i += 1
            continue
        i += 2
    return out + ["--conf", "spark.driver.memory=1g"], env


def fetch(s3, uri: str, folder: Path) -> str:
    """An s3:// object into the job's folder, as EMR localizes --py-files, archives and the entry point."""
    bucket, key = uri[len("s3://") :].split("/", 1)
    path = folder / key.rsplit("/", 1)[-1]
    s3.download_file(bucket, key, str(path))
    return str(path)


def emr_python() -> str:
    """The interpreter that plays the EMR 7.x image's /usr/bin/python3.9 here."""
    import glob
    import shutil

    found = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9.*/bin/python3.9"))) or [
        shutil.which("python3.9")
    ]  # pyenv's shims come last: they exist even where 3.9 is not installed
    if not found[-1]:
        raise RuntimeError("no Python 3.9 here: the local EMR runs the job on the EMR image's Python version")
    return found[-1]


def unpack_runtime(archive: str, target: Path) -> None:
    """Unpack the runtime archive as Spark does; its interpreter links name the EMR image's Python, which is
    this machine's Python 3.9 here (the one change made to what the stack shipped)."""
    import tarfile

    with tarfile.open(archive) as tar:
        tar.extractall(target)  # noqa: S202  (an archive this stack built)
    python = emr_python()
    for link in (target / "bin").iterdir():
        if link.is_symlink() and os.readlink(link).startswith("/usr/bin/python"):
            link.unlink()
            link.symlink_to(python)
    config = target / "pyvenv.cfg"
    config.write_text(re.sub(r"^home = .*$", f"home = {Path(python).parent}", config.read_text(), flags=re.M))


def emr_environment(endpoint: str, spark_home: Path, driver_env: dict) -> dict:
    """What a job's process sees on EMR: its Spark, its credentials and region, nothing of the developer's
    shell (no virtual environment, no PYTHONPATH, no PATH entries of the venv)."""
    keep = ("HOME", "JAVA_HOME", "LANG", "TMPDIR", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(PATH="/usr/local/bin:/usr/bin:/bin", SPARK_HOME=str(spark_home), AWS_ENDPOINT_URL=endpoint,
               AWS_REGION=REGION, AWS_DEFAULT_REGION=REGION, **driver_env)  # fmt: skip
    # No package index at run time (private subnets): any pip the job ran would fail here
    env.update(PIP_NO_INDEX="1", PIP_INDEX_URL="http://127.0.0.1:9/unreachable")
    return env


# What EMR's /etc/spark/conf/spark-env.sh on the primary node says of Python: both default to the system one.
EMR_SPARK_ENV = """export PYSPARK_PYTHON=${PYSPARK_PYTHON:-/usr/bin/python3}
export PYSPARK_DRIVER_PYTHON=${PYSPARK_DRIVER_PYTHON:-/usr/bin/python3}
"""


def submitter_environment(base: dict, conf_dir: Path) -> dict:
    """spark-submit's own environment on an EMR primary node: the step's, then EMR's spark-env.sh, which
    spark-submit sources (bin/load-spark-env.sh) before the YARN client builds the application master's."""
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "spark-env.sh").write_text(EMR_SPARK_ENV)
    script = 'set -a; source "$1/spark-env.sh"; env -0'
    out = subprocess.run(["bash", "-c", script, "bash", str(conf_dir)], env=base, capture_output=True, check=True)
    return dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)


def yarn_app_master_environment(app_master_env: dict, submitter: dict) -> dict:
    """The application master's environment (the driver's, in cluster mode) as Spark 3.5's YARN client builds it:
    spark.yarn.appMasterEnv.* first, then PYSPARK_DRIVER_PYTHON and PYSPARK_PYTHON copied from spark-submit's own
    environment where those did not set them, and PYTHONHASHSEED (yarn/Client.scala setupLaunchEnv, v3.5.9 L934-942)."""
    env = dict(app_master_env)
    for name in ("PYSPARK_DRIVER_PYTHON", "PYSPARK_PYTHON"):
        if name not in env and name in submitter:
            env[name] = submitter[name]
    if "PYTHONHASHSEED" in submitter:
        env["PYTHONHASHSEED"] = submitter["PYTHONHASHSEED"]
    return env


def spark_home() -> Path:
    """EMR's Spark: the developer's pyspark here (the same 3.5 minor)."""
    return Path(PY).parent.parent / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages" / (
        "pyspark")  # fmt: skip


def _documented_s3_notifications() -> None:
    """moto's S3 notifications, corrected to AWS's documented shape (notification-content-structure): a
    sequencer and versionId on every record, and ObjectRemoved:DeleteMarkerCreated when a delete in a versioned
    bucket creates a delete marker (moto sends nothing then)."""
    from moto.s3 import models, notifications

    if getattr(notifications, "_documented", False):
        return
    original_event = notifications._get_s3_event
    counter = iter(range(1, 1 << 62))

    def documented(event_name, bucket, key, notification_id):
        body = original_event(event_name, bucket, key, notification_id)
        obj = body["Records"][0]["s3"]["object"]
        obj["sequencer"] = f"{int(time.time() * 1000):012X}{next(counter):08X}"
        if getattr(key, "version_id", None) and bucket.is_versioned:
            obj["versionId"] = str(key.version_id)
        if event_name.endswith("DeleteMarkerCreated") or event_name.startswith("s3:ObjectRemoved"):
            obj.pop("eTag", None)
            obj.pop("size", None)
        return body

    original_delete = models.S3Backend.delete_object

    def delete_object(self, bucket_name, key_name, version_id=None, bypass=False):
        bucket = self.get_bucket(bucket_name)
        versions_before = len(bucket.keys.getlist(key_name, [])) if key_name in bucket.keys else 0
        result = original_delete(self, bucket_name, key_name, version_id=version_id, bypass=bypass)
        if bucket.is_versioned and result[0]:
            if version_id is None:
                marker = bucket.keys.get(key_name)
                marker = SimpleNamespace(name=key_name, etag="", size=0, version_id=marker.version_id)
                notifications.send_event(self.account_id,
                                         notifications.S3NotificationEvent.OBJECT_REMOVED_DELETE_MARKER_CREATED_EVENT,
                                         bucket, marker)  # fmt: skip
            elif key_name in bucket.keys and len(bucket.keys.getlist(key_name)) < versions_before:
                gone = SimpleNamespace(name=key_name, etag="", size=0, version_id=version_id)
                notifications.send_event(self.account_id, notifications.S3NotificationEvent.OBJECT_REMOVED_DELETE_EVENT,
                                         bucket, gone)  # fmt: skip
        return result

    notifications._get_s3_event = documented
    models.S3Backend.delete_object = delete_object
    notifications._documented = True
