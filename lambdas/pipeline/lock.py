"""At most one active run: a single DynamoDB item written only if absent or if its lease has expired."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

from botocore.exceptions import ClientError

LOCK_ID = "lock#active-run"
TTL_SLACK_S = 86400  # the table's TTL only tidies up; the lease condition is what guards


@dataclass
class ActiveRun:
    owner: str
    run_id: str
    engine: str
    job_id: str
    expires_at: int


class RunLock:
    def __init__(self, dynamodb, table: str, clock=time.time):
        self.db, self.table, self.clock = dynamodb, table, clock

    def acquire(self, owner: str, lease_s: int) -> bool:
        now = int(self.clock())
        try:
            self.db.put_item(
                TableName=self.table,
                Item={
                    "id": {"S": LOCK_ID},
                    "owner": {"S": owner},
                    "expires_at": {"N": str(now + lease_s)},
                    "expiration": {"N": str(now + lease_s + TTL_SLACK_S)},
                },
                ConditionExpression="attribute_not_exists(id) OR expires_at < :now",
                ExpressionAttributeValues={":now": {"N": str(now)}},
            )
            return True
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                return False
            raise

    def record_run(self, owner: str, run_id: str, engine: str, job_id: str, lease_s: int) -> None:
        """The lock now names the run it guards, so the state-change event can find and release it."""
        now = int(self.clock())
        self.db.update_item(
            TableName=self.table,
            Key={"id": {"S": LOCK_ID}},
            UpdateExpression="SET run_id = :r, engine = :e, job_id = :j, expires_at = :x, expiration = :t",
            ConditionExpression="#o = :o",
            ExpressionAttributeNames={"#o": "owner"},
            ExpressionAttributeValues={
                ":r": {"S": run_id},
                ":e": {"S": engine},
                ":j": {"S": job_id},
                ":x": {"N": str(now + lease_s)},
                ":t": {"N": str(now + lease_s + TTL_SLACK_S)},
                ":o": {"S": owner},
            },
        )

    def active(self) -> Optional[ActiveRun]:
        item = self.db.get_item(TableName=self.table, Key={"id": {"S": LOCK_ID}}, ConsistentRead=True).get("Item")
        if not item:
            return None
        return ActiveRun(
            owner=item["owner"]["S"],
            run_id=item.get("run_id", {}).get("S", ""),
            engine=item.get("engine", {}).get("S", ""),
            job_id=item.get("job_id", {}).get("S", ""),
            expires_at=int(item["expires_at"]["N"]),
        )

    def release(self, owner: str) -> bool:
        try:
            self.db.delete_item(
                TableName=self.table,
                Key={"id": {"S": LOCK_ID}},
                ConditionExpression="#o = :o",
                ExpressionAttributeNames={"#o": "owner"},
                ExpressionAttributeValues={":o": {"S": owner}},
            )
            return True
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                return False  # someone else's lock by now (ours expired): leave it alone
            raise
