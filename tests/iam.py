"""The AWS calls a test run made, as IAM sees them, and an evaluator of policy statements over them.

Calls are read from moto's request recorder (every HTTP request the server got, from any process: boto3, pyarrow,
Spark workers). Each request becomes one or more (principal, action, resource, context) authorizations, the
principal told apart by its access key id. Implicit authorizations are added where AWS makes them: iam:PassRole
for the roles a StartJobRun or RunJobFlow hands over. KMS is not modelled (the template tests check the grants)."""

from __future__ import annotations

import base64
import fnmatch
import json
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlparse

ACCOUNT, REGION = "123456789012", "eu-west-3"


@dataclass(frozen=True)
class Call:
    principal: str
    action: str
    resource: str
    context: tuple = field(default=())  # ((condition key, value), ...)

    def describe(self) -> str:
        extra = "".join(f" [{k}={v}]" for k, v in self.context)
        return f"{self.principal}: {self.action} on {self.resource}{extra}"


def recorded_calls(path: str, principals: dict) -> list:
    """principals: access key id -> name. Requests made with other keys (the test's own setup) are skipped."""
    calls = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            entry = json.loads(line)
            auth = entry["headers"].get("Authorization", "")
            match = re.search(r"Credential=([^/]+)/\d+/[^/]+/([^/]+)/", auth)
            if not match or match.group(1) not in principals:
                continue
            body = entry.get("body") or ""
            if entry.get("body_encoded"):
                body = base64.b64decode(body).decode("utf-8", "replace")
            who, service = principals[match.group(1)], match.group(2)
            calls += [Call(who, a, r, tuple(sorted(c.items()))) for a, r, c in _authorizations(service, entry, body)]
    return calls


def _authorizations(service: str, entry: dict, body: str) -> list:
    url = urlparse(entry["url"])
    query = parse_qs(url.query, keep_blank_values=True)
    target = entry["headers"].get("X-Amz-Target", "")
    method = entry["method"]
    if service == "s3":
        return _s3(method, unquote(url.path), query, entry["headers"], body)
    if service == "dynamodb":
        table = json.loads(body)["TableName"]
        return [(f"dynamodb:{target.split('.')[-1]}", f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{table}", {})]
    if service == "sqs":
        queue = json.loads(body)["QueueUrl"].rstrip("/").rsplit("/", 1)[-1]
        return [(f"sqs:{target.split('.')[-1]}", f"arn:aws:sqs:{REGION}:{ACCOUNT}:{queue}", {})]
    if service == "events":  # PutEvents: authorized per entry, on its bus, with the entry's source
        doc = json.loads(body)
        bus = f"arn:aws:events:{REGION}:{ACCOUNT}:event-bus/%s"
        return [(f"events:{target.split('.')[-1]}", bus % e.get("EventBusName", "default"),
                 {"events:source": e.get("Source", "")}) for e in doc.get("Entries", [])]  # fmt: skip
    if service == "sns":
        form = parse_qs(body)
        return [(f"sns:{form['Action'][0]}", form.get("TopicArn", ["*"])[0], {})]
    if service == "emr-serverless":
        return _emr_serverless(method, url.path, body)
    if service == "elasticmapreduce":
        return _emr(target.split(".")[-1], json.loads(body or "{}"))
    if service == "glue":
        return _glue(target.split(".")[-1], json.loads(body or "{}"))
    return [(f"{service}:{method} {url.path}", "*", {})]


def _s3(method: str, path: str, query: dict, headers: dict, body: str) -> list:
    bucket, _, key = path.lstrip("/").partition("/")
    bucket_arn = f"arn:aws:s3:::{bucket}"
    if not key:
        if method == "POST" and "delete" in query:  # DeleteObjects: per object, DeleteObjectVersion with a VersionId
            objects = re.findall(r"<Object>(.*?)</Object>", body, re.S)
            return [
                (
                    "s3:DeleteObjectVersion" if "<VersionId>" in o else "s3:DeleteObject",
                    f"{bucket_arn}/{unquote(re.search(r'<Key>([^<]*)</Key>', o).group(1))}",
                    {},
                )
                for o in objects
            ]
        if "versions" in query:
            return [("s3:ListBucketVersions", bucket_arn, {"s3:prefix": query.get("prefix", [""])[0]})]
        if "location" in query:
            return [("s3:GetBucketLocation", bucket_arn, {})]
        if method in ("GET", "HEAD"):
            return [("s3:ListBucket", bucket_arn, {"s3:prefix": query.get("prefix", [""])[0]})]
        return [(f"s3:{method} bucket {sorted(query)}", bucket_arn, {})]
    object_arn = f"{bucket_arn}/{key}"
    if method in ("GET", "HEAD"):
        return [("s3:GetObjectVersion" if "versionId" in query else "s3:GetObject", object_arn, {})]
    if method in ("PUT", "POST"):
        found = [("s3:PutObject", object_arn, {})]
        if headers.get("x-amz-copy-source"):
            found.append(("s3:GetObject", "arn:aws:s3:::" + unquote(headers["x-amz-copy-source"]).lstrip("/"), {}))
        return found
    if method == "DELETE":
        if "uploadId" in query:
            return [("s3:AbortMultipartUpload", object_arn, {})]
        return [("s3:DeleteObjectVersion" if "versionId" in query else "s3:DeleteObject", object_arn, {})]
    return [(f"s3:{method} object", object_arn, {})]


def _emr_serverless(method: str, path: str, body: str) -> list:
    parts = path.strip("/").split("/")  # applications/<app>/jobruns[/<id>]
    app = f"arn:aws:emr-serverless:{REGION}:{ACCOUNT}:/applications/{parts[1]}"
    if method == "POST" and parts[2:] == ["jobruns"]:
        doc = json.loads(body)
        found = [("emr-serverless:StartJobRun", app, {})]
        if doc.get("tags"):
            found.append(("emr-serverless:TagResource", f"{app}/jobruns/*", {}))
        found.append(("iam:PassRole", doc["executionRoleArn"], {"iam:PassedToService": "emr-serverless.amazonaws.com"}))
        return found
    if method == "GET" and len(parts) == 4:
        return [("emr-serverless:GetJobRun", f"{app}/jobruns/{parts[3]}", {})]
    if method == "DELETE" and len(parts) == 4:
        return [("emr-serverless:CancelJobRun", f"{app}/jobruns/{parts[3]}", {})]
    if method == "GET" and len(parts) == 3:
        return [("emr-serverless:ListJobRuns", app, {})]
    return [(f"emr-serverless:{method} {path}", app, {})]


def _emr(action: str, doc: dict) -> list:
    if "JobFlowIds" in doc:  # TerminateJobFlows: authorized on each cluster
        cluster = f"arn:aws:elasticmapreduce:{REGION}:{ACCOUNT}:cluster/%s"
        return [(f"elasticmapreduce:{action}", cluster % c, {}) for c in doc["JobFlowIds"]]
    if "ClusterId" in doc:
        return [
            (
                f"elasticmapreduce:{action}",
                f"arn:aws:elasticmapreduce:{REGION}:{ACCOUNT}:cluster/{doc['ClusterId']}",
                {},
            )
        ]
    found = [(f"elasticmapreduce:{action}", "*", {})]
    if action == "RunJobFlow":
        cluster = f"arn:aws:elasticmapreduce:{REGION}:{ACCOUNT}:cluster/*"
        if doc.get("Tags"):
            found.append(("elasticmapreduce:AddTags", cluster, {}))
        if doc.get("AutoTerminationPolicy"):
            found.append(("elasticmapreduce:PutAutoTerminationPolicy", cluster, {}))
        # The instance profile is named as its role (the template makes it so): the role passed is that name.
        role = f"arn:aws:iam::{ACCOUNT}:role/{doc['JobFlowRole']}"
        found.append(("iam:PassRole", role, {"iam:PassedToService": "ec2.amazonaws.com"}))
        service = doc["ServiceRole"]
        service = service if service.startswith("arn:") else f"arn:aws:iam::{ACCOUNT}:role/{service}"
        found.append(("iam:PassRole", service, {"iam:PassedToService": "elasticmapreduce.amazonaws.com"}))
    return found


def _glue(action: str, doc: dict) -> list:
    """A table call is checked against the catalog, its database and the table (glue-specifying-resource-arns)."""
    database = doc.get("DatabaseName")
    table = doc.get("Name") or doc.get("TableInput", {}).get("Name")
    arn = f"arn:aws:glue:{REGION}:{ACCOUNT}:%s"
    resources = [arn % "catalog"] + ([arn % f"database/{database}"] if database else [])
    resources += [arn % f"table/{database}/{table}"] if table else []
    return [(f"glue:{action}", r, {}) for r in resources]


# --- evaluation -----------------------------------------------------------------------------------------
def _list(value) -> list:
    return value if isinstance(value, list) else [value]


def _like(pattern: str, value: str) -> bool:
    return fnmatch.fnmatchcase(value, pattern.replace("[", "[[]"))


def _condition_holds(condition: dict, context: dict) -> bool:
    for operator, tests in condition.items():
        for key, expected in tests.items():
            if key not in context:
                return False  # a condition we cannot evaluate never grants
            value = context[key]
            if operator in ("StringEquals", "ArnEquals"):
                ok = value in _list(expected)
            elif operator in ("StringLike", "ArnLike"):
                ok = any(_like(p, value) for p in _list(expected))
            else:
                return False
            if not ok:
                return False
    return True


def allows(statements: list, call: Call) -> bool:
    """True if some Allow statement grants the call and no Deny statement refuses it."""
    context = dict(call.context)

    def matches(s: dict) -> bool:
        action_ok = any(_like(a.lower(), call.action.lower()) for a in _list(s["Action"]))
        resource_ok = any(_like(r, call.resource) for r in _list(s.get("Resource", "*")))
        return action_ok and resource_ok and _condition_holds(s.get("Condition", {}), context)

    if any(s["Effect"] == "Deny" and matches(s) for s in statements):
        return False
    return any(s["Effect"] == "Allow" and matches(s) for s in statements)
