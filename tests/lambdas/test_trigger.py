"""Trigger function against moto: every event shape, coalescing, at-least-once safety, faults."""

import threading
import time

from botocore.exceptions import ClientError

from tests.lambdas.conftest import (
    BUCKET,
    eventbridge_s3,
    job_runs,
    metrics_out,
    pending_keys,
    run_manifest,
    s3_record,
    serverless_state,
    sqs_event,
)


def started_manifest(aws) -> dict:
    runs = job_runs(aws)
    assert len(runs) == 1, runs
    return run_manifest(aws, runs[0]["name"])


def test_sqs_batch_decodes_every_key_and_starts_one_run(aws, trigger, lambda_context):
    # Given two SQS messages, each an S3 notification with several records and encoded keys
    keys = ["images/Apple Red/café 1.jpg", "images/Apple Red/a+b.PNG", "images/Kiwi/x (1).jpeg"]
    keys2 = ["images/Pêche/été.webp", "images/Kiwi/100%.tif"]
    event = sqs_event([{"Records": [s3_record(k) for k in keys]}, {"Records": [s3_record(k) for k in keys2]}])

    # When the trigger handles it
    response = trigger.lambda_handler(event, lambda_context)

    # Then exactly one run starts, and its manifest names every image, decoded
    assert response == {"batchItemFailures": []}
    manifest = started_manifest(aws)
    assert manifest["added"] == sorted(f"s3://{BUCKET}/{k}" for k in keys + keys2)
    assert manifest["removed"] == []
    run = aws.emrs.get_job_run(applicationId=aws.app_id, jobRunId=job_runs(aws)[0]["id"])["jobRun"]
    args = run["jobDriver"]["sparkSubmit"]["entryPointArguments"]
    assert args[args.index("--manifest") + 1] == f"s3://{BUCKET}/manifests/runs/{manifest['run_id']}.json"
    assert args[args.index("--weights") + 1] == f"s3://{BUCKET}/artifacts/model/mobilenet_v2.weights.h5"
    assert (
        "--py-files s3://photos-eu/artifacts/job/emr_job.zip"
        in run["jobDriver"]["sparkSubmit"]["sparkSubmitParameters"]
    )


def test_non_images_and_test_events_are_ignored_and_counted(aws, trigger, lambda_context, capsys):
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
    assert job_runs(aws) == [] and pending_keys(aws) == []
    assert metrics_out(capsys.readouterr().out)["EventsIgnored"] == 6


def test_direct_s3_and_eventbridge_events(aws, trigger, lambda_context):
    # A bucket wired straight to the function
    out = trigger.lambda_handler({"Records": [s3_record("images/Kiwi/k 1.jpg")]}, lambda_context)
    assert out["images"] == 1 and out["run_started"]
    assert started_manifest(aws)["added"] == [f"s3://{BUCKET}/images/Kiwi/k 1.jpg"]

    # EventBridge events: keys arrive unencoded, so a '+' stays a '+'; while the run is active they wait
    created = trigger.lambda_handler(eventbridge_s3("images/Kiwi/a+b.jpg"), lambda_context)
    deleted = trigger.lambda_handler(eventbridge_s3("images/Kiwi/old.jpg", "Object Deleted"), lambda_context)
    assert created["run_started"] is None and deleted["run_started"] is None
    assert len(pending_keys(aws)) == 3


def test_malformed_bodies_go_to_the_dead_letter_queue_once(aws, trigger, lambda_context):
    event = sqs_event(["not json {", {"hello": "world"}, {"Records": [s3_record("images/Kiwi/ok.jpg")]}])

    response = trigger.lambda_handler(event, lambda_context)

    # Not reported as failures (a retry cannot fix them), but kept in the DLQ with the reason
    assert response == {"batchItemFailures": []}
    dead = aws.sqs.receive_message(QueueUrl=aws.dlq, MaxNumberOfMessages=10, MessageAttributeNames=["All"])
    assert sorted(m["MessageAttributes"]["source_message_id"]["StringValue"] for m in dead["Messages"]) == [
        "msg-00000",
        "msg-00001",
    ]
    assert len(job_runs(aws)) == 1


def test_redelivery_never_starts_a_second_run(aws, trigger, job_state, lambda_context):
    records = [s3_record(f"images/Kiwi/{i}.jpg") for i in range(5)]
    trigger.lambda_handler(sqs_event([{"Records": records}]), lambda_context)
    job = job_runs(aws)[0]
    job_state.lambda_handler(serverless_state(job["id"], aws.app_id, "SUCCESS"), lambda_context)

    # The same S3 events again, in a new SQS message (new messageId): idempotency answers
    trigger.lambda_handler(sqs_event([{"Records": records[2:]}, {"Records": records[:2]}]), lambda_context)
    assert len(job_runs(aws)) == 1 and pending_keys(aws) == []

    # Even once the idempotency records have expired, the ledger of processed sequencers stops it
    for item in aws.ddb.scan(TableName="runs")["Items"]:
        aws.ddb.delete_item(TableName="runs", Key={"id": item["id"]})
    trigger.lambda_handler(sqs_event([{"Records": records}]), lambda_context)
    assert len(job_runs(aws)) == 1 and pending_keys(aws) == []


def test_start_failure_fails_the_items_releases_the_lock_and_loses_nothing(aws, trigger, lambda_context):
    event = sqs_event([{"Records": [s3_record("images/Kiwi/a.jpg")]}, {"Records": [s3_record("images/Kiwi/b.jpg")]}])
    real_start = trigger.PIPELINE.launcher.start

    def throttled(*args, **kwargs):
        raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}, "StartJobRun")

    aws.monkeypatch.setattr(trigger.PIPELINE.launcher, "start", throttled)
    response = trigger.lambda_handler(event, lambda_context)

    assert response == {"batchItemFailures": [{"itemIdentifier": "msg-00000"}, {"itemIdentifier": "msg-00001"}]}
    assert trigger.PIPELINE.lock.active() is None
    assert len(pending_keys(aws)) == 1

    # SQS redelivers; this time EMR answers
    aws.monkeypatch.setattr(trigger.PIPELINE.launcher, "start", real_start)
    assert trigger.lambda_handler(event, lambda_context) == {"batchItemFailures": []}
    assert len(started_manifest(aws)["added"]) == 2


def test_burst_of_10000_records_over_several_invocations_is_one_run(aws, lambda_context, capsys):
    from tests.lambdas.conftest import load

    aws.monkeypatch.setenv("QUIET_SECONDS", "60")
    trigger = load("trigger.app")
    keys = [f"images/Label {i % 131}/img_{i:05d}.jpg" for i in range(10000)]
    for part in range(4):  # 4 invocations of 2,500 records, 10 records per SQS message
        chunk = keys[part * 2500 : (part + 1) * 2500]
        bodies = [{"Records": [s3_record(k) for k in chunk[i : i + 10]]} for i in range(0, len(chunk), 10)]
        assert trigger.lambda_handler(sqs_event(bodies), lambda_context) == {"batchItemFailures": []}
    assert job_runs(aws) == []  # still arriving: nothing starts yet
    ticks = aws.sqs.get_queue_attributes(QueueUrl=aws.queue, AttributeNames=["ApproximateNumberOfMessagesDelayed"])
    assert int(ticks["Attributes"]["ApproximateNumberOfMessagesDelayed"]) == 4

    # The delayed tick comes back after the quiet period
    aws.monkeypatch.setattr(trigger.PIPELINE, "clock", lambda: time.time() + 61)
    trigger.lambda_handler(sqs_event([{"image-features": "tick"}]), lambda_context)

    manifest = started_manifest(aws)
    assert manifest["added"] == sorted(f"s3://{BUCKET}/{k}" for k in keys)
    assert metrics_out(capsys.readouterr().out)["ImagesQueued"] == 10000


def test_second_burst_waits_for_the_active_run_then_one_more_run(aws, trigger, job_state, lambda_context):
    trigger.lambda_handler(sqs_event([{"Records": [s3_record("images/A/first.jpg")]}]), lambda_context)
    first = job_runs(aws)[0]
    second = [f"images/B/{i}.jpg" for i in range(300)]
    for part in range(3):
        bodies = [{"Records": [s3_record(k)]} for k in second[part * 100 : (part + 1) * 100]]
        trigger.lambda_handler(sqs_event(bodies), lambda_context)
    assert len(job_runs(aws)) == 1  # deferred while the first run is active

    result = job_state.lambda_handler(serverless_state(first["id"], aws.app_id, "SUCCESS"), lambda_context)

    runs = job_runs(aws)
    assert len(runs) == 2 and result["next_run"] in {r["name"] for r in runs}
    assert run_manifest(aws, result["next_run"])["added"] == sorted(f"s3://{BUCKET}/{k}" for k in second)


def test_two_concurrent_lock_attempts_have_one_winner(aws, trigger):
    lock = trigger.PIPELINE.lock
    barrier, wins = threading.Barrier(8), []

    def contend(owner):
        barrier.wait()
        if lock.acquire(owner, 600):
            wins.append(owner)

    threads = [threading.Thread(target=contend, args=(f"invocation-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert lock.active().owner == wins[0]


def test_a_crashed_holder_cannot_block_forever(aws, trigger):
    lock = trigger.PIPELINE.lock
    assert lock.acquire("crashed", 600)
    assert not lock.acquire("next", 600)
    lock.clock = lambda: time.time() + 601  # the lease has run out
    assert lock.acquire("next", 600)
    assert not lock.release("crashed")  # the old holder can no longer free someone else's lock
