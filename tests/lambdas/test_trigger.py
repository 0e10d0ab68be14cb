"""Trigger function against moto: every event shape, one run per burst, duplicates, malformed input, faults."""

import json
import threading

from botocore.exceptions import ClientError

from tests.lambdas.conftest import (
    BUCKET,
    eventbridge_s3,
    job_runs,
    metrics_out,
    s3_record,
    serverless_state,
    sqs_event,
    state_item,
    tune,
)


def batch(keys, at, action="ObjectCreated:Put") -> dict:
    return sqs_event([{"Records": [s3_record(k, action=action, at=at) for k in keys]}])


def test_a_batch_of_uploads_starts_one_run_of_the_whole_job(aws, trigger, clock, lambda_context):
    # Given two SQS messages of S3 notifications with encoded keys, after uploads have been quiet long enough
    keys = ["images/Apple Red/café 1.jpg", "images/Apple Red/a+b.PNG", "images/Kiwi/x (1).jpeg"]
    event = sqs_event([{"Records": [s3_record(k, at=clock.now) for k in keys]},
                       {"Records": [s3_record("images/Pêche/été.webp", at=clock.now)]}])  # fmt: skip
    tune(aws, trigger, quiet_seconds=0)

    # When the trigger handles it
    response = trigger.lambda_handler(event, lambda_context)

    # Then exactly one run starts, of the whole job: it lists images/ itself, so no key is passed to it
    assert response == {"batchItemFailures": []}
    [job] = job_runs(aws)
    driver = aws.emrs.get_job_run(applicationId=aws.app_id, jobRunId=job["id"])["jobRun"]["jobDriver"]["sparkSubmit"]
    args = driver["entryPointArguments"]
    assert args[args.index("--input") + 1] == f"s3://{BUCKET}/images/"
    assert args[args.index("--output") + 1] == f"s3://{BUCKET}/results/"
    assert "--manifest" not in args and not any("images/Apple" in a for a in args)
    # ... told which launch it is (its run markers are this run's; others' are of dead runs)
    assert args[args.index("--launch-id") + 1] == state_item(aws)["run"]["M"]["run_id"]["S"] == job["name"]
    # ... with the job, its runtime and the weights of the deployed version (JobArtifacts' content-keyed folders)
    env = aws.env
    assert args[args.index("--weights") + 1] == env["WEIGHTS_URI"]
    # ... and the prices its report estimates the run's cost with, the same as the state item's last_run
    assert args[args.index("--price-vcpu-hour") + 1] == env["PRICE_VCPU_HOUR"]
    assert args[args.index("--price-gb-hour") + 1] == env["PRICE_GB_HOUR"]
    assert driver["entryPoint"] == env["JOB_ENTRY_URI"]
    params = driver["sparkSubmitParameters"]
    assert f"--py-files {env['JOB_ARCHIVE_URI']}" in params
    assert f"--conf spark.archives={env['RUNTIME_ARCHIVE_URI']}#environment" in params
    driver_env = "spark.emr-serverless.driverEnv."
    executor_envs = ("spark.emr-serverless.executorEnv.", "spark.executorEnv.")
    for conf in (driver_env + "PYSPARK_DRIVER_PYTHON", driver_env + "PYSPARK_PYTHON",
                 *(e + "PYSPARK_PYTHON" for e in executor_envs)):  # fmt: skip
        assert f"--conf {conf}=./environment/bin/python" in params
    assert state_item(aws)["run"]["M"]["job_id"]["S"] == job["id"]


def test_non_images_and_test_events_are_ignored_and_counted(aws, trigger, clock, lambda_context, capsys):
    bodies = [
        {"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2026-11-24T10:00:00Z", "Bucket": BUCKET},
        {"Records": [s3_record("images/Kiwi/")]},  # folder marker
        {"Records": [s3_record("results/report.json")]},  # our own output: no loop
        {"Records": [s3_record("images/Kiwi/notes.txt")]},
        {"Records": [s3_record("images/Kiwi/a.jpg", bucket="someone-else")]},
        {"Records": [s3_record("images/Kiwi/a.jpg", action="ObjectRestore:Completed")]},
    ]
    response = trigger.lambda_handler(sqs_event(bodies), lambda_context)

    assert response == {"batchItemFailures": []}
    assert job_runs(aws) == [] and "gen" not in state_item(aws)
    assert metrics_out(capsys.readouterr().out)["EventsIgnored"] == 6


def test_forged_event_names_never_reach_a_log_line(aws, logs, trigger, clock, lambda_context, capsys):
    # Given SQS bodies whose event name and detail-type are object keys (anyone who may send to the queue can
    # forge them), beside AWS's own names of events that change nothing
    key = "images/Zoë Dupont/passport scan.jpg"
    bodies = [
        {"source": "aws.s3", "detail-type": key, "detail": {"bucket": {"name": BUCKET}, "object": {"key": "x"}}},
        {"Records": [s3_record("images/Kiwi/a.jpg", action=key)]},
        {"source": "aws.s3", "detail-type": "Object Tags Added", "detail": {}},
        {"Records": [s3_record("images/Kiwi/a.jpg", action="ObjectTagging:Put")]},
    ]

    # When the trigger handles them
    response = trigger.lambda_handler(sqs_event(bodies), lambda_context)

    # Then nothing is lost or dead-lettered, and the log counts the forged ones under one bucket, AWS's by name
    assert response == {"batchItemFailures": []}
    out = logs.getvalue() + capsys.readouterr().out
    assert "Zo" not in out and "passport" not in out
    [handled] = [json.loads(line) for line in out.splitlines() if '"message":"batch handled"' in line]
    assert handled["ignored"] == {"unknown event": 2, "event Object Tags Added": 1, "event ObjectTagging:Put": 1}
    assert metrics_out(out)["EventsIgnored"] == 4


def test_deletions_lifecycle_expiry_and_eventbridge_events_all_mark_the_pipeline(aws, trigger, clock, lambda_context):
    # Given one run active
    tune(aws, trigger, quiet_seconds=0)
    trigger.lambda_handler(batch(["images/Kiwi/a.jpg"], clock.now), lambda_context)
    clock.advance(120)

    # When a deletion, a lifecycle expiry (not an ObjectRemoved event) and EventBridge events arrive
    trigger.lambda_handler(batch(["images/Kiwi/a.jpg"], clock.now, "ObjectRemoved:Delete"), lambda_context)
    trigger.lambda_handler(batch(["images/Kiwi/b.jpg"], clock.now, "LifecycleExpiration:Delete"), lambda_context)
    created = trigger.lambda_handler(eventbridge_s3("images/Kiwi/a+b.jpg", at=clock.now), lambda_context)
    deleted = trigger.lambda_handler(eventbridge_s3("images/Kiwi/o.jpg", "Object Deleted", at=clock.now),
                                     lambda_context)  # fmt: skip

    # Then each marked the pipeline for the next run, and none started a second run beside the active one
    assert int(state_item(aws)["gen"]["N"]) == 5
    assert created["reason"] == deleted["reason"] == "active"
    assert len(job_runs(aws)) == 1


def test_a_burst_becomes_one_run_once_uploads_settle(aws, trigger, clock, lambda_context):
    # Given QUIET_SECONDS=60 and batches arriving 20 s apart
    tune(aws, trigger, quiet_seconds=60)
    for i in range(4):
        trigger.lambda_handler(batch([f"images/Kiwi/{i}.jpg"], clock.now), lambda_context)
        clock.advance(20)

    # Then nothing started yet, and each batch left a delayed tick to check again
    assert job_runs(aws) == []
    ticks = aws.sqs.receive_message(QueueUrl=aws.queue, MaxNumberOfMessages=10)
    assert ticks.get("Messages") is None  # delayed: invisible for QUIET_SECONDS
    attributes = aws.sqs.get_queue_attributes(QueueUrl=aws.queue, AttributeNames=["ApproximateNumberOfMessagesDelayed"])
    assert attributes["Attributes"]["ApproximateNumberOfMessagesDelayed"] == "4"

    # When the tick comes back after the quiet period
    clock.advance(60)
    trigger.lambda_handler(sqs_event([{"image-features": "tick"}]), lambda_context)

    # Then one run starts, for the whole burst
    assert len(job_runs(aws)) == 1


def test_a_trickle_that_never_settles_still_starts_within_max_wait(aws, trigger, clock, lambda_context):
    tune(aws, trigger, quiet_seconds=60)
    tune(aws, trigger, max_wait_seconds=300)
    started_after = None
    for i in range(20):  # an upload every 30 s, closer together than QUIET_SECONDS
        trigger.lambda_handler(batch([f"images/Kiwi/{i}.jpg"], clock.now), lambda_context)
        if job_runs(aws) and started_after is None:
            started_after = i * 30
        clock.advance(30)
    assert started_after == 300 and len(job_runs(aws)) == 1


def test_late_duplicates_of_changes_a_run_already_saw_start_nothing(aws, trigger, job_state, clock, lambda_context):
    # Given a run that started after some uploads (delivered two minutes after they happened), and succeeded
    tune(aws, trigger, quiet_seconds=0)
    records = batch([f"images/Kiwi/{i}.jpg" for i in range(5)], clock.now - 120)
    trigger.lambda_handler(records, lambda_context)
    clock.advance(600)
    [job] = job_runs(aws)
    job_state.lambda_handler(serverless_state(job["id"], aws.app_id, "SUCCESS"), lambda_context)

    # When the same S3 events are delivered again, an hour later, in new SQS messages
    clock.advance(3600)
    trigger.lambda_handler(records, lambda_context)

    # Then nothing is marked and no run starts: the run listed images/ after those changes happened
    item = state_item(aws)
    assert item["gen"]["N"] == item["processed_gen"]["N"] == "1"
    assert len(job_runs(aws)) == 1


def test_every_malformed_shape_is_dead_lettered_while_valid_messages_proceed(aws, trigger, clock, lambda_context):
    deep = "[" * 5000 + "]" * 5000
    record = s3_record("images/Kiwi/ok.jpg")
    malformed = [
        "not json {", "", "null", "42", "[]", '"a string"', deep, json.dumps({"hello": "world"}),
        {"Records": "not a list"}, {"Records": [None]}, {"Records": [42]}, {"Records": [{}]},
        {"Records": [{**record, "eventName": None}]}, {"Records": [{**record, "s3": None}]},
        {"Records": [{**record, "s3": {"bucket": {"name": BUCKET}, "object": {"key": None}}}]},
        {"Records": [{**record, "s3": {"bucket": {"name": BUCKET}, "object": {"key": 12345}}}]},
        {"Records": [{**record, "s3": {"bucket": None, "object": {"key": "images/a.jpg"}}}]},
        {"Records": [{**record, "s3": {"object": {"key": "images/a.jpg"}}}]},
        {"Type": "Notification", "Message": "not json"},
        {"Type": "Notification", "Message": json.dumps({"Type": "Notification", "Message": "{}"})},
        {"source": "aws.s3", "detail-type": "Object Created", "detail": None},
        {"source": "aws.s3", "detail-type": "Object Created", "detail": {"bucket": {"name": BUCKET}, "object": {}}},
        {"source": "aws.s3", "detail-type": "Object Created", "detail": {"bucket": "x", "object": {"key": 1}}},
    ]  # fmt: skip
    event = sqs_event(malformed + [{"Records": [s3_record("images/Kiwi/ok.jpg", at=clock.now)]}])
    event["Records"].append({"messageId": "msg-nobody", "eventSource": "aws:sqs"})  # no body at all
    tune(aws, trigger, quiet_seconds=0)

    response = trigger.lambda_handler(event, lambda_context)

    # Not failures (a retry cannot fix them), but kept in the DLQ with a reason each; the valid one started a run
    assert response == {"batchItemFailures": []}
    dead = []
    while got := aws.sqs.receive_message(QueueUrl=aws.dlq, MaxNumberOfMessages=10, MessageAttributeNames=["All"]).get(
        "Messages"
    ):
        dead += got
        aws.sqs.delete_message_batch(QueueUrl=aws.dlq, Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)])  # fmt: skip
    assert len(dead) == len(malformed) + 1 == 24
    assert all(m["MessageAttributes"]["reason"]["StringValue"] for m in dead)
    assert len(job_runs(aws)) == 1


def test_a_state_table_outage_fails_the_valid_items_for_redelivery(aws, trigger, clock, lambda_context):
    event = sqs_event(["not json", {"Records": [s3_record("images/Kiwi/a.jpg", at=clock.now)]}])

    def down(*args, **kwargs):
        raise ClientError({"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow"}}, "Update")

    aws.monkeypatch.setattr(trigger.PIPELINE.state.db, "update_item", down)
    response = trigger.lambda_handler(event, lambda_context)

    # The valid message comes back (SQS redelivers it); the malformed one went to the DLQ and does not
    assert response == {"batchItemFailures": [{"itemIdentifier": "msg-00001"}]}
    assert job_runs(aws) == []


def test_an_unconfirmed_start_keeps_the_run_slot_and_never_starts_a_second_job(aws, trigger, job_state, clock,
                                                                                lambda_context):  # fmt: skip
    # Given StartJobRun starts the job but its answer is lost (a timeout after EMR accepted it)
    tune(aws, trigger, quiet_seconds=0)
    launcher = trigger.PIPELINE.launcher
    real_start = launcher.start

    def lost_answer(run_id):
        real_start(run_id)
        raise ClientError({"Error": {"Code": "RequestTimeout", "Message": "no answer"}}, "StartJobRun")

    aws.monkeypatch.setattr(launcher, "start", lost_answer)
    response = trigger.lambda_handler(batch(["images/Kiwi/a.jpg"], clock.now), lambda_context)

    # Then the batch is not failed (the change is recorded) and the slot stays claimed, without a job id
    assert response == {"batchItemFailures": []}
    assert "job_id" not in state_item(aws)["run"]["M"] and len(job_runs(aws)) == 1

    # When more uploads arrive, and later the schedule reconciles
    aws.monkeypatch.setattr(launcher, "start", real_start)
    trigger.lambda_handler(batch(["images/Kiwi/b.jpg"], clock.now), lambda_context)
    clock.advance(400)
    job_state.lambda_handler({"action": "reconcile"}, lambda_context)

    # Then the job that did start is adopted: still one job, now recorded
    [job] = job_runs(aws)
    assert state_item(aws)["run"]["M"]["job_id"]["S"] == job["id"]


def test_concurrent_invocations_start_one_run(aws, trigger, clock, lambda_context):
    # DynamoDB applies a conditional write atomically; moto checks and writes in two steps that threads interleave
    # (a second run started under load, in CI): each write is made atomic here, as the real service makes it.
    from moto.dynamodb.models import DynamoDBBackend

    lock = threading.Lock()
    for name in ("update_item", "put_item", "delete_item"):
        real = getattr(DynamoDBBackend, name)

        def atomic(self, *args, _real=real, **kwargs):
            with lock:
                return _real(self, *args, **kwargs)

        aws.monkeypatch.setattr(DynamoDBBackend, name, atomic)
    tune(aws, trigger, quiet_seconds=0)
    events = [batch([f"images/Kiwi/{i}.jpg"], clock.now) for i in range(8)]
    threads = [threading.Thread(target=trigger.lambda_handler, args=(e, lambda_context)) for e in events]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(job_runs(aws)) == 1


def test_trigger_cost_per_batch_does_not_grow_with_the_batch(aws, trigger, clock, lambda_context):
    from botocore.client import BaseClient

    tune(aws, trigger, quiet_seconds=60)
    calls = []
    real = BaseClient._make_api_call

    def counting(self, name, params):
        calls.append(name)
        return real(self, name, params)

    aws.monkeypatch.setattr(BaseClient, "_make_api_call", counting)
    seen = {}
    for size in (10, 10000):
        calls.clear()
        clock.advance(5)
        trigger.lambda_handler(batch([f"images/Kiwi/{i}.jpg" for i in range(size)], clock.now), lambda_context)
        seen[size] = list(calls)
    # Mark dirty, read the state, one delayed tick: the same three calls for 10 or 10,000 records
    assert seen[10] == seen[10000] == ["UpdateItem", "GetItem", "SendMessage"]
