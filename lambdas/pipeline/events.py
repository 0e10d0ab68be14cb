"""What a downstream job subscribes to: one EventBridge event per settled run, on the account's default bus, with
source `image-features`. `Results Published` when the run published (whatever its exit status), `Run Failed` when it
did not, `Pipeline Gave Up` when that failure was its last attempt; a run that published nothing (a no-change or
cleanup run) puts none. The detail holds counts, URIs and the cost: never an object key."""

from __future__ import annotations

import json
from typing import Optional

SOURCE = "image-features"
PUBLISHED, FAILED, GAVE_UP = "Results Published", "Run Failed", "Pipeline Gave Up"
OUTCOMES = {PUBLISHED: "published", FAILED: "failed", GAVE_UP: "gave-up"}
COUNTS = ("images_total", "images_ok", "images_failed", "images_featurized", "images_reused", "images_removed")
PUT_EVENTS_MAX = 10  # entries per PutEvents call (EventBridge API reference)


def build(kind: str, stage: str, bucket: str, results_prefix: str, run_id: str, attempt: int, state: str,
          detail_text: str, report: Optional[dict], used: dict) -> tuple:  # fmt: skip
    """(event id, the event as JSON text) for the outbox. The id, the run id and the outcome, is what consumers
    deduplicate on: delivery is at least once."""
    event_id = f"{run_id}:{OUTCOMES[kind]}"
    detail = {"id": event_id, "stage": stage, "run_id": run_id, "outcome": OUTCOMES[kind], "state": state,
              "attempt": attempt}  # fmt: skip
    results = f"s3://{bucket}/{results_prefix}"
    if report is not None:
        detail["counts"] = {name: report.get(name) for name in COUNTS}
        detail["k"] = report.get("k")
        detail["report"] = results + "report.json"
        detail["report_html"] = results + report["html"] if report.get("html") else None
        detail["model"] = results + report["model_onnx"] if report.get("model_onnx") else None  # its model.onnx
        detail["tables"] = dict((report.get("commit") or {}).get("tables") or {})  # metadata files' URIs
    else:
        detail["detail"] = detail_text  # EMR's own text, or only the error names in it (launchers.safe_detail)
    detail["cost"] = cost(report, used)
    return event_id, json.dumps({"DetailType": kind, "Detail": detail}, sort_keys=True)


def cost(report: Optional[dict], used: dict) -> dict:
    """EMR's own measure when the settle had it; else the job's estimate from its report."""
    if used:
        return {
            name: used[name]
            for name in (
                "vcpu_hours",
                "memory_gb_hours",
                "estimated_usd",
                "billed_vcpu_hours",
                "billed_memory_gb_hours",
                "normalized_instance_hours",
            )
            if name in used
        }
    resources = (report or {}).get("resources") or {}
    if not resources:
        return {}
    return {"vcpu_hours": round(resources.get("vcpu_seconds", 0) / 3600, 6),
            "memory_gb_hours": round(resources.get("gb_seconds", 0) / 3600, 6),
            "estimated_usd": resources.get("estimated_usd"), "basis": "the job's estimate"}  # fmt: skip


def entry(text: str) -> dict:
    """An outbox event -> a PutEvents entry for the default bus."""
    event = json.loads(text)
    return {"Source": SOURCE, "DetailType": event["DetailType"], "Detail": json.dumps(event["Detail"])}
