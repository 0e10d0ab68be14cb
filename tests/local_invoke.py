"""`make invoke EVENT=events/<file>.json`: run the function that handles this event against moto, no Docker.

The Docker-free counterpart of `sam local invoke`: the stack's bucket, table, queues, topic and EMR
Serverless application are created in moto, the function runs with the environment template.yaml gives
it, and what it did (pipeline state, runs started, messages dead-lettered, alerts) is printed after.
"""

import argparse
import json
import os
import sys
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "lambdas")]
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="eu-west-3")
for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
    os.environ.pop(name, None)

from moto import mock_aws  # noqa: E402

from tests.lambdas.stack import create_stack, job_runs  # noqa: E402

CONTEXT = SimpleNamespace(
    function_name="local",
    memory_limit_in_mb=256,
    invoked_function_arn="arn:aws:lambda:eu-west-3:123456789012:function:local",
    aws_request_id="local-invoke-0001",
    get_remaining_time_in_millis=lambda: 60000,
)


def is_for_job_state(event: dict) -> bool:
    return event.get("source") in ("aws.emr-serverless", "aws.emr") or "action" in event


def summary(stack) -> list:
    item = stack.ddb.get_item(TableName="runs", Key={"id": {"S": "pipeline"}}).get("Item", {})
    plain = {k: next(iter(v.values())) for k, v in item.items() if k != "id"}
    run = {k: next(iter(v.values())) for k, v in plain.pop("run", {}).items()}
    lines = [f"pipeline state: changes marked {plain.get('gen', 0)}, processed {plain.get('processed_gen', 0)}, "
             f"failures {plain.get('failures', 0)}, active run {run.get('run_id', '-')}"]  # fmt: skip
    if "last_run" in plain:
        last = {k: next(iter(v.values())) for k, v in plain["last_run"].items()}
        lines.append(f"last run: {last.get('run_id')} ended {last.get('state')}")
    for job in job_runs(stack):
        lines.append(f"EMR Serverless StartJobRun: job {job['id']} for {job['name']} (moto reports it {job['state']})")
    dead = stack.sqs.get_queue_attributes(QueueUrl=stack.dlq, AttributeNames=["ApproximateNumberOfMessages"])
    lines.append(f"dead-letter queue: {dead['Attributes']['ApproximateNumberOfMessages']} message(s)")
    alerts = stack.sqs.receive_message(QueueUrl=stack.alerts, MaxNumberOfMessages=10).get("Messages", [])
    for alert in alerts:
        body = json.loads(alert["Body"])
        lines.append(f"SNS alert: {body['subject']} ({body['detail']})")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("event", help="an events/*.json file")
    args = parser.parse_args(argv)
    with open(args.event, encoding="utf-8") as fh:
        event = json.load(fh)
    if event.get("source") == "image-features":
        print(f"{args.event} is an event the stack puts on the default bus for downstream rules (docs/DEPLOY.md, "
              "Events for what comes next); no function of the stack handles it", file=sys.stderr)  # fmt: skip
        return 2
    with mock_aws():
        stack = create_stack()
        os.environ.update(stack.env)
        import trigger.app as trigger_app

        if is_for_job_state(event):
            import job_state.app as job_state_app

            if "action" not in event:
                # A state event needs a run to settle: start one from the sample batch, then point the event at it.
                with open(os.path.join(ROOT, "events", "sqs_batch.json"), encoding="utf-8") as fh:
                    trigger_app.lambda_handler(json.load(fh), CONTEXT)
                run = job_state_app.PIPELINE.state.read().run
                if event["source"] == "aws.emr":
                    print("note: this stack runs ENGINE=serverless; an EMR on EC2 event is ignored by it")
                else:
                    print(f"note: started run {run.run_id} from events/sqs_batch.json; event now names its job")
                    event["detail"]["jobRunId"] = run.job_id
                    event["detail"]["applicationId"] = stack.app_id
            result = job_state_app.lambda_handler(event, CONTEXT)
            handler = "job_state"
        else:
            result = trigger_app.lambda_handler(event, CONTEXT)
            handler = "trigger"
        print(f"\n{handler}.lambda_handler returned: {json.dumps(result)}")
        for line in summary(stack):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
