"""Any way S3 can tell us about uploads -> a flat list of object changes, plus what was ignored and why."""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import unquote_plus

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
CREATED, REMOVED = "created", "removed"
TICK = {"image-features": "tick"}  # the trigger's own delayed message (coordinator.schedule_tick)


@dataclass(frozen=True)
class Change:
    bucket: str
    key: str  # decoded
    action: str  # CREATED | REMOVED
    sequencer: str  # S3's per-key ordering token ("" when the source gives none)
    etag: str = ""
    message_id: str = ""  # the SQS message it came in, for partial batch failures

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def identity(self) -> str:
        """What makes two deliveries the same event: bucket + key + sequencer (or ETag)."""
        return f"{self.bucket}/{self.key}#{self.action}#{self.sequencer or self.etag}"


@dataclass
class Parsed:
    changes: list = field(default_factory=list)
    ignored: Counter = field(default_factory=Counter)  # reason -> count
    malformed: list = field(default_factory=list)  # (message_id, reason, raw body)
    message_ids: list = field(default_factory=list)  # SQS message ids that carried valid changes
    from_sqs: bool = False
    ticks: int = 0  # our own delayed "start when settled" messages


def is_image_key(key: str) -> bool:
    return posixpath.splitext(key)[1].lower() in IMAGE_EXTENSIONS


def parse(event: dict, bucket: str, images_prefix: str) -> Parsed:
    """Normalise one Lambda event. Never raises on bad content: bad SQS bodies land in `malformed`."""
    parsed = Parsed()
    records = event.get("Records") if isinstance(event, dict) else None
    if records and all(r.get("eventSource") == "aws:sqs" for r in records):
        parsed.from_sqs = True
        for record in records:
            message_id = record.get("messageId", "")
            try:
                body = json.loads(record.get("body") or "")
                if body == TICK:
                    parsed.ticks += 1
                    continue
                found = _changes(body, message_id, parsed.ignored)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                parsed.malformed.append((message_id, f"{type(exc).__name__}: {exc}", record.get("body")))
                continue
            kept = _keep(found, bucket, images_prefix, parsed.ignored)
            parsed.changes += kept
            if kept:
                parsed.message_ids.append(message_id)
        return parsed
    # Direct invocation by S3 or by an EventBridge rule: a bad event is a bug in the wiring, so it raises.
    parsed.changes = _keep(_changes(event, "", parsed.ignored), bucket, images_prefix, parsed.ignored)
    return parsed


def _changes(body: dict, message_id: str, ignored: Counter) -> list:
    if not isinstance(body, dict):
        raise ValueError("message body is not a JSON object")
    if body.get("Type") == "Notification" and "Message" in body:  # S3 -> SNS -> SQS
        return _changes(json.loads(body["Message"]), message_id, ignored)
    if body.get("Event") == "s3:TestEvent":  # sent once when the notification is configured
        ignored["s3:TestEvent"] += 1
        return []
    if "detail-type" in body and body.get("source") == "aws.s3":
        return [_from_eventbridge(body, message_id, ignored)] if _eventbridge_action(body) else _skip(body, ignored)
    if isinstance(body.get("Records"), list):
        out = []
        for record in body["Records"]:
            change = _from_s3_record(record, message_id)
            if change is None:
                ignored[f"event {record.get('eventName', '?')}"] += 1
            else:
                out.append(change)
        return out
    raise ValueError("neither an S3 notification, an EventBridge S3 event nor an s3:TestEvent")


def _skip(body: dict, ignored: Counter) -> list:
    ignored[f"event {body.get('detail-type')}"] += 1
    return []


def _from_s3_record(record: dict, message_id: str) -> Optional[Change]:
    name = record["eventName"]
    action = CREATED if name.startswith("ObjectCreated:") else REMOVED if name.startswith("ObjectRemoved:") else None
    if action is None:
        return None
    obj = record["s3"]["object"]
    return Change(
        bucket=record["s3"]["bucket"]["name"],
        key=unquote_plus(obj["key"]),  # notification keys are form-encoded: "red flower.jpg" -> "red+flower.jpg"
        action=action,
        sequencer=str(obj.get("sequencer", "")),
        etag=str(obj.get("eTag", "")),
        message_id=message_id,
    )


def _eventbridge_action(body: dict) -> Optional[str]:
    return {"Object Created": CREATED, "Object Deleted": REMOVED}.get(body["detail-type"])


def _from_eventbridge(body: dict, message_id: str, ignored: Counter) -> Change:
    detail = body["detail"]
    return Change(
        bucket=detail["bucket"]["name"],
        key=detail["object"]["key"],  # EventBridge carries the key as is, not form-encoded
        action=_eventbridge_action(body),
        sequencer=str(detail["object"].get("sequencer", "")),
        etag=str(detail["object"].get("etag", "")),
        message_id=message_id,
    )


def _keep(changes: list, bucket: str, images_prefix: str, ignored: Counter) -> list:
    kept = []
    for change in changes:
        if change.bucket != bucket:
            ignored["other bucket"] += 1
        elif not change.key.startswith(images_prefix):
            ignored["outside the images prefix"] += 1
        elif change.key.endswith("/"):
            ignored["folder marker"] += 1
        elif not is_image_key(change.key):
            ignored["not an image"] += 1
        else:
            kept.append(change)
    return kept
