"""The sample events in events/ are what the functions put on the default bus (events.build), and the sample rule
of docs/DEPLOY.md matches them."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = {"results_published.json": "Results Published", "run_failed.json": "Run Failed",
           "pipeline_gave_up.json": "Pipeline Gave Up"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_each_sample_event_has_the_shape_the_functions_put(name):
    from pipeline import events

    # Given the sample, and an event the builder makes for the same outcome
    sample = json.loads((ROOT / "events" / name).read_text())
    kind = SAMPLES[name]
    report = {"html": "runs/x/report.html", "commit": {"tables": {}}} if kind == events.PUBLISHED else None
    _, text = events.build(kind, "dev", "b", "results/", "run-20261206T000000Z-00000000", 1, "FAILED", "", report, {})
    built = json.loads(events.entry(text)["Detail"])

    # Then the sample has its source, detail-type and fields, its id is the run id and the outcome, and no key
    assert (sample["source"], sample["detail-type"]) == (events.SOURCE, kind)
    assert set(sample["detail"]) == set(built)
    assert sample["detail"]["id"] == f"{sample['detail']['run_id']}:{events.OUTCOMES[kind]}"
    assert "images/" not in json.dumps(sample)


def test_the_sample_rule_in_the_deploy_guide_matches_results_published_only():
    guide = (ROOT / "docs" / "DEPLOY.md").read_text()
    pattern = json.loads(re.search(r"--event-pattern '([^']+)'", guide).group(1))
    for name, kind in SAMPLES.items():
        sample = json.loads((ROOT / "events" / name).read_text())
        matches = all(sample[field] in allowed for field, allowed in pattern.items())
        assert matches == (kind == "Results Published"), name
