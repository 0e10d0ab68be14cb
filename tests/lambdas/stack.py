"""The AWS resources template.yaml creates, made in moto: shared by the tests and `make invoke`."""

from types import SimpleNamespace

import boto3

BUCKET = "photos-eu"
REGION = "eu-west-3"


def create_stack() -> SimpleNamespace:
    """Call inside mock_aws(). Returns clients, resource ids and the functions' environment."""
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    ddb = boto3.client("dynamodb", region_name=REGION)
    ddb.create_table(
        TableName="runs",
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    sqs = boto3.client("sqs", region_name=REGION)
    queue = sqs.create_queue(QueueName="uploads")["QueueUrl"]
    dlq = sqs.create_queue(QueueName="uploads-dlq")["QueueUrl"]
    alerts = sqs.create_queue(QueueName="alerts-inbox")["QueueUrl"]
    sns = boto3.client("sns", region_name=REGION)
    topic = sns.create_topic(Name="run-failures")["TopicArn"]
    alerts_arn = sqs.get_queue_attributes(QueueUrl=alerts, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=alerts_arn, Attributes={"RawMessageDelivery": "true"})
    emrs = boto3.client("emr-serverless", region_name=REGION)
    app_id = emrs.create_application(name="features", releaseLabel="emr-7.10.0", type="SPARK")["applicationId"]
    boto3.client("glue", region_name=REGION).create_database(DatabaseInput={"Name": "image_features_dev"})
    # A downstream job's rule on the default bus: this application's events into a queue the tests read
    downstream = sqs.create_queue(QueueName="downstream-inbox")["QueueUrl"]
    downstream_arn = sqs.get_queue_attributes(QueueUrl=downstream, AttributeNames=["QueueArn"])["Attributes"]
    bridge = boto3.client("events", region_name=REGION)
    bridge.put_rule(Name="downstream", EventPattern='{"source": ["image-features"]}')
    bridge.put_targets(Rule="downstream", Targets=[{"Id": "inbox", "Arn": downstream_arn["QueueArn"]}])
    env = {
        "BUCKET": BUCKET,
        "TABLE_NAME": "runs",
        "ENGINE": "serverless",
        "QUEUE_URL": queue,
        "QUIET_SECONDS": "0",
        "DEAD_LETTER_QUEUE_URL": dlq,
        "ALERT_TOPIC_ARN": topic,
        "EMR_APPLICATION_ID": app_id,
        "EMR_RUNTIME_ROLE_ARN": "arn:aws:iam::123456789012:role/emr-runtime",
        "EMR_SERVICE_ROLE": "arn:aws:iam::123456789012:role/emr-service",
        "EMR_INSTANCE_PROFILE": "emr-instance-profile",
        "MAX_ATTEMPTS": "2",
        "RETRY_BASE_SECONDS": "300",
        "MAX_WAIT_SECONDS": "900",
        "GLUE_DATABASE": "image_features_dev",
        "STAGE": "dev",
        # As the JobArtifacts custom resource returns them: one content-keyed folder per deployed version.
        "ARTIFACTS_VERSION": "0123456789abcdef",
        "JOB_ENTRY_URI": f"s3://{BUCKET}/artifacts/job/0123456789abcdef/main.py",
        "JOB_ARCHIVE_URI": f"s3://{BUCKET}/artifacts/job/0123456789abcdef/emr_job.zip",
        "RUNTIME_ARCHIVE_URI": f"s3://{BUCKET}/artifacts/job/0123456789abcdef/runtime-arm64.tar.gz",
        "WEIGHTS_URI": f"s3://{BUCKET}/artifacts/model/fedcba9876543210/mobilenet_v2.weights.h5",
        "POWERTOOLS_SERVICE_NAME": "image-features",
        "POWERTOOLS_METRICS_NAMESPACE": "ImageFeatures",
        "POWERTOOLS_TRACE_DISABLED": "true",
        "AWS_DEFAULT_REGION": REGION,
    }
    return SimpleNamespace(
        s3=s3, ddb=ddb, sqs=sqs, sns=sns, emrs=emrs, emr=boto3.client("emr", region_name=REGION),
        app_id=app_id, queue=queue, dlq=dlq, alerts=alerts, env=env, downstream=downstream,
    )  # fmt: skip


def job_runs(stack) -> list:
    """EMR Serverless job runs of the stack's application."""
    try:
        return stack.emrs.list_job_runs(applicationId=stack.app_id)["jobRuns"]
    except stack.emrs.exceptions.ResourceNotFoundException:  # moto: an application without runs yet
        return []


def set_job_state(stack, job_id: str, state: str) -> None:
    """What EMR would report for a job run: moto reports SUCCESS for every run, so tests set the state."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.emrserverless.models import emrserverless_backends

    for run in emrserverless_backends[DEFAULT_ACCOUNT_ID][REGION].job_runs[stack.app_id]:
        if run.id == job_id:
            run.state = state
            return
    raise KeyError(job_id)
