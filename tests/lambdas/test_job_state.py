"""Job-state function against moto: settling once, retries with backoff, alerts, the schedule's repairs, EC2."""

import json
import math
import sys
import time

import pytest
from botocore.exceptions import ClientError

from tests.lambdas.conftest import (
    BUCKET,
    REGION,
    Clock,
    job_runs,
    load,
    metrics_out,
    s3_record,
    serverless_state,
    set_job_state,
    sqs_event,
    state_item,
    tune,
)


def alerts(aws) -> list:
    got = aws.sqs.receive_message(QueueUrl=aws.alerts, MaxNumberOfMessages=10).get("Messages", [])
    return [json.loads(m["Body"]) for m in got]


def upload(trigger, clock, lambda_context, name="images/A/1.jpg") -> dict:
    return trigger.lambda_handler(sqs_event([{"Records": [s3_record(name, at=clock.now - 120)]}]), lambda_context)


def active_job(aws) -> str:
    return state_item(aws)["run"]["M"]["job_id"]["S"]


def test_success_settles_once_and_changes_during_the_run_start_the_next(aws, trigger, job_state, clock,
                                                                        lambda_context):  # fmt: skip
    # Given a run started, and one more upload while it ran
    upload(trigger, clock, lambda_context)
    first = active_job(aws)
    clock.advance(300)
    upload(trigger, clock, lambda_context, "images/A/2.jpg")  # happened after the run's claim: not covered

    # When EMR reports success, twice (EventBridge is at least once)
    result = job_state.lambda_handler(serverless_state(first, aws.app_id, "SUCCESS"), lambda_context)
    again = job_state.lambda_handler(serverless_state(first, aws.app_id, "SUCCESS"), lambda_context)

    # Then it is settled once, and the next run starts for what came in during the first
    assert result["succeeded"] is True and result["next"] == "started"
    assert again == {"settled": None, "next": "active"}
    assert len(job_runs(aws)) == 2 and active_job(aws) != first
    assert state_item(aws)["last_run"]["M"]["state"]["S"] == "SUCCESS"


def test_a_running_state_is_not_an_end(aws, trigger, job_state, clock, lambda_context):
    upload(trigger, clock, lambda_context)
    job = active_job(aws)
    assert job_state.lambda_handler(serverless_state(job, aws.app_id, "RUNNING"), lambda_context) == {"settled": None}
    assert active_job(aws) == job


def test_an_emr_message_quoting_a_key_is_kept_nowhere(aws, logs, trigger, job_state, clock, lambda_context, capsys):
    # Given a run whose job died on an exception that names an image (EMR copies it into stateDetails)
    upload(trigger, clock, lambda_context)
    failed = serverless_state(active_job(aws), aws.app_id, "FAILED")
    key = "images/Kiwi/Zoë Dupont+copy 1.jpg"
    failed["detail"]["stateDetails"] = f"Job failed: PermissionError: [Errno 13] Permission denied: '{key}'"

    # When the failure is settled
    job_state.lambda_handler(failed, lambda_context)

    # Then the state item, the logs and the alert name the error, never the key nor a part of it
    [alert] = alerts(aws)
    kept = json.dumps(state_item(aws)) + json.dumps(alert) + capsys.readouterr().out + logs.getvalue()
    assert "PermissionError" in alert["detail"] and "withheld" in alert["detail"]
    assert '"message":"run settled"' in logs.getvalue()  # the logs are read
    for part in ("Zoë", "Dupont", "copy 1", "Kiwi"):
        assert part not in kept and part.encode("unicode_escape").decode() not in kept
    # ... while EMR's own texts stay whole
    from pipeline.launchers import safe_detail

    exit_text = "Job failed, please check complete logs in configured logging destination. ExitCode: 1."
    assert safe_detail(exit_text) == exit_text and safe_detail("Job run timed out.") == "Job run timed out."


def test_failures_count_once_back_off_then_give_up_with_an_alert(aws, trigger, job_state, clock, lambda_context):
    # Given a run that fails (MAX_ATTEMPTS=2, RETRY_BASE_SECONDS=300)
    upload(trigger, clock, lambda_context)
    first = active_job(aws)
    failed = serverless_state(first, aws.app_id, "FAILED")
    failed["detail"]["stateDetails"] = "Job failed: OutOfMemoryError"

    # When the failure is delivered, and delivered again (a Lambda retry)
    job_state.lambda_handler(failed, lambda_context)
    job_state.lambda_handler(failed, lambda_context)

    # Then it counts once, alerts once, and the retry waits for its backoff
    item = state_item(aws)
    assert item["failures"]["N"] == "1" and "run" not in item
    [alert] = alerts(aws)
    assert alert["state"] == "FAILED" and "OutOfMemoryError" in alert["detail"] and "retrying in 5" in alert["detail"]
    assert job_state.lambda_handler({"action": "reconcile"}, lambda_context)["next"] == "backoff"

    # When the backoff has passed, the schedule starts attempt 2; it fails too
    clock.advance(301)
    assert job_state.lambda_handler({"action": "reconcile"}, lambda_context)["next"] == "started"
    second = active_job(aws)
    assert state_item(aws)["run"]["M"]["attempt"]["N"] == "2"
    job_state.lambda_handler(serverless_state(second, aws.app_id, "FAILED"), lambda_context)

    # Then it gives up and says so: no more automatic runs, however long we wait
    [alert] = alerts(aws)
    assert "no more automatic runs until a new upload, a new deployment, or images changed" in alert["detail"]
    clock.advance(86400)
    assert job_state.lambda_handler({"action": "reconcile"}, lambda_context)["next"] == "given-up"
    assert len(job_runs(aws)) == 2

    # Until a new upload gives it one more attempt (a daily pass does when images or artifacts changed: below)
    upload(trigger, clock, lambda_context, "images/A/fixed.jpg")
    assert len(job_runs(aws)) == 3


def test_a_failed_alert_publish_is_kept_and_sent_later(aws, trigger, job_state, clock, lambda_context):
    upload(trigger, clock, lambda_context)
    job = active_job(aws)
    real_publish = job_state.PIPELINE.sns.publish

    def sns_down(**kwargs):
        raise ClientError({"Error": {"Code": "InternalError", "Message": "down"}}, "Publish")

    aws.monkeypatch.setattr(job_state.PIPELINE.sns, "publish", sns_down)
    job_state.lambda_handler(serverless_state(job, aws.app_id, "FAILED"), lambda_context)
    assert alerts(aws) == [] and state_item(aws)["alert"]["M"]["state"]["S"] == "FAILED"
    assert state_item(aws)["failures"]["N"] == "1"

    aws.monkeypatch.setattr(job_state.PIPELINE.sns, "publish", real_publish)
    job_state.lambda_handler({"action": "reconcile"}, lambda_context)
    [alert] = alerts(aws)
    assert alert["run_id"] and "alert" not in state_item(aws)
    assert state_item(aws)["failures"]["N"] == "1"  # still counted once


@pytest.mark.parametrize("ended", ["SUCCESS", "FAILED"])
def test_a_lost_end_event_is_settled_by_the_schedule_asking_emr(aws, trigger, job_state, clock, lambda_context, ended):
    # Given a run whose end state change never reaches the function (EMR Serverless events are best effort)
    upload(trigger, clock, lambda_context)
    job = active_job(aws)
    set_job_state(aws, job, "RUNNING")
    assert job_state.lambda_handler({"action": "reconcile"}, lambda_context)["reconciled"] == "running"

    # When EMR has ended it and the schedule comes round
    set_job_state(aws, job, ended)
    result = job_state.lambda_handler({"action": "reconcile"}, lambda_context)

    # Then the run is settled from EMR's own answer
    assert result["reconciled"] == "settled" and result["succeeded"] is (ended == "SUCCESS")
    assert "run" not in state_item(aws)


def test_an_end_event_before_the_job_id_is_recorded_is_settled_later(aws, trigger, job_state, clock, lambda_context):
    # Given a start whose job id was not yet recorded when EMR's (fast) end event arrived
    state = trigger.PIPELINE.state
    real_record = state.record_job
    seen = {}

    def event_first(run, job_id):
        seen["job"] = job_id
        seen["result"] = job_state.lambda_handler(serverless_state(job_id, aws.app_id, "SUCCESS"), lambda_context)
        real_record(run, job_id)

    aws.monkeypatch.setattr(state, "record_job", event_first)
    upload(trigger, clock, lambda_context)
    assert seen["result"]["settled"] is None and active_job(aws) == seen["job"]

    # When the schedule reconciles, EMR says the job succeeded: settled
    assert job_state.lambda_handler({"action": "reconcile"}, lambda_context)["succeeded"] is True
    assert "run" not in state_item(aws)


# --- what each run used and cost, where people look -------------------------------------------------------------
USED = {"vCPUHour": 0.5, "memoryGBHour": 2.0, "storageGBHour": 5.0}
BILLED = {"vCPUHour": 0.6, "memoryGBHour": 2.4, "storageGBHour": 0.0}  # a minute per worker at least; 20 GB free


def emr_measures(aws, job_state, total=USED, billed=BILLED) -> list:
    """GetJobRun answers with what EMR measured (moto gives no totalResourceUtilization and a billed one of zeros).
    Returns the job runs it was asked about."""
    client = job_state.PIPELINE.launcher.client
    real, asked = client.get_job_run, []

    def get_job_run(**kwargs):
        asked.append(kwargs["jobRunId"])
        answer = real(**kwargs)
        answer["jobRun"].update(totalResourceUtilization=dict(total), billedResourceUtilization=dict(billed))
        return answer

    aws.monkeypatch.setattr(client, "get_job_run", get_job_run)
    return asked


def last_run(aws) -> dict:
    return {k: v["S"] for k, v in state_item(aws)["last_run"]["M"].items()}


def test_a_settled_run_records_what_emr_measured_and_its_price(aws, trigger, job_state, clock, lambda_context,
                                                               capsys):  # fmt: skip
    # Given a run, and what EMR measured of it
    upload(trigger, clock, lambda_context)
    job = active_job(aws)
    asked = emr_measures(aws, job_state)
    capsys.readouterr()

    # When its end event comes (it says nothing of resources), and comes again
    job_state.lambda_handler(serverless_state(job, aws.app_id, "SUCCESS"), lambda_context)
    job_state.lambda_handler(serverless_state(job, aws.app_id, "SUCCESS"), lambda_context)

    # Then last_run holds the hours used and billed, and the price of the billed ones at the stack's prices
    last, usd = last_run(aws), 0.6 * 0.042094 + 2.4 * 0.004628
    assert (last["vcpu_hours"], last["memory_gb_hours"], last["storage_gb_hours"]) == ("0.5", "2", "5")
    billed = (last["billed_vcpu_hours"], last["billed_memory_gb_hours"], last["billed_storage_gb_hours"])
    assert billed == ("0.6", "2.4", "0")
    assert last["estimated_usd"] == f"{usd:.4f}" == "0.0364" and last["priced_on"] == "billed"
    assert last["prices_usd"] == "0.042094 per vCPU-hour, 0.004628 per GB-hour" and last["state"] == "SUCCESS"
    # ... asked of EMR once, as metrics too, and still no object key in the state item
    assert asked == [job]
    sent = metrics_out(capsys.readouterr().out)
    assert sent["RunVcpuHours"] == 0.6 and sent["RunMemoryGbHours"] == 2.4 and sent["RunsSucceeded"] == 1
    assert sent["RunEstimatedUsd"] == pytest.approx(usd)
    assert "1.jpg" not in json.dumps(state_item(aws))


def test_a_run_the_schedule_settles_is_measured_from_the_same_answer(aws, trigger, job_state, clock,
                                                                     lambda_context):  # fmt: skip
    # Given a run whose end event was lost, and an EMR that reports no billed figures
    upload(trigger, clock, lambda_context)
    job = active_job(aws)
    asked = emr_measures(aws, job_state, billed={})

    # When the schedule asks EMR and settles it
    assert reconcile(job_state, lambda_context)["reconciled"] == "settled"

    # Then one GetJobRun served both, and the estimate is on the hours used
    last = last_run(aws)
    assert asked == [job] and last["priced_on"] == "used" and "billed_vcpu_hours" not in last
    assert last["estimated_usd"] == f"{0.5 * 0.042094 + 2.0 * 0.004628:.4f}"


def test_resource_use_emr_cannot_tell_never_holds_up_the_settle(aws, trigger, job_state, clock, lambda_context,
                                                                 capsys):  # fmt: skip
    # Given a run that fails, and EMR's GetJobRun failing too
    upload(trigger, clock, lambda_context)
    job = active_job(aws)

    def emr_down(**kwargs):
        raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "slow down"}}, "GetJobRun")

    aws.monkeypatch.setattr(job_state.PIPELINE.launcher.client, "get_job_run", emr_down)
    capsys.readouterr()

    # When its end event comes, twice
    failed = serverless_state(job, aws.app_id, "FAILED")
    results = [job_state.lambda_handler(failed, lambda_context) for _ in range(2)]

    # Then it is settled once with one alert, as ever, and records no figures; the miss is counted
    assert results[0]["succeeded"] is False and results[1]["settled"] is None
    item, last = state_item(aws), last_run(aws)
    assert "run" not in item and item["failures"]["N"] == "1" and last["state"] == "FAILED"
    assert not {"vcpu_hours", "estimated_usd", "billed_vcpu_hours"} & set(last)
    [alert] = alerts(aws)
    assert alert["state"] == "FAILED" and "retrying in 5" in alert["detail"]
    sent = metrics_out(capsys.readouterr().out)
    assert sent["RunUsageUnreadable"] == 1 and sent["RunsFailed"] == 1 and "RunEstimatedUsd" not in sent


def test_without_prices_a_run_is_measured_but_not_priced(aws, trigger, job_state, clock, lambda_context):
    tune(aws, job_state, price_vcpu_hour=None, price_gb_hour=None)
    upload(trigger, clock, lambda_context)
    job = active_job(aws)
    emr_measures(aws, job_state)
    job_state.lambda_handler(serverless_state(job, aws.app_id, "SUCCESS"), lambda_context)
    last = last_run(aws)
    assert last["vcpu_hours"] == "0.5" and "estimated_usd" not in last and "prices_usd" not in last


# --- a run that never ends: cancelled past its timeout, settled once EMR says it ended ----------------------
PAST_TIMEOUT = 180 * 60 + 901  # JOB_TIMEOUT_MINUTES (180) plus TIMEOUT_SLACK_S


def reconcile(job_state, lambda_context) -> dict:
    return job_state.lambda_handler({"action": "reconcile"}, lambda_context)


def cancels(aws, client, fails: int = 0, then: str = "CANCELLING") -> list:
    """Record CancelJobRun calls; the first `fails` raise, the others leave the job in `then` (EMR's asynchronous
    answer: CANCELLING first, CANCELLED later)."""
    calls = []

    def cancel_job_run(applicationId, jobRunId):
        calls.append(jobRunId)
        if len(calls) <= fails:
            raise ClientError({"Error": {"Code": "InternalServerException", "Message": "down"}}, "CancelJobRun")
        set_job_state(aws, jobRunId, then)
        return {"applicationId": applicationId, "jobRunId": jobRunId}

    aws.monkeypatch.setattr(client, "cancel_job_run", cancel_job_run)
    return calls


def test_a_run_past_its_timeout_is_cancelled_once_and_counted_once_then_the_next_run_starts(
    aws, trigger, job_state, clock, lambda_context, capsys
):
    # Given a run EMR keeps running past JOB_TIMEOUT_MINUTES plus the slack (MAX_ATTEMPTS=2)
    upload(trigger, clock, lambda_context)
    stuck = active_job(aws)
    set_job_state(aws, stuck, "RUNNING")
    calls = cancels(aws, job_state.PIPELINE.launcher.client)
    clock.advance(PAST_TIMEOUT)

    # When the reconciler comes round twice while EMR is cancelling it
    first, second = reconcile(job_state, lambda_context), reconcile(job_state, lambda_context)

    # Then it asked EMR to cancel once, alerted once, and the run keeps its slot: EMR has not ended it yet
    assert first["reconciled"] == second["reconciled"] == "cancelling" and calls == [stuck]
    [alert] = alerts(aws)
    assert "cancelled after 195 minutes" in alert["subject"] and alert["state"] == "CANCELLING"
    run = state_item(aws)["run"]["M"]
    assert run["job_id"]["S"] == stuck and "cancel_requested_at" in run and "cancel_sent_at" in run
    assert upload(trigger, clock, lambda_context, "images/A/2.jpg") == {"batchItemFailures": []}
    assert len(job_runs(aws)) == 1  # an upload meanwhile starts nothing beside it

    # When EMR reports it cancelled: its event, a retry of the event, and two reconciler passes
    set_job_state(aws, stuck, "CANCELLED")
    job_state.lambda_handler(serverless_state(stuck, aws.app_id, "CANCELLED"), lambda_context)
    job_state.lambda_handler(serverless_state(stuck, aws.app_id, "CANCELLED"), lambda_context)
    reconcile(job_state, lambda_context)
    reconcile(job_state, lambda_context)

    # Then it counts as one failed attempt, with no second alert, and the back-off holds the next run
    item = state_item(aws)
    assert "run" not in item and item["failures"]["N"] == "1" and alerts(aws) == []
    assert item["last_run"]["M"]["state"]["S"] == "CANCELLED" and "timeout" in item["last_run"]["M"]["cancelled"]["S"]
    assert metrics_out(capsys.readouterr().out)["RunsFailed"] == 1 and calls == [stuck]

    # And once the back-off has passed, the next run starts as usual, and succeeds
    clock.advance(301)
    assert reconcile(job_state, lambda_context)["next"] == "started"
    job_state.lambda_handler(serverless_state(active_job(aws), aws.app_id, "SUCCESS"), lambda_context)
    assert len(job_runs(aws)) == 2 and state_item(aws)["failures"]["N"] == "0"


def test_a_cancel_that_fails_is_asked_again_at_the_next_pass(aws, trigger, job_state, clock, lambda_context):
    upload(trigger, clock, lambda_context)
    stuck = active_job(aws)
    set_job_state(aws, stuck, "RUNNING")
    calls = cancels(aws, job_state.PIPELINE.launcher.client, fails=1)
    clock.advance(PAST_TIMEOUT)

    # When the first cancel call fails, and the reconciler comes round three more times (within the slack)
    reconcile(job_state, lambda_context)
    assert "cancel_sent_at" not in state_item(aws)["run"]["M"] and len(calls) == 1
    for _ in range(3):
        clock.advance(240)
        reconcile(job_state, lambda_context)

    # Then it was asked once more, and only once more, with one alert in all
    assert calls == [stuck, stuck] and "cancel_sent_at" in state_item(aws)["run"]["M"]
    assert len(alerts(aws)) == 1


def test_a_run_emr_does_not_end_after_its_cancel_is_alerted_once_more_and_keeps_its_slot(
    aws, trigger, job_state, clock, lambda_context
):
    upload(trigger, clock, lambda_context)
    stuck = active_job(aws)
    set_job_state(aws, stuck, "RUNNING")
    cancels(aws, job_state.PIPELINE.launcher.client)  # EMR says CANCELLING, and stays there
    clock.advance(PAST_TIMEOUT)
    reconcile(job_state, lambda_context)
    assert len(alerts(aws)) == 1

    # When EMR still has not ended it TIMEOUT_SLACK_S after the cancel, pass after pass
    for _ in range(4):
        clock.advance(300)
        reconcile(job_state, lambda_context)

    # Then a person is told, once, and no second run starts beside it, whatever arrives
    [alert] = alerts(aws)
    assert "minutes after its cancel" in alert["subject"] and "needs a person" in alert["detail"]
    upload(trigger, clock, lambda_context, "images/A/2.jpg")
    clock.advance(3600)
    reconcile(job_state, lambda_context)
    assert len(job_runs(aws)) == 1 and active_job(aws) == stuck and alerts(aws) == []

    # Until EMR reports it ended: then it settles, and the next run follows the back-off
    set_job_state(aws, stuck, "CANCELLED")
    assert reconcile(job_state, lambda_context)["reconciled"] == "settled"
    clock.advance(301)
    assert reconcile(job_state, lambda_context)["next"] == "started" and len(job_runs(aws)) == 2


# --- a start that never confirms: bounded, and never a second job -----------------------------------------
def failing_start(aws, launcher, code: str = "InternalServerException", really: int = 0) -> list:
    """StartJobRun answers with an error each time; the first `really` calls do start the job (a lost answer)."""
    real, calls = launcher.client.start_job_run, []

    def start_job_run(**kwargs):
        calls.append(kwargs["name"])
        if len(calls) <= really:
            real(**kwargs)
        raise ClientError({"Error": {"Code": code, "Message": "try again"}}, "StartJobRun")

    aws.monkeypatch.setattr(launcher.client, "start_job_run", start_job_run)
    return calls


def test_a_start_unconfirmed_past_its_bound_is_one_failed_attempt_with_one_alert(aws, trigger, job_state, clock,
                                                                                lambda_context, capsys):  # fmt: skip
    from pipeline.control import START_CONFIRM_S

    # Given StartJobRun failing with a 5xx for longer than the bound (EMR never made the job)
    reals = {module: module.PIPELINE.launcher.client.start_job_run for module in (trigger, job_state)}
    for module in reals:
        failing_start(aws, module.PIPELINE.launcher)
    upload(trigger, clock, lambda_context)
    claimed = state_item(aws)["run"]["M"]["run_id"]["S"]

    # When the reconciler retries it every 5 minutes until past START_CONFIRM_S
    claimed_at, results = clock.now, []
    while "run" in state_item(aws) and len(results) < 20:
        clock.advance(300)
        results.append(reconcile(job_state, lambda_context)["next"])

    # Then it was retried quietly until the bound, then ended as one failed attempt with one alert
    assert set(results[:-1]) == {"starting"} and results[-1] == "unconfirmed"
    assert claimed_at + START_CONFIRM_S <= clock.now < claimed_at + START_CONFIRM_S + 300
    item = state_item(aws)
    assert "run" not in item and item["failures"]["N"] == "1" and item["last_run"]["M"]["run_id"]["S"] == claimed
    assert item["last_run"]["M"]["state"]["S"] == "START_UNCONFIRMED"
    [alert] = alerts(aws)
    assert alert["state"] == "START_UNCONFIRMED" and "retrying in 5 minutes" in alert["detail"]
    assert metrics_out(capsys.readouterr().out)["RunsFailed"] == 1 and job_runs(aws) == []

    # And the back-off applies: the next attempt is a new run, once EMR answers again
    assert reconcile(job_state, lambda_context)["next"] == "backoff"
    for module, real in reals.items():
        aws.monkeypatch.setattr(module.PIPELINE.launcher.client, "start_job_run", real)
    clock.advance(301)
    assert reconcile(job_state, lambda_context)["next"] == "started"
    [job] = job_runs(aws)
    assert job["name"] != claimed and state_item(aws)["run"]["M"]["attempt"]["N"] == "2"


def test_a_lost_answer_found_past_the_bound_is_adopted_not_failed(aws, trigger, job_state, clock, lambda_context):
    # Given a start whose job EMR did make, and whose every retry fails before reaching EMR's listing
    launcher = job_state.PIPELINE.launcher
    failing_start(aws, trigger.PIPELINE.launcher, code="RequestTimeout", really=1)
    upload(trigger, clock, lambda_context)
    [job] = job_runs(aws)
    assert "job_id" not in state_item(aws)["run"]["M"]

    def throttled(run_id):
        raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "slow down"}}, "ListJobRuns")

    aws.monkeypatch.setattr(launcher, "start", throttled)

    # When the bound has passed and the reconciler asks EMR whether the run's job exists
    clock.advance(1801)
    result = reconcile(job_state, lambda_context)

    # Then its job is adopted: the run is active with it, nothing failed, nobody alerted, no second job
    assert result["next"] == "started" and active_job(aws) == job["id"]
    assert state_item(aws).get("failures", {"N": "0"})["N"] == "0" and alerts(aws) == []
    assert len(job_runs(aws)) == 1


def test_an_unconfirmed_start_emr_cannot_tell_about_keeps_its_claim_and_alerts_once(aws, trigger, job_state, clock,
                                                                                    lambda_context):  # fmt: skip
    # Given starts that fail and an EMR that cannot even list its jobs (a job may exist)
    def down(*args, **kwargs):
        raise ClientError({"Error": {"Code": "InternalServerException", "Message": "down"}}, "ListJobRuns")

    for module in (trigger, job_state):
        aws.monkeypatch.setattr(module.PIPELINE.launcher, "start", down)
        aws.monkeypatch.setattr(module.PIPELINE.launcher, "find", down)
    upload(trigger, clock, lambda_context)
    claimed = state_item(aws)["run"]["M"]["run_id"]["S"]

    # When the bound passes, pass after pass
    clock.advance(1801)
    results = [reconcile(job_state, lambda_context)["next"]]
    for _ in range(3):
        clock.advance(300)
        results.append(reconcile(job_state, lambda_context)["next"])

    # Then the run keeps its claim (no failure, no other run), and a person is told once
    assert results == ["starting"] * 4
    item = state_item(aws)
    assert item["run"]["M"]["run_id"]["S"] == claimed and "failures" not in item
    [alert] = alerts(aws)
    assert alert["state"] == "START_UNCONFIRMED" and "keeps its claim" in alert["detail"]


def foreign_job(aws, state: str = "RUNNING") -> str:
    """A job run of the stack's application that the state item does not know (a reset table, a lost run)."""
    job = aws.emrs.start_job_run(applicationId=aws.app_id, clientToken="other", name="run-20260101T000000Z-0ther000",
                                 executionRoleArn=aws.env["EMR_RUNTIME_ROLE_ARN"])["jobRunId"]  # fmt: skip
    set_job_state(aws, job, state)
    return job


def test_an_active_job_the_state_does_not_know_blocks_a_second_job(aws, trigger, job_state, clock, lambda_context):
    # Given a job of this stack running that the state item does not know
    other = foreign_job(aws)

    # When an upload asks for a run, and the reconciler retries it
    upload(trigger, clock, lambda_context)
    clock.advance(301)
    assert reconcile(job_state, lambda_context)["next"] == "blocked"

    # Then no job starts beside it: one alert, the run keeps its claim and no failure is counted
    assert [j["id"] for j in job_runs(aws)] == [other]
    [alert] = alerts(aws)
    assert alert["state"] == "BLOCKED" and "1 active job(s)" in alert["detail"]
    assert "job_id" not in state_item(aws)["run"]["M"] and "failures" not in state_item(aws)

    # When that job ends, the next pass starts the run
    set_job_state(aws, other, "CANCELLED")
    clock.advance(300)
    assert reconcile(job_state, lambda_context)["next"] == "started"
    assert len(job_runs(aws)) == 2 and alerts(aws) == []


def test_a_refused_start_is_a_failed_attempt_with_an_alert(aws, trigger, clock, lambda_context):
    def refused(**kwargs):
        raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "not allowed"}}, "StartJobRun")

    aws.monkeypatch.setattr(trigger.PIPELINE.launcher.client, "start_job_run", refused)
    result = upload(trigger, clock, lambda_context)
    assert result == {"batchItemFailures": []}
    item = state_item(aws)
    assert "run" not in item and item["failures"]["N"] == "1"
    assert item["last_run"]["M"]["state"]["S"] == "START_REFUSED"
    [alert] = alerts(aws)
    assert "AccessDeniedException" in alert["detail"]


# --- the daily pass: a run only when images/ differs from what the published run listed ---------------------
def put_image(aws, key: str = "images/A/1.jpg", body: bytes = b"\xff\xd8 a photo") -> None:
    aws.s3.put_object(Bucket=BUCKET, Key=key, Body=body)


def publish(aws, **maintenance) -> dict:
    """What a successful run leaves: report.json with the digest of the listing it planned from, computed by the
    job's own function (emr_job/inputs.py) over what the bucket holds now."""
    from emr_job.inputs import inputs_digest

    pages = aws.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="images/")
    listed = [(o["Key"], o["ETag"], o["Size"]) for page in pages for o in page.get("Contents", [])]
    report = {"run_id": "20261125T000000Z-0000beef", "inputs": inputs_digest(listed), "maintenance": maintenance}
    aws.s3.put_object(Bucket=BUCKET, Key="results/report.json", Body=json.dumps(report).encode())
    return report


def daily(job_state, lambda_context) -> dict:
    return job_state.lambda_handler({"action": "daily"}, lambda_context)


def test_the_daily_pass_starts_nothing_when_images_are_unchanged(aws, job_state, clock, lambda_context, capsys):
    # Given images that a published run listed
    put_image(aws)
    put_image(aws, "images/B/2.png")
    publish(aws)

    # When the daily pass comes round, twice
    first, second = daily(job_state, lambda_context), daily(job_state, lambda_context)

    # Then no run starts, the state is left clean, and the pass is counted
    assert first == second == {"daily": "unchanged", "next": "clean"}
    assert job_runs(aws) == [] and "gen" not in state_item(aws)
    assert metrics_out(capsys.readouterr().out)["DailyUnchanged"] == 2


@pytest.mark.parametrize("change", ["added", "changed", "deleted", "expired at the top level"])
def test_the_daily_pass_starts_a_run_for_images_that_changed_without_any_event(aws, job_state, clock,
                                                                               lambda_context, change):  # fmt: skip
    # Given images that a published run listed, one of them directly under images/
    put_image(aws)
    put_image(aws, "images/top.JPG")
    publish(aws)

    # When images/ changes and S3 says nothing (lifecycle expiry, a lost notification)
    if change == "added":
        put_image(aws, "images/A/new.webp")
    elif change == "changed":
        put_image(aws, body=b"\xff\xd8 another photo")
    elif change == "deleted":
        aws.s3.delete_object(Bucket=BUCKET, Key="images/A/1.jpg")
    else:
        aws.s3.delete_object(Bucket=BUCKET, Key="images/top.JPG")
    result = daily(job_state, lambda_context)

    # Then the daily pass starts one run
    assert result == {"daily": "images changed", "next": "started"}
    assert len(job_runs(aws)) == 1


def test_files_that_are_not_images_never_start_a_daily_run(aws, job_state, clock, lambda_context):
    # Given images that a published run listed
    put_image(aws)
    publish(aws)

    # When files the job ignores appear: a note, a folder marker, an image outside images/, a '.jpg' folder
    put_image(aws, "images/A/notes.txt")
    put_image(aws, "images/B/", b"")
    put_image(aws, "elsewhere/3.jpg")
    put_image(aws, "images/C.jpg/", b"")

    # Then nothing starts: a run would publish nothing, and would start again every day
    assert daily(job_state, lambda_context) == {"daily": "unchanged", "next": "clean"}
    assert job_runs(aws) == []


def missing_keys_answer_403(aws, job_state) -> None:
    """S3 as the function meets it: it may read report.json but not list results/, and S3 answers a GetObject of a
    missing key 403 AccessDenied, not 404, to a caller without s3:ListBucket (S3 API reference, GetObject)."""
    client = job_state.PIPELINE.s3
    get = client.get_object

    def get_object(**kwargs):
        try:
            return get(**kwargs)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "NoSuchKey":
                raise
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"},
                               "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject") from None  # fmt: skip

    aws.monkeypatch.setattr(client, "get_object", get_object)


def test_the_first_daily_pass_starts_a_run_for_images_older_than_the_stack(aws, job_state, clock, lambda_context):
    # Given no results yet and an empty images/, and a report S3 answers 403 for while it is missing
    missing_keys_answer_403(aws, job_state)

    # Then nothing is to do: no run starts on an empty bucket
    assert daily(job_state, lambda_context) == {"daily": "unchanged", "next": "clean"}
    assert job_runs(aws) == []

    # When images are there without any event (older than the stack, or their notifications lost)
    put_image(aws)

    # Then the daily pass starts a run
    assert daily(job_state, lambda_context) == {"daily": "no results yet", "next": "started"}
    assert len(job_runs(aws)) == 1


def test_the_next_daily_pass_compares_with_what_the_last_run_published(aws, job_state, clock, lambda_context):
    # Given a daily pass that started a run for an image added without an event
    put_image(aws)
    publish(aws)
    put_image(aws, "images/A/new.jpg")
    assert daily(job_state, lambda_context)["next"] == "started"

    # When the run publishes and settles
    publish(aws)
    job_state.lambda_handler(serverless_state(active_job(aws), aws.app_id, "SUCCESS"), lambda_context)

    # Then the next daily pass starts nothing
    assert daily(job_state, lambda_context) == {"daily": "unchanged", "next": "clean"}
    assert len(job_runs(aws)) == 1


@pytest.mark.parametrize("due", ["past", "future"])
def test_the_daily_pass_runs_a_cleanup_that_is_due(aws, job_state, clock, lambda_context, due):
    from tests.lambdas.conftest import iso

    # Given a published run whose superseded snapshots' files wait for a cleanup run (images/ unchanged)
    put_image(aws)
    publish(aws, cleanup_due_at=iso(clock.now + (-60 if due == "past" else 3600)), oldest_uncompacted_delete="x")

    # Then the daily pass starts a run once it is due, and not before (erased rows are never left to compact)
    expected = {"daily": "cleanup due", "next": "started"} if due == "past" else {"daily": "unchanged", "next": "clean"}
    assert daily(job_state, lambda_context) == expected


def test_a_report_from_an_older_job_starts_one_run_that_records_the_digest(aws, job_state, clock, lambda_context):
    put_image(aws)
    aws.s3.put_object(Bucket=BUCKET, Key="results/report.json", Body=b'{"run_id": "old", "maintenance": {}}')
    assert daily(job_state, lambda_context)["next"] == "started"  # the job stamps it (tests/job/test_inputs_digest.py)


@pytest.mark.parametrize("failure", ["denied", "too slow"])
def test_the_daily_pass_reconciles_when_images_cannot_be_listed(aws, job_state, lambda_context, failure):
    # Given a listing that fails: a permission missing, or too many images to list within the function's timeout
    put_image(aws)
    publish(aws)

    def denied(**kwargs):
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "ListObjectsV2")

    if failure == "denied":
        aws.monkeypatch.setattr(job_state.PIPELINE.s3, "list_objects_v2", denied)
    else:
        aws.monkeypatch.setattr(sys.modules["pipeline.inputs"], "LIST_BUDGET_S", -1)

    # Then the daily pass runs the job as it always did: a doubt costs a run, never a missed change
    assert daily(job_state, lambda_context) == {"daily": "inputs unreadable", "next": "started"}


def test_a_daily_pass_during_a_run_marks_as_before(aws, trigger, job_state, clock, lambda_context):
    # Given a run active for an upload (its listing may predate a later change S3 does not announce)
    put_image(aws)
    upload(trigger, clock, lambda_context)
    job = active_job(aws)

    # When the daily pass comes while it runs, and the run then succeeds
    assert daily(job_state, lambda_context) == {"daily": "run active or due", "next": "active"}
    result = job_state.lambda_handler(serverless_state(job, aws.app_id, "SUCCESS"), lambda_context)

    # Then one more run follows, which lists images/ after the daily pass
    assert result["next"] == "started" and len(job_runs(aws)) == 2


# --- erasure cleanup: a run starts when the published run says its superseded files are due to go ----------
def succeed_with_report(aws, job_state, lambda_context, **maintenance) -> dict:
    """The active run publishes report.json (maintenance as given) and EMR reports its success."""
    publish(aws, **maintenance)
    return job_state.lambda_handler(serverless_state(active_job(aws), aws.app_id, "SUCCESS"), lambda_context)


def test_a_due_cleanup_starts_one_run_at_its_time_without_waiting_for_uploads(aws, trigger, job_state, clock,
                                                                             lambda_context):  # fmt: skip
    from pipeline.state import Conflict

    from tests.lambdas.conftest import iso

    # Given a run that erased an image and published a report asking for a run at T (no further upload)
    put_image(aws)
    upload(trigger, clock, lambda_context)
    due = clock.now + 3300
    assert succeed_with_report(aws, job_state, lambda_context, cleanup_due_at=iso(due))["next"] == "clean"
    item = state_item(aws)
    assert int(item["cleanup_at"]["N"]) == math.ceil(due) and "images/" not in json.dumps(item)

    # When the reconciler comes round before T: nothing starts
    clock.advance(3300 - 60)
    assert reconcile(job_state, lambda_context) == {"reconciled": "start", "next": "clean"}
    assert len(job_runs(aws)) == 1

    # When uploads are arriving at T (a quiet period of 15 minutes not yet reached), and two passes come round
    tune(aws, trigger, quiet_seconds=900)
    tune(aws, job_state, quiet_seconds=900)
    upload(trigger, clock, lambda_context, "images/A/2.jpg")
    assert len(job_runs(aws)) == 1  # the upload alone waits for uploads to settle
    clock.advance(61)  # T, to the second above it
    first = reconcile(job_state, lambda_context)
    set_job_state(aws, active_job(aws), "RUNNING")
    second = reconcile(job_state, lambda_context)

    # Then one run starts at once, and the due time is gone: a pass that read it before cannot mark it again
    assert first == {"reconciled": "cleanup", "next": "started"} and second["reconciled"] == "running"
    assert len(job_runs(aws)) == 2 and "cleanup_at" not in state_item(aws)
    with pytest.raises(Conflict):
        job_state.PIPELINE.state.mark_cleanup(math.ceil(due))

    # And when that run's report says nothing more is due, nothing else starts
    succeed_with_report(aws, job_state, lambda_context, cleanup_due_at=None)
    clock.advance(86400)
    assert reconcile(job_state, lambda_context)["next"] == "clean" and len(job_runs(aws)) == 2


def active_run_id(aws) -> str:
    return state_item(aws)["run"]["M"]["run_id"]["S"]


def test_a_run_that_fails_after_publishing_is_settled_as_published_and_keeps_its_cleanup(
    aws, trigger, job_state, clock, lambda_context
):
    from tests.lambdas.conftest import iso

    # Given MAX_ATTEMPTS=2 and a first attempt that failed
    put_image(aws)
    upload(trigger, clock, lambda_context)
    job_state.lambda_handler(serverless_state(active_job(aws), aws.app_id, "FAILED"), lambda_context)
    clock.advance(301)
    reconcile(job_state, lambda_context)
    assert int(state_item(aws)["failures"]["N"]) == 1

    # When the last attempt erases, publishes (report.json names its launch), then fails after the swap
    due = clock.now + 1900
    report = {**publish(aws, cleanup_due_at=iso(due)), "launch_id": active_run_id(aws)}
    aws.s3.put_object(Bucket=BUCKET, Key="results/report.json", Body=json.dumps(report).encode())
    result = job_state.lambda_handler(serverless_state(active_job(aws), aws.app_id, "FAILED"), lambda_context)

    # Then it is settled as published: no give-up, its cleanup kept, one alert that says what happened
    item = state_item(aws)
    assert result["next"] == "clean" and "given_up_gen" not in item and item["failures"]["N"] == "0"
    assert int(item["cleanup_at"]["N"]) == math.ceil(due)
    assert item["last_run"]["M"]["published"]["S"] == "yes" and item["last_run"]["M"]["state"]["S"] == "FAILED"
    [first, alert] = alerts(aws)
    assert "published, then ended FAILED" in alert["subject"] and "done again by the next run" in alert["detail"]

    # And at its due time the cleanup run starts with no upload
    clock.advance(1900 + 60)
    assert reconcile(job_state, lambda_context) == {"reconciled": "cleanup", "next": "started"}


def cleanup_due_then_a_failed_run(aws, trigger, job_state, clock, lambda_context, after_s: float) -> float:
    """A run publishes and asks for a cleanup after_s later; 300 s on, a new upload's run fails. Returns the due
    time."""
    from tests.lambdas.conftest import iso

    put_image(aws)
    upload(trigger, clock, lambda_context)
    due = clock.now + after_s
    succeed_with_report(aws, job_state, lambda_context, cleanup_due_at=iso(due))
    clock.advance(300)
    upload(trigger, clock, lambda_context, "images/A/2.jpg")
    job_state.lambda_handler(serverless_state(active_job(aws), aws.app_id, "FAILED"), lambda_context)
    return due


def test_a_cleanup_due_after_giving_up_still_runs_with_retries_then_says_it_is_pending(aws, trigger, job_state, clock,
                                                                                      lambda_context):  # fmt: skip
    # Given a published run that asked for a cleanup, then a change whose runs failed until the pipeline gave up
    cleanup_due_then_a_failed_run(aws, trigger, job_state, clock, lambda_context, after_s=3000)
    clock.advance(301)
    reconcile(job_state, lambda_context)
    job_state.lambda_handler(serverless_state(active_job(aws), aws.app_id, "FAILED"), lambda_context)
    gave_up = alerts(aws)[-1]
    assert "no more automatic runs" in gave_up["detail"] and "cleanup due at" in gave_up["detail"]

    # When the cleanup comes due: a run starts all the same
    clock.advance(3000 - 601 + 5)
    assert reconcile(job_state, lambda_context) == {"reconciled": "cleanup", "next": "started"}

    # And when it fails, it is retried with the usual back-off, one alert per failure
    job_state.lambda_handler(serverless_state(active_job(aws), aws.app_id, "FAILED"), lambda_context)
    assert "retrying in 5 minutes" in alerts(aws)[-1]["detail"]
    clock.advance(301)
    assert reconcile(job_state, lambda_context)["next"] == "started"
    job_state.lambda_handler(serverless_state(active_job(aws), aws.app_id, "FAILED"), lambda_context)

    # Then after its last attempt the give-up alert says the cleanup is pending
    [last] = alerts(aws)
    assert "no more automatic runs" in last["detail"] and "an erasure cleanup is pending" in last["detail"]
    assert len(job_runs(aws)) == 5


def test_a_cleanup_still_due_after_a_run_that_started_later_waits_instead_of_looping(aws, trigger, job_state, clock,
                                                                                     lambda_context):  # fmt: skip
    from pipeline.control import CLEANUP_GUESS_S

    from tests.lambdas.conftest import iso

    # Given a run that started after the cleanup was due, and whose report says it is still due
    put_image(aws)
    upload(trigger, clock, lambda_context)
    clock.advance(600)
    succeed_with_report(aws, job_state, lambda_context, cleanup_due_at=iso(clock.now - 3600))

    # Then the next cleanup run waits CLEANUP_GUESS_S (not one run per reconcile pass)
    assert int(state_item(aws)["cleanup_at"]["N"]) == math.ceil(clock.now + CLEANUP_GUESS_S)
    assert reconcile(job_state, lambda_context)["next"] == "clean"


@pytest.mark.parametrize("unreadable", ["denied", "not json", "bad time"])
def test_an_unreadable_report_still_gets_a_cleanup_run_within_the_bound(aws, trigger, job_state, clock,
                                                                        lambda_context, unreadable):  # fmt: skip
    from pipeline.control import CLEANUP_GUESS_S

    # Given a run that succeeds but whose report cannot be read as it settles
    put_image(aws)
    upload(trigger, clock, lambda_context)
    real_get = job_state.PIPELINE.s3.get_object

    def denied(**kwargs):
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "GetObject")

    if unreadable == "denied":
        aws.monkeypatch.setattr(job_state.PIPELINE.s3, "get_object", denied)
        publish(aws)
    elif unreadable == "not json":
        aws.s3.put_object(Bucket=BUCKET, Key="results/report.json", Body=b"{truncated")
    else:
        publish(aws, cleanup_due_at="half past noon")
    settled_at = clock.now
    result = job_state.lambda_handler(serverless_state(active_job(aws), aws.app_id, "SUCCESS"), lambda_context)

    # Then the run still settles as succeeded, and a cleanup run is guessed CLEANUP_GUESS_S later
    assert result["succeeded"] is True and state_item(aws)["failures"]["N"] == "0"
    assert state_item(aws)["cleanup_guessed"]["BOOL"] is True
    clock.advance(CLEANUP_GUESS_S - 60)
    assert reconcile(job_state, lambda_context)["next"] == "clean"
    clock.advance(61)
    assert reconcile(job_state, lambda_context)["next"] == "started"
    assert clock.now - settled_at <= 3600 - 300 and len(job_runs(aws)) == 2  # well within the 1-hour bound

    # When that run cannot read it either: a person is told once, and guessing stops (no run every half hour)
    job_state.lambda_handler(serverless_state(active_job(aws), aws.app_id, "SUCCESS"), lambda_context)
    [alert] = alerts(aws)
    assert alert["state"] == "REPORT_UNREADABLE" and "erasure" in alert["subject"]
    assert "cleanup_at" not in state_item(aws) and "cleanup_guessed" not in state_item(aws)

    # And once it reads again, the report's own time is followed
    from tests.lambdas.conftest import iso

    aws.monkeypatch.setattr(job_state.PIPELINE.s3, "get_object", real_get)
    clock.advance(300)
    upload(trigger, clock, lambda_context, "images/A/2.jpg")
    due = math.ceil(clock.now) + 600  # whole seconds: the report's time has milliseconds, the clock's float more
    succeed_with_report(aws, job_state, lambda_context, cleanup_due_at=iso(due))
    assert int(state_item(aws)["cleanup_at"]["N"]) == due


# --- a given-up pipeline: restarted daily only if the images or the deployed artifacts changed ------------
def give_up(aws, trigger, job_state, clock, lambda_context) -> None:
    """Two failed attempts (MAX_ATTEMPTS=2) of a run for images/A/1.jpg."""
    put_image(aws)
    upload(trigger, clock, lambda_context)
    job_state.lambda_handler(serverless_state(active_job(aws), aws.app_id, "FAILED"), lambda_context)
    clock.advance(301)
    job_state.lambda_handler({"action": "reconcile"}, lambda_context)
    job_state.lambda_handler(serverless_state(active_job(aws), aws.app_id, "FAILED"), lambda_context)
    assert job_state.lambda_handler({"action": "reconcile"}, lambda_context)["next"] == "given-up"
    clock.advance(86400)


def test_a_given_up_pipeline_records_digests_and_is_not_restarted_daily_for_nothing(aws, trigger, job_state, clock,
                                                                                    lambda_context):  # fmt: skip
    # Given a pipeline that gave up
    give_up(aws, trigger, job_state, clock, lambda_context)

    # Then the state item holds what the failed run had: the artifacts version and a digest, never a key
    item = state_item(aws)
    on = item["given_up_on"]["M"]
    assert on["artifacts"]["S"] == "0123456789abcdef" and len(on["inputs"]["S"]) == 64
    assert "images/" not in json.dumps(item)

    # When the daily pass comes round with nothing changed, day after day
    results = [daily(job_state, lambda_context) for _ in range(3)]

    # Then no run starts
    assert results == [{"daily": "unchanged", "next": "given-up"}] * 3
    assert len(job_runs(aws)) == 2


def test_a_given_up_pipeline_is_restarted_daily_when_new_artifacts_are_deployed(aws, trigger, job_state, clock,
                                                                                lambda_context):  # fmt: skip
    give_up(aws, trigger, job_state, clock, lambda_context)

    # When a deployment brings another job (ARTIFACTS_VERSION changes) and the daily pass comes round
    tune(aws, job_state, artifacts_version="fedcba9876543210")

    # Then one more attempt starts
    assert daily(job_state, lambda_context) == {"daily": "given up; new artifacts deployed", "next": "started"}
    assert len(job_runs(aws)) == 3


def test_a_deployment_after_giving_up_gets_its_run_at_the_next_reconcile_pass(aws, trigger, job_state, clock,
                                                                               lambda_context):  # fmt: skip
    give_up(aws, trigger, job_state, clock, lambda_context)
    # When the fix is deployed: the functions start with the new ARTIFACTS_VERSION
    tune(aws, job_state, artifacts_version="fedcba9876543210")
    # Then the schedule's next pass (every ReconcileMinutes) starts one more attempt, without waiting for the day
    assert job_state.lambda_handler({"action": "reconcile"}, lambda_context)["next"] == "started"
    assert len(job_runs(aws)) == 3


def test_giving_up_freezes_the_back_off_so_a_new_upload_runs_at_once(aws, trigger, job_state, clock, lambda_context):
    # Given a pipeline that gave up, then failed its daily attempts for a week (each a counted failure)
    give_up(aws, trigger, job_state, clock, lambda_context)
    for day in range(7):
        clock.advance(86400)
        put_image(aws, f"images/A/day-{day}.jpg")  # images change, so each daily pass tries again
        daily(job_state, lambda_context)
        job_state.lambda_handler(serverless_state(active_job(aws), aws.app_id, "FAILED"), lambda_context)
    assert int(state_item(aws)["failures"]["N"]) == 9
    # When the cause is fixed and, minutes after the last failure, a new image is uploaded
    clock.advance(300)
    tune(aws, trigger, quiet_seconds=0)
    upload(trigger, clock, lambda_context, "images/A/fixed.jpg")
    # Then its run starts now, not after 2^8 x RETRY_BASE_SECONDS (21 hours) of back-off
    assert state_item(aws)["run"]["M"]["job_id"]["S"] == active_job(aws)


@pytest.mark.parametrize("change", ["added", "deleted"])
def test_a_given_up_pipeline_is_restarted_daily_when_images_changed(aws, trigger, job_state, clock, lambda_context,
                                                                    change):  # fmt: skip
    give_up(aws, trigger, job_state, clock, lambda_context)

    # When images/ changes without an event (the broken image expires, say) and the daily pass comes round
    if change == "added":
        put_image(aws, "images/A/2.jpg")
    else:
        aws.s3.delete_object(Bucket=BUCKET, Key="images/A/1.jpg")

    # Then one more attempt starts; and a success clears what the give-up recorded
    assert daily(job_state, lambda_context) == {"daily": "given up; images changed", "next": "started"}
    job_state.lambda_handler(serverless_state(active_job(aws), aws.app_id, "SUCCESS"), lambda_context)
    assert "given_up_on" not in state_item(aws) and "given_up_gen" not in state_item(aws)


@pytest.fixture
def ec2(aws):
    aws.monkeypatch.setenv("ENGINE", "ec2")
    aws.monkeypatch.setenv("EC2_USE_SPOT", "true")
    trigger, job_state = load("trigger.app"), load("job_state.app")
    shared = Clock(time.time())
    trigger.PIPELINE.state.clock = job_state.PIPELINE.state.clock = shared
    return trigger, job_state, shared


def test_ec2_engine_runs_a_transient_cluster_with_one_step_under_a_timeout(aws, ec2, lambda_context):
    trigger, _, clock = ec2
    upload(trigger, clock, lambda_context)

    [cluster] = aws.emr.list_clusters()["Clusters"]
    described = aws.emr.describe_cluster(ClusterId=cluster["Id"])["Cluster"]
    assert described["AutoTerminate"] is True  # KeepJobFlowAliveWhenNoSteps=False
    assert described["ReleaseLabel"] == "emr-7.10.0"
    [step] = aws.emr.list_steps(ClusterId=cluster["Id"])["Steps"]
    assert step["ActionOnFailure"] == "TERMINATE_CLUSTER"
    args = step["Config"]["Args"]
    assert args[:5] == ["timeout", "180m", "spark-submit", "--deploy-mode", "cluster"]
    assert args[args.index("--launch-id") + 1] == state_item(aws)["run"]["M"]["run_id"]["S"]
    assert step["Name"] == cluster["Name"] and cluster["Name"].startswith("image-features-run-")
    assert "--manifest" not in args and args[args.index("--input") + 1] == "s3://photos-eu/images/"
    # ... with the prices its report estimates the run's cost with, the same as the state item's
    assert args[args.index("--price-vcpu-hour") + 1] == "0.042094"
    assert args[args.index("--price-gb-hour") + 1] == "0.004628"
    # Nothing installed at boot: the step brings the stack's runtime archive (tests/test_rollout.py runs it)
    assert aws.emr.list_bootstrap_actions(ClusterId=cluster["Id"])["BootstrapActions"] == []
    assert args[args.index("--archives") + 1] == aws.env["RUNTIME_ARCHIVE_URI"] + "#environment"
    assert "spark.yarn.appMasterEnv.PYSPARK_PYTHON=./environment/bin/python" in args
    groups = {
        g["InstanceGroupType"]: g for g in aws.emr.list_instance_groups(ClusterId=cluster["Id"])["InstanceGroups"]
    }
    assert groups["CORE"]["Market"] == "SPOT" and groups["MASTER"]["Market"] == "ON_DEMAND"

    tags = {t["Key"]: t["Value"] for t in described["Tags"]}
    assert tags["for-use-with-amazon-emr-managed-policies"] == "true"  # AmazonEMRServicePolicy_v2 needs it

    # A retried start for the same run finds the cluster instead of making a second one
    run_id = state_item(aws)["run"]["M"]["run_id"]["S"]
    assert trigger.PIPELINE.launcher.start(run_id) == cluster["Id"]
    assert len(aws.emr.list_clusters()["Clusters"]) == 1


def test_ec2_step_and_cluster_events_settle_the_run_once(aws, ec2, lambda_context):
    trigger, job_state, clock = ec2
    upload(trigger, clock, lambda_context)
    cluster_id = aws.emr.list_clusters()["Clusters"][0]["Id"]
    step_event = {
        "detail-type": "EMR Step Status Change",
        "source": "aws.emr",
        "detail": {"clusterId": cluster_id, "stepId": "s-1", "state": "COMPLETED", "message": "done"},
    }
    assert job_state.lambda_handler(step_event, lambda_context)["succeeded"] is True
    # The cluster's own termination event afterwards is not a second settlement
    cluster_event = {
        "detail-type": "EMR Cluster State Change",
        "source": "aws.emr",
        "detail": {"clusterId": cluster_id, "state": "TERMINATED_WITH_ERRORS", "stateChangeReason": "{}"},
    }
    assert job_state.lambda_handler(cluster_event, lambda_context)["settled"] is None


def test_ec2_a_settled_run_records_the_clusters_normalized_instance_hours(aws, ec2, lambda_context, capsys):
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.emr.models import emr_backends

    trigger, job_state, clock = ec2
    upload(trigger, clock, lambda_context)
    cluster_id = aws.emr.list_clusters()["Clusters"][0]["Id"]
    emr_backends[DEFAULT_ACCOUNT_ID][REGION].clusters[cluster_id].normalized_instance_hours = 24
    capsys.readouterr()

    # When its step's end event comes (the cluster still terminates then)
    step_event = {
        "detail-type": "EMR Step Status Change",
        "source": "aws.emr",
        "detail": {"clusterId": cluster_id, "stepId": "s-1", "state": "COMPLETED", "message": "done"},
    }
    job_state.lambda_handler(step_event, lambda_context)

    # Then last_run holds the normalized hours as EMR gave them then, unpriced (they are m1.small-hours, not USD)
    last = last_run(aws)
    assert last["normalized_instance_hours"] == "24" and "estimated_usd" not in last
    assert metrics_out(capsys.readouterr().out)["RunNormalizedInstanceHours"] == 24


def test_ec2_a_run_past_its_timeout_has_its_cluster_terminated_and_settles_once(aws, ec2, lambda_context):
    trigger, job_state, clock = ec2
    upload(trigger, clock, lambda_context)
    [cluster] = aws.emr.list_clusters()["Clusters"]

    # When the run is past its timeout (the step's `timeout` did not end it), over two passes
    clock.advance(PAST_TIMEOUT)
    assert reconcile(job_state, lambda_context)["reconciled"] == "cancelling"
    settled = reconcile(job_state, lambda_context)

    # Then its cluster was terminated, and the run counts once as failed once EMR says the cluster ended
    assert aws.emr.describe_cluster(ClusterId=cluster["Id"])["Cluster"]["Status"]["State"] == "TERMINATED"
    assert settled["reconciled"] == "settled" and settled["succeeded"] is False
    assert state_item(aws)["failures"]["N"] == "1" and len(alerts(aws)) == 1


def test_ec2_only_a_cluster_whose_step_still_runs_blocks_a_second_one(aws, ec2, lambda_context):
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.emr.models import emr_backends

    trigger, job_state, clock = ec2
    # Given a cluster of this stack that the state item does not know, its step running
    other = trigger.PIPELINE.launcher.start("run-20260101T000000Z-0ther000")

    # When an upload asks for a run: blocked, one alert, no second cluster
    upload(trigger, clock, lambda_context)
    assert len(aws.emr.list_clusters()["Clusters"]) == 1 and alerts(aws)[0]["state"] == "BLOCKED"

    # When its step has ended and the cluster only winds down (still RUNNING for EMR), the next pass starts the run
    [step] = emr_backends[DEFAULT_ACCOUNT_ID][REGION].clusters[other].steps
    step.state = "COMPLETED"
    clock.advance(301)
    assert reconcile(job_state, lambda_context)["next"] == "started"
    assert len(aws.emr.list_clusters()["Clusters"]) == 2 and active_job(aws) != other


def test_missing_configuration_names_the_variable(aws):
    from pipeline.settings import SettingsError
    from pipeline.settings import load as load_settings

    with pytest.raises(SettingsError, match="missing environment variable\\(s\\): BUCKET"):
        load_settings({**aws.env, "BUCKET": ""})
    with pytest.raises(SettingsError, match="EMR_APPLICATION_ID is required when ENGINE=serverless"):
        load_settings({**aws.env, "EMR_APPLICATION_ID": ""})
    with pytest.raises(SettingsError, match="QUIET_SECONDS must be at most 900"):
        load_settings({**aws.env, "QUIET_SECONDS": "3600"})
    with pytest.raises(SettingsError, match="PRICE_VCPU_HOUR and PRICE_GB_HOUR are set together"):
        load_settings({**aws.env, "PRICE_GB_HOUR": ""})
    with pytest.raises(SettingsError, match="PRICE_GB_HOUR must be a price in USD"):
        load_settings({**aws.env, "PRICE_GB_HOUR": "0,0046"})
    # No prices: no estimate, and the job is not given any (it has defaults of its own)
    unpriced = load_settings({**aws.env, "PRICE_VCPU_HOUR": "", "PRICE_GB_HOUR": ""})
    assert unpriced.price_vcpu_hour is None and "--price-vcpu-hour" not in unpriced.job_arguments("run-x")
    with pytest.raises(SettingsError, match="PCA_REFIT must be auto, always or never, got 'sometimes'"):
        load_settings({**aws.env, "PCA_REFIT": "sometimes"})
    # The stack's refit policy reaches the job's command line, which takes it
    from emr_job.main import parse_args

    arguments = load_settings({**aws.env, "PCA_REFIT": "always"}).job_arguments("run-x")
    assert parse_args(arguments).refit == "always"


# --- events for what comes next: one per settled run, on the default bus, through the outbox -----------------
def delivered(aws) -> list:
    """What a downstream rule on the default bus received: (detail-type, detail)."""
    got = []
    while batch := aws.sqs.receive_message(QueueUrl=aws.downstream, MaxNumberOfMessages=10).get("Messages", []):
        for message in batch:
            event = json.loads(message["Body"])
            assert event["source"] == "image-features"
            got.append((event["detail-type"], event["detail"]))
            aws.sqs.delete_message(QueueUrl=aws.downstream, ReceiptHandle=message["ReceiptHandle"])
    return got


def publish_as_the_run(aws, **maintenance) -> dict:
    """The active run publishes report.json, naming its launch as the job does."""
    report = {**publish(aws, **maintenance), "launch_id": active_run_id(aws), "k": 3, "images_total": 2,
              "images_ok": 2, "images_failed": 0, "images_featurized": 2, "images_removed": 0,
              "html": "runs/20261125T000000Z-0000beef/report.html",
              "model_onnx": "runs/20261125T000000Z-0000beef/model.onnx",
              "resources": {"vcpu_seconds": 36.0, "gb_seconds": 72.0, "estimated_usd": 0.0005},
              "commit": {"tables": {"features": f"s3://{BUCKET}/results/tables/features/metadata/00001-a.metadata.json"}},
              "failures": ["images/A/secret name.jpg"]}  # fmt: skip
    aws.s3.put_object(Bucket=BUCKET, Key="results/report.json", Body=json.dumps(report).encode())
    return report


def test_a_published_run_puts_one_event_whatever_settles_it_how_often(aws, trigger, job_state, clock, lambda_context):
    # Given a run that published
    put_image(aws)
    upload(trigger, clock, lambda_context)
    run_id, job = active_run_id(aws), active_job(aws)
    publish_as_the_run(aws)

    # When its end event comes twice, late, and the reconciler asks EMR too (moto reports SUCCESS)
    success = serverless_state(job, aws.app_id, "SUCCESS")
    job_state.lambda_handler(success, lambda_context)
    job_state.lambda_handler(success, lambda_context)
    reconcile(job_state, lambda_context)
    clock.advance(3600)
    job_state.lambda_handler(success, lambda_context)

    # Then the default bus got one Results Published event, with what a downstream job needs and no object key
    [(kind, detail)] = delivered(aws)
    assert kind == "Results Published" and detail["id"] == f"{run_id}:published" and detail["run_id"] == run_id
    assert detail["stage"] == "dev" and detail["k"] == 3 and detail["counts"]["images_ok"] == 2
    assert detail["report"] == f"s3://{BUCKET}/results/report.json"
    assert detail["model"] == f"s3://{BUCKET}/results/runs/20261125T000000Z-0000beef/model.onnx"
    assert detail["tables"]["features"].endswith("metadata.json") and detail["cost"]["estimated_usd"] == 0.0005
    assert "images/" not in json.dumps(detail)
    assert not any(name.startswith("outbox_") for name in state_item(aws))


def test_an_event_survives_a_failed_put_and_goes_at_the_next_invocation(aws, trigger, job_state, clock,
                                                                        lambda_context):  # fmt: skip
    # Given a run that published, and EventBridge failing as it settles
    put_image(aws)
    upload(trigger, clock, lambda_context)
    publish_as_the_run(aws)
    put_events = job_state.PIPELINE.events.put_events

    def down(**kwargs):
        raise ClientError({"Error": {"Code": "InternalException", "Message": "unavailable"}}, "PutEvents")

    aws.monkeypatch.setattr(job_state.PIPELINE.events, "put_events", down)
    job_state.lambda_handler(serverless_state(active_job(aws), aws.app_id, "SUCCESS"), lambda_context)

    # Then the event waits in the state item's outbox, delivered nowhere yet
    assert delivered(aws) == [] and [n for n in state_item(aws) if n.startswith("outbox_")]

    # When EventBridge answers again: a per-entry failure keeps it too, then the next pass puts it, once
    aws.monkeypatch.setattr(job_state.PIPELINE.events, "put_events", lambda **kw: {
        "FailedEntryCount": 1, "Entries": [{"ErrorCode": "ThrottlingException"}]})  # fmt: skip
    reconcile(job_state, lambda_context)
    assert [n for n in state_item(aws) if n.startswith("outbox_")]
    aws.monkeypatch.setattr(job_state.PIPELINE.events, "put_events", put_events)
    reconcile(job_state, lambda_context)
    reconcile(job_state, lambda_context)
    assert [kind for kind, _ in delivered(aws)] == ["Results Published"]
    assert not [n for n in state_item(aws) if n.startswith("outbox_")]


def test_failures_put_run_failed_then_pipeline_gave_up_and_a_cleanup_that_publishes_nothing_puts_none(
    aws, trigger, job_state, clock, lambda_context
):
    from tests.lambdas.conftest import iso

    # Given a run that published and asked for a cleanup run
    put_image(aws)
    upload(trigger, clock, lambda_context)
    due = clock.now + 1800
    publish_as_the_run(aws, cleanup_due_at=iso(due))
    job_state.lambda_handler(serverless_state(active_job(aws), aws.app_id, "SUCCESS"), lambda_context)
    assert [kind for kind, _ in delivered(aws)] == ["Results Published"]

    # When the cleanup run publishes nothing (report.json still names the earlier launch)
    clock.advance(1800 + 60)
    reconcile(job_state, lambda_context)
    succeed_with_report(aws, job_state, lambda_context, cleanup_due_at=None)

    # Then no event; and when the next runs fail (MAX_ATTEMPTS=2): Run Failed, then Pipeline Gave Up
    assert delivered(aws) == []
    clock.advance(300)
    upload(trigger, clock, lambda_context, "images/A/2.jpg")
    failed_id = active_run_id(aws)
    job_state.lambda_handler(serverless_state(active_job(aws), aws.app_id, "FAILED"), lambda_context)
    clock.advance(301)
    reconcile(job_state, lambda_context)
    job_state.lambda_handler(serverless_state(active_job(aws), aws.app_id, "FAILED"), lambda_context)
    [(first, failed), (second, gave_up)] = delivered(aws)
    assert (first, second) == ("Run Failed", "Pipeline Gave Up")
    assert failed["id"] == f"{failed_id}:failed" and "counts" not in failed and gave_up["attempt"] == 2


def test_events_eventbridge_keeps_refusing_never_fill_the_state_item(aws, trigger, job_state, clock, lambda_context,
                                                                     capsys):  # fmt: skip
    from pipeline.state import OUTBOX_MAX

    # Given an outbox already holding as many events as it keeps (PutEvents denied by an SCP, say)
    pending = {"S": '{"DetailType": "Run Failed", "Detail": {}}'}
    for i in range(OUTBOX_MAX):
        aws.ddb.update_item(TableName="runs", Key={"id": {"S": "pipeline"}}, UpdateExpression="SET #e = :e",
                            ExpressionAttributeNames={"#e": f"outbox_run-20260101T0000{i:02d}Z-00000000:failed"},
                            ExpressionAttributeValues={":e": pending})  # fmt: skip

    def denied(**kwargs):
        raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "explicit deny"}}, "PutEvents")

    aws.monkeypatch.setattr(job_state.PIPELINE.events, "put_events", denied)
    aws.monkeypatch.setattr(trigger.PIPELINE.events, "put_events", denied)

    # When another run settles
    put_image(aws)
    upload(trigger, clock, lambda_context)
    run_id = active_run_id(aws)
    job_state.lambda_handler(serverless_state(active_job(aws), aws.app_id, "FAILED"), lambda_context)

    # Then the outbox still holds OUTBOX_MAX events, the newest among them, the oldest dropped and counted
    outbox = sorted(name for name in state_item(aws) if name.startswith("outbox_"))
    assert len(outbox) == OUTBOX_MAX and outbox[-1] == f"outbox_{run_id}:failed"
    assert "outbox_run-20260101T000000Z-00000000:failed" not in outbox
    assert metrics_out(capsys.readouterr().out)["EventsDropped"] == 1


def test_a_cleanup_due_during_a_back_off_starts_at_its_time(aws, trigger, job_state, clock, lambda_context):
    # Given a published run that asked for a cleanup, then a run that failed: back-off until 5 minutes later
    due = cleanup_due_then_a_failed_run(aws, trigger, job_state, clock, lambda_context, after_s=400)
    assert float(state_item(aws)["retry_at"]["N"]) > due + 60

    # When the reconciler comes round at the due time, still in the back-off
    clock.advance(100 + 5)

    # Then the cleanup run starts: the erasure bound does not wait for the back-off
    assert reconcile(job_state, lambda_context) == {"reconciled": "cleanup", "next": "started"}
