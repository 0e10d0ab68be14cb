"""Powertools Logger, Tracer and Metrics shared by both functions. Object keys can be personal data:
INFO logs carry counts and short hashes, never raw events or keys."""

from __future__ import annotations

import hashlib

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit

logger = Logger()
tracer = Tracer()
metrics = Metrics()


def count(name: str, value: int = 1, always: bool = False) -> None:
    """always: a zero is a data point too (images per run), not the absence of an event."""
    if value or always:
        metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)


def measure(name: str, value: float, unit: MetricUnit = MetricUnit.NoUnit) -> None:
    """A figure that is not a count (hours, dollars: CloudWatch has no unit for them; seconds)."""
    metrics.add_metric(name=name, unit=unit, value=value)


def digest(text: str) -> str:
    """A short, stable pseudonym for a key or body, to correlate log lines without exposing the name."""
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:12]
