"""template.yaml read as CloudFormation would: parameters (template defaults, then a samconfig environment),
conditions, and Ref / GetAtt / Sub / If against the physical ids the local stack gives its resources."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import tomllib
from cfnlint.decode import decode

ROOT = Path(__file__).resolve().parents[2]
ACCOUNT, REGION = "123456789012", "eu-west-3"
NO_VALUE = object()


class Template:
    """path: template.yaml, or the one `sam build` leaves (code and layer paths relative to it)."""

    def __init__(self, config_env: str = "local", overrides: dict | None = None, path: Path | None = None):
        self.path = Path(path or ROOT / "template.yaml")
        self.doc, _ = decode(str(self.path))
        self.parameters = {k: str(v.get("Default", "")) for k, v in self.doc["Parameters"].items()}
        self.parameters.update(samconfig_overrides(config_env))
        self.parameters.update(overrides or {})  # as `sam deploy --parameter-overrides` would
        self.values = {"AWS::Region": REGION, "AWS::AccountId": ACCOUNT, "AWS::Partition": "aws",
                       "AWS::StackName": f"image-features-{self.parameters['Stage']}", **self.parameters}  # fmt: skip
        self.conditions = {name: self._condition(c) for name, c in self.doc.get("Conditions", {}).items()}

    # --- conditions and intrinsics ------------------------------------------------------------------------
    def _condition(self, node) -> bool:
        if isinstance(node, dict):
            if "Fn::Equals" in node:
                a, b = (self.value(x) for x in node["Fn::Equals"])
                return str(a) == str(b)
            if "Fn::Not" in node:
                return not self._condition(node["Fn::Not"][0])
            if "Fn::And" in node:
                return all(self._condition(x) for x in node["Fn::And"])
            if "Fn::Or" in node:
                return any(self._condition(x) for x in node["Fn::Or"])
            if "Condition" in node:
                return self.conditions[node["Condition"]]
        raise ValueError(f"condition not understood: {node}")

    def value(self, node):
        """Resolve intrinsics; physical ids come from self.values (filled in as resources are created)."""
        if isinstance(node, dict):
            if set(node) == {"Ref"}:
                return NO_VALUE if node["Ref"] == "AWS::NoValue" else self.values[node["Ref"]]
            if set(node) == {"Fn::FindInMap"}:
                name, top, second = (self.value(x) for x in node["Fn::FindInMap"])
                return self.doc["Mappings"][name][top][second]
            if set(node) == {"Fn::GetAtt"}:
                target = node["Fn::GetAtt"]
                target = target if isinstance(target, list) else target.split(".", 1)
                return self.values[".".join(target)]
            if set(node) == {"Fn::Sub"}:
                text, local = node["Fn::Sub"], {}
                if isinstance(text, list):  # [text, {name: value}]
                    text, local = text[0], {k: self.value(v) for k, v in text[1].items()}
                return re.sub(r"\$\{([^}]+)\}", lambda m: str({**self.values, **local}[m.group(1)]), text)
            if set(node) == {"Fn::Select"}:
                index, items = node["Fn::Select"]
                return self.value(items)[int(index)]
            if set(node) == {"Fn::Join"}:
                separator, parts = node["Fn::Join"]
                return separator.join(str(x) for x in self.value(parts))
            if set(node) == {"Fn::Split"}:
                separator, text = node["Fn::Split"]
                return str(self.value(text)).split(separator)
            if set(node) == {"Fn::If"}:
                name, yes, no = node["Fn::If"]
                return self.value(yes if self.conditions[name] else no)
            out = {k: self.value(v) for k, v in node.items()}
            return {k: v for k, v in out.items() if v is not NO_VALUE}
        if isinstance(node, list):
            return [v for v in (self.value(x) for x in node) if v is not NO_VALUE]
        return node

    # --- resources ------------------------------------------------------------------------------------------
    def resources(self) -> list:
        """(logical id, resource) of the resources this stack's conditions keep, dependencies first."""
        kept = {name: r for name, r in self.doc["Resources"].items()
                if not r.get("Condition") or self.conditions[r["Condition"]]}  # fmt: skip
        ordered, seen = [], set()

        def visit(name: str) -> None:
            if name in seen or name not in kept:
                return
            seen.add(name)
            needs = references(kept[name]) | set(_list(kept[name].get("DependsOn", [])))
            if kept[name]["Type"] == "AWS::Serverless::Function":  # SAM merges Globals into each function
                needs |= references(self.doc.get("Globals", {}).get("Function", {}))
            for dependency in sorted(needs):
                visit(dependency)
            ordered.append((name, kept[name]))

        for name in kept:
            visit(name)
        return ordered


def references(node) -> set:
    """Logical ids a node refers to (Ref, GetAtt, and ${...} in Sub)."""
    found = set()
    if isinstance(node, dict):
        if "Ref" in node and isinstance(node["Ref"], str):
            found.add(node["Ref"])
        if "Fn::GetAtt" in node:
            target = node["Fn::GetAtt"]
            found.add(target[0] if isinstance(target, list) else target.split(".")[0])
        if "Fn::Sub" in node:
            text, local = (node["Fn::Sub"], {}) if isinstance(node["Fn::Sub"], str) else node["Fn::Sub"]
            found |= {m.split(".")[0] for m in re.findall(r"\$\{([^}]+)\}", text) if m not in local}
        for v in node.values():
            found |= references(v)
    elif isinstance(node, list):
        for v in node:
            found |= references(v)
    return {f for f in found if not f.startswith("AWS::")}


def _list(value) -> list:
    return value if isinstance(value, list) else [value]


def samconfig_overrides(config_env: str) -> dict:
    """parameter_overrides of one samconfig.toml environment, as `sam deploy --config-env` reads them."""
    with open(ROOT / "samconfig.toml", "rb") as fh:
        env = tomllib.load(fh)[config_env]
    text = env["deploy"]["parameters"].get("parameter_overrides", "")
    return dict(item.split("=", 1) for item in shlex.split(text))
