"""Pending manifests (one per delivered batch) and run manifests (what one EMR run processes), in S3.

Layout under MANIFESTS_PREFIX:
  pending/<sha256>.json  changes of one batch; the name is a hash of its content, so redeliveries collapse
  runs/<run_id>.json     the run manifest of DESIGN.md ({"run_id", "added", "removed"} plus bookkeeping)
  failed/<sha256>.json   pending manifests given up on after MAX_ATTEMPTS failed runs
  state/ledger.json      last processed sequencer per image, so a late duplicate event starts nothing
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone

from botocore.exceptions import ClientError

from pipeline.notifications import CREATED


def newer(a: str, b: str) -> bool:
    """S3 sequencers of one key: right-pad the shorter with zeros, then compare as hex strings."""
    width = max(len(a), len(b))
    return a.upper().ljust(width, "0") > b.upper().ljust(width, "0")


class ManifestStore:
    def __init__(self, s3, bucket: str, prefix: str):
        self.s3, self.bucket, self.prefix = s3, bucket, prefix

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _get(self, key: str):
        return json.loads(self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def _put(self, key: str, doc, **extra) -> None:
        body = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType="application/json", **extra)

    # --- pending ---------------------------------------------------------------------------------
    def write_pending(self, changes: list) -> str:
        """One object for a batch; the same batch delivered again maps onto the same object."""
        rows = sorted({(c.uri, c.action, c.sequencer, c.etag) for c in changes})
        digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:32]
        key = f"{self.prefix}pending/{digest}.json"
        try:  # never overwrite: that would reset the attempt count of a manifest a failed run kept
            self._put(key, {"changes": rows, "attempts": 0}, IfNoneMatch="*")
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise
        return key

    def list_pending(self) -> dict:
        """key -> last modified (epoch seconds) of every pending manifest."""
        found = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}pending/"
        ):
            found.update({obj["Key"]: obj["LastModified"].timestamp() for obj in page.get("Contents", [])})
        return dict(sorted(found.items()))

    # --- ledger ------------------------------------------------------------------------------------
    @property
    def _ledger_key(self) -> str:
        return f"{self.prefix}state/ledger.json"

    def ledger(self) -> dict:
        try:
            return self._get(self._ledger_key)
        except self.s3.exceptions.NoSuchKey:
            return {}

    # --- runs --------------------------------------------------------------------------------------
    def plan_run(self, pending_keys: list) -> RunPlan:
        """Merge pending manifests: the latest event per image wins; events already processed are dropped."""
        ledger = self.ledger()
        latest: dict = {}
        attempts = 0
        for key in pending_keys:
            doc = self._get(key)
            attempts = max(attempts, int(doc.get("attempts", 0)))
            for uri, action, sequencer, _etag in doc["changes"]:
                current = latest.get(uri)
                if current is None or newer(sequencer, current[1]):
                    latest[uri] = (action, sequencer)
        fresh = {u: (a, s) for u, (a, s) in latest.items() if u not in ledger or newer(s, ledger[u])}
        digest = hashlib.sha256(json.dumps([pending_keys, attempts]).encode()).hexdigest()[:20]
        return RunPlan(
            run_id=f"run-{digest}",  # deterministic: the same work and attempt get the same client token
            added=sorted(u for u, (a, _) in fresh.items() if a == CREATED),
            removed=sorted(u for u, (a, _) in fresh.items() if a != CREATED),
            sequencers={u: s for u, (_, s) in fresh.items()},
            pending=list(pending_keys),
            attempt=attempts + 1,
        )

    def run_manifest_key(self, run_id: str) -> str:
        return f"{self.prefix}runs/{run_id}.json"

    def write_run(self, plan: RunPlan) -> str:
        key = self.run_manifest_key(plan.run_id)
        self._put(
            key,
            {
                "run_id": plan.run_id,
                "added": plan.added,
                "removed": plan.removed,
                "sequencers": plan.sequencers,
                "pending": plan.pending,
                "attempt": plan.attempt,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
        )
        return self.uri(key)

    def complete(self, run_id: str) -> int:
        """After a successful run: remember what was processed, then drop its pending manifests."""
        doc = self._get(self.run_manifest_key(run_id))
        ledger = self.ledger()
        for uri, sequencer in doc["sequencers"].items():
            if uri not in ledger or newer(sequencer, ledger[uri]):
                ledger[uri] = sequencer
        self._put(self._ledger_key, ledger)
        self.delete(doc["pending"])
        return len(doc["added"]) + len(doc["removed"])

    def fail(self, run_id: str, max_attempts: int) -> list:
        """After a failed run: count the attempt; give up (move to failed/) at max_attempts. Returns those."""
        doc = self._get(self.run_manifest_key(run_id))
        abandoned = []
        for key in doc["pending"]:
            try:
                pending = self._get(key)
            except self.s3.exceptions.NoSuchKey:
                continue
            pending["attempts"] = int(pending.get("attempts", 0)) + 1
            if pending["attempts"] >= max_attempts:
                self._put(key.replace("/pending/", "/failed/", 1), pending)
                self.delete([key])
                abandoned.append(key)
            else:
                self._put(key, pending)
        return abandoned

    def delete(self, keys: list) -> None:
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[start : start + 1000]]
            if chunk:
                self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})


@dataclass
class RunPlan:
    run_id: str
    added: list
    removed: list
    sequencers: dict
    pending: list
    attempt: int

    @property
    def empty(self) -> bool:
        return not self.added and not self.removed
