"""The CloudWatch dashboard shows what the functions emit: every ImageFeatures metric it names is one the code
emits, in the namespace and with the dimensions Powertools gives it (the `service` dimension included)."""

import json
import re
from pathlib import Path

from tests.lambdas.conftest import s3_record, serverless_state, sqs_event
from tests.template.cfn import RESOURCES

ROOT = Path(__file__).resolve().parents[2]


def dashboard_metrics() -> list:
    """(namespace, name, dimensions) of every metric of the dashboard, its CloudFormation references filled in."""
    body = re.sub(r"\$\{[^}]+\}", "x", RESOURCES["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"])
    found = []
    for widget in json.loads(body)["widgets"]:
        for metric in widget["properties"].get("metrics", []):
            fields = [f for f in metric if not isinstance(f, dict)]
            found.append((fields[0], fields[1], dict(zip(fields[2::2], fields[3::2]))))
    return found


def emitted_names() -> set:
    """The metric names the functions' code emits: count()/measure() literals, and the tables they emit from."""
    from pipeline import control, costs

    code = "".join(p.read_text() for p in (ROOT / "lambdas").rglob("*.py"))
    calls = re.findall(r"\b(?:count|measure)\(([^()]*)", code)  # a name, or `"A" if ... else "B"`
    names = {name for args in calls for name in re.findall(r"\"([A-Z]\w+)\"", args)}
    return names | set(costs.METRICS.values()) | set(control.RUN_METRICS.values())


def test_every_metric_of_the_dashboard_is_one_the_functions_emit(aws, trigger, job_state, clock, lambda_context,
                                                                 capsys):  # fmt: skip
    # Given what a run's settle really prints as CloudWatch EMF (namespace, dimensions)
    trigger.lambda_handler(sqs_event([{"Records": [s3_record("images/A/1.jpg", at=clock.now - 120)]}]),
                           lambda_context)  # fmt: skip
    job = aws.ddb.get_item(TableName="runs", Key={"id": {"S": "pipeline"}})["Item"]["run"]["M"]["job_id"]["S"]
    job_state.lambda_handler(serverless_state(job, aws.app_id, "SUCCESS"), lambda_context)
    emf = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    spec = emf[-1]["_aws"]["CloudWatchMetrics"][0]
    emitted = {m["Name"] for doc in emf for m in doc["_aws"]["CloudWatchMetrics"][0]["Metrics"]}
    assert {"RunsStarted", "RunsSucceeded", "RunDurationSeconds"} <= emitted
    dimensions = {name: emf[-1][name] for name in spec["Dimensions"][0]}

    # Then every ImageFeatures metric on the dashboard has that namespace, those dimensions, and a name the code emits
    ours = [(n, name, dims) for n, name, dims in dashboard_metrics() if not n.startswith("AWS/")]
    assert len(ours) >= 15
    assert {n for n, _, _ in ours} == {spec["Namespace"]} == {"ImageFeatures"}
    assert all(dims == dimensions == {"service": "image-features"} for _, _, dims in ours)
    assert sorted({name for _, name, _ in ours} - emitted_names()) == []
    # ... and the AWS metrics are of this stack's queues and functions
    assert {n for n, _, _ in dashboard_metrics() if n.startswith("AWS/")} == {"AWS/SQS", "AWS/Lambda"}
