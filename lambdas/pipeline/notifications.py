"""Any way S3 can tell us something changed -> how many relevant changes, and when the latest happened.

Events are hints, never the record of what to process (the job lists images/ itself). So object keys are
read only to decide whether a change concerns an image under the images prefix, and never kept. Whether a
key arrives form-encoded (S3 notifications) or not (EventBridge) cannot change that decision for a key
under the prefix with an image extension, so a mis-decoded key can at worst ask for one run too many."""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Optional
from urllib.parse import unquote_plus

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
TICK = {"image-features": "tick"}  # the trigger's own delayed message: "check again once uploads settle"
# S3 event names that change what images/ holds. Lifecycle expiry is not an ObjectRemoved event.
CHANGE_PREFIXES = ("ObjectCreated:", "ObjectRemoved:", "LifecycleExpiration:")
EVENTBRIDGE_CHANGES = ("Object Created", "Object Deleted")
# The other names AWS documents (S3 user guide: notification-how-to-event-types-and-destinations for SQS, and
# ev-events for EventBridge's detail-types). Only these reach a log line; a forged body may carry any text in
# these fields, an object key included, so anything else is counted as "unknown event".
OTHER_S3_EVENTS = frozenset({
    "ObjectRestore:Post", "ObjectRestore:Completed", "ObjectRestore:Delete", "ReducedRedundancyLostObject",
    "Replication:OperationFailedReplication", "Replication:OperationMissedThreshold",
    "Replication:OperationReplicatedAfterThreshold", "Replication:OperationNotTracked", "LifecycleTransition",
    "IntelligentTiering", "ObjectTagging:Put", "ObjectTagging:Delete", "ObjectAcl:Put",
})  # fmt: skip
OTHER_EVENTBRIDGE_TYPES = frozenset({
    "Object Restore Initiated", "Object Restore Completed", "Object Restore Expired", "Object Tags Added",
    "Object Tags Deleted", "Object ACL Updated", "Object Storage Class Changed", "Object Access Tier Changed",
})  # fmt: skip
UNKNOWN_EVENT = "unknown event"


@dataclass
class Signals:
    changes: int = 0  # relevant changes (image keys under the prefix)
    latest_change_at: Optional[float] = None  # epoch seconds of the newest relevant change (None: unknown)
    ticks: int = 0
    ignored: Counter = field(default_factory=Counter)  # reason -> count
    malformed: list = field(default_factory=list)  # (message_id, reason, raw body)
    from_sqs: bool = False

    def saw_change(self, when: Optional[float]) -> None:
        self.changes += 1
        if when is None:
            return
        self.latest_change_at = when if self.latest_change_at is None else max(self.latest_change_at, when)


def is_image_key(key: str) -> bool:
    return posixpath.splitext(key)[1].lower() in IMAGE_EXTENSIONS


def parse(event, bucket: str, images_prefix: str) -> Signals:
    """Normalise one Lambda event. An unreadable SQS message lands in `malformed`; the others proceed."""
    signals = Signals()
    records = event.get("Records") if isinstance(event, dict) else None
    if isinstance(records, list) and records and all(_is_sqs(r) for r in records):
        signals.from_sqs = True
        for record in records:
            message_id = str(record.get("messageId") or "")
            body = record.get("body")
            try:
                doc = json.loads(body) if isinstance(body, str) else body
                if doc == TICK:
                    signals.ticks += 1
                    continue
                _read(doc, bucket, images_prefix, signals, depth=0)
            except Exception as exc:  # any shape at all: RecursionError on deep nesting included
                signals.malformed.append((message_id, f"{type(exc).__name__}: {str(exc)[:200]}", body))
        return signals
    # Invoked by S3 directly or by an EventBridge rule: a bad event is a wiring bug and raises.
    _read(event, bucket, images_prefix, signals, depth=0)
    return signals


def _is_sqs(record) -> bool:
    return isinstance(record, dict) and record.get("eventSource") == "aws:sqs"


def _read(doc, bucket: str, prefix: str, signals: Signals, depth: int) -> None:
    if not isinstance(doc, dict):
        raise ValueError("message body is not a JSON object")
    if doc.get("Type") == "Notification" and "Message" in doc and depth == 0:  # S3 -> SNS -> SQS
        _read(json.loads(doc["Message"]), bucket, prefix, signals, depth + 1)
    elif doc.get("Event") == "s3:TestEvent":  # sent once when the notification is configured
        signals.ignored["s3:TestEvent"] += 1
    elif doc.get("source") == "aws.s3" and "detail-type" in doc:
        _eventbridge(doc, bucket, prefix, signals)
    elif isinstance(doc.get("Records"), list):
        for record in doc["Records"]:
            _s3_record(record, bucket, prefix, signals)
    else:
        raise ValueError("neither an S3 notification, an EventBridge S3 event nor an s3:TestEvent")


def _s3_record(record, bucket: str, prefix: str, signals: Signals) -> None:
    if not isinstance(record, dict):
        raise ValueError("an S3 record is not a JSON object")
    name = record.get("eventName")
    if not isinstance(name, str):
        raise ValueError("an S3 record has no eventName")
    if not name.startswith(CHANGE_PREFIXES):
        signals.ignored[f"event {name}" if name in OTHER_S3_EVENTS else UNKNOWN_EVENT] += 1
        return
    where, key = _bucket_and_key(record, "s3", "an S3 record")
    if _relevant(where, unquote_plus(key), bucket, prefix, signals):
        signals.saw_change(_epoch(record.get("eventTime")))


def _eventbridge(doc: dict, bucket: str, prefix: str, signals: Signals) -> None:
    detail_type = doc["detail-type"]
    if detail_type not in EVENTBRIDGE_CHANGES:
        known = isinstance(detail_type, str) and detail_type in OTHER_EVENTBRIDGE_TYPES
        signals.ignored[f"event {detail_type}" if known else UNKNOWN_EVENT] += 1
        return
    where, key = _bucket_and_key(doc, "detail", "an EventBridge S3 event")
    if _relevant(where, key, bucket, prefix, signals):
        signals.saw_change(_epoch(doc.get("time")))


def _bucket_and_key(doc: dict, field: str, what: str) -> tuple:
    """doc[field].bucket.name and doc[field].object.key, where both notification shapes keep them."""
    body = doc.get(field)
    where = (body.get("bucket") or {}).get("name") if isinstance(body, dict) else None
    key = (body.get("object") or {}).get("key") if isinstance(body, dict) else None
    if not isinstance(where, str) or not isinstance(key, str):
        raise ValueError(f"{what} lacks {field}.bucket.name or {field}.object.key as strings")
    return where, key


def _relevant(where: str, key: str, bucket: str, prefix: str, signals: Signals) -> bool:
    reason = None
    if where != bucket:
        reason = "other bucket"
    elif not key.startswith(prefix):
        reason = "outside the images prefix"
    elif key.endswith("/"):
        reason = "folder marker"
    elif not is_image_key(key):
        reason = "not an image"
    if reason:
        signals.ignored[reason] += 1
        return False
    return True


def _epoch(text) -> Optional[float]:
    """S3's eventTime / EventBridge's time; None when absent or unreadable (treated as "just now")."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
