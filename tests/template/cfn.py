"""template.yaml as the tests see it: conditions resolved, intrinsic functions replaced by the names and ARNs
one concrete stack would have, and the IAM policies each principal of the stack gets."""

from __future__ import annotations

import re
from pathlib import Path

from cfnlint.decode import decode

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE, _ = decode(str(ROOT / "template.yaml"))
RESOURCES = TEMPLATE["Resources"]
ENGINES = [{"IsServerless": True, "IsEc2": False}, {"IsServerless": False, "IsEc2": True}]
MODES = [{"UseKms": True}, {"UseKms": False}]
NO_VALUE = object()
PRINCIPALS = {  # who runs with which policies: the functions' roles, and the EMR runtime (or instance) role
    "TriggerFunction": "trigger",
    "JobStateFunction": "job_state",
    "ArtifactsFunction": "artifacts",
    "EmrRuntimeRole": "job",
}


def resolve(node, conditions: dict):
    """Evaluate Fn::If for one set of condition values and drop AWS::NoValue, like CloudFormation does."""
    if isinstance(node, dict):
        if set(node) == {"Fn::If"}:
            name, yes, no = node["Fn::If"]
            return resolve(yes if conditions.get(name, True) else no, conditions)
        if node == {"Ref": "AWS::NoValue"}:
            return NO_VALUE
        out = {k: resolve(v, conditions) for k, v in node.items()}
        return {k: v for k, v in out.items() if v is not NO_VALUE}
    if isinstance(node, list):
        return [v for v in (resolve(x, conditions) for x in node) if v is not NO_VALUE]
    return node


def as_list(value):
    return value if isinstance(value, list) else [value]


def identity_statements(conditions: dict) -> dict:
    """Every Allow/Deny statement of the IAM identity policies the stack creates, by owner."""
    out = {}
    for name, res in RESOURCES.items():
        if res.get("Condition") and not conditions.get(res["Condition"], True):
            continue
        props = resolve(res.get("Properties", {}), conditions)
        docs = []
        if res["Type"] == "AWS::Serverless::Function":
            for policy in props.get("Policies", []):
                if isinstance(policy, dict) and "Ref" in policy:  # a managed policy of this template
                    managed = resolve(RESOURCES[policy["Ref"]]["Properties"], conditions)
                    docs.append(managed["PolicyDocument"])
                elif isinstance(policy, dict):
                    docs.append(policy)
        elif res["Type"] == "AWS::IAM::Role":
            docs = [p["PolicyDocument"] for p in props.get("Policies", [])]
            for arn in props.get("ManagedPolicyArns", []):
                if isinstance(arn, dict) and "Ref" in arn:
                    docs.append(resolve(RESOURCES[arn["Ref"]]["Properties"], conditions)["PolicyDocument"])
        elif res["Type"] == "AWS::IAM::ManagedPolicy":
            docs = [props["PolicyDocument"]]
        out[name] = [s for doc in docs for s in as_list(doc["Statement"])]
    return out


def arn_text(resource) -> str:
    if isinstance(resource, dict) and "Fn::Sub" in resource:
        return resource["Fn::Sub"]
    if isinstance(resource, dict) and "Fn::GetAtt" in resource:
        return "${" + ".".join(as_list(resource["Fn::GetAtt"])) + "}"
    if isinstance(resource, dict) and "Ref" in resource:
        return "${" + resource["Ref"] + "}"
    return str(resource)


def stack_values(account: str, region: str, bucket: str, table: str, app_id: str, names: dict) -> dict:
    """What Ref and GetAtt give in one concrete stack. names: logical id -> physical name (queues, topic, roles)."""
    arn = f"arn:aws:%s:{region}:{account}:%s"
    values = {
        "AWS::Partition": "aws", "AWS::Region": region, "AWS::AccountId": account,
        "DataBucket": bucket, "DataBucket.Arn": f"arn:aws:s3:::{bucket}",
        "RunsTable": table, "RunsTable.Arn": arn % ("dynamodb", f"table/{table}"),
        "EmrApplication": app_id, "EmrApplication.Arn": arn % ("emr-serverless", f"/applications/{app_id}"),
        "DataKey": "key-1", "DataKey.Arn": arn % ("kms", "key/key-1"),
        "ResultsDatabase": "image_features_dev",
    }  # fmt: skip
    for logical, name in names.items():
        kind = RESOURCES[logical]["Type"]
        if kind == "AWS::SQS::Queue":
            values[f"{logical}.Arn"] = arn % ("sqs", name)
            values[logical] = f"https://sqs.{region}.amazonaws.com/{account}/{name}"
        elif kind == "AWS::SNS::Topic":
            values[logical] = arn % ("sns", name)
        elif kind == "AWS::IAM::Role":
            values[logical], values[f"{logical}.Arn"] = name, f"arn:aws:iam::{account}:role/{name}"
        else:
            values[logical] = name
    for key, default in TEMPLATE["Parameters"].items():
        values.setdefault(key, str(default.get("Default", "")))
    return values


def substitute(node, values: dict):
    """Replace Ref, GetAtt and Sub by the values of one stack."""
    if isinstance(node, dict):
        if set(node) == {"Ref"}:
            return values[node["Ref"]]
        if set(node) == {"Fn::GetAtt"}:
            return values[".".join(as_list(node["Fn::GetAtt"]))]
        if set(node) == {"Fn::Sub"}:
            text, local = node["Fn::Sub"], {}
            if isinstance(text, list):  # [text, {name: value}]
                text, local = text[0], {k: substitute(v, values) for k, v in text[1].items()}
            return re.sub(r"\$\{([^}]+)\}", lambda m: {**values, **local}[m.group(1)], text)
        if set(node) == {"Fn::Split"}:
            separator, text = node["Fn::Split"]
            return substitute(text, values).split(separator)
        if set(node) == {"Fn::Select"}:
            index, items = node["Fn::Select"]
            return substitute(items, values)[int(index)]
        return {k: substitute(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute(v, values) for v in node]
    return node


def policies(conditions: dict, values: dict) -> dict:
    """principal ("trigger", "job_state", "job") -> its IAM statements, with concrete ARNs."""
    statements = identity_statements(conditions)
    return {role: substitute(statements[logical], values) for logical, role in PRINCIPALS.items()}
