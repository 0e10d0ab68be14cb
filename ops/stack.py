"""The deployed stack an operator's command looks at: named, or taken from a samconfig.toml environment as
`sam deploy --config-env` names it; checked to be this application's; its outputs and parameters."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass

from ops.preflight import DENIED, NO_CREDENTIALS, UNREACHABLE, CallFailed, UsageError, call, read_samconfig

APPLICATION = "image-features"  # template.yaml's Outputs.Application: what tells this application's stacks apart


class StackError(Exception):
    """What stops the command, in one line for the operator (exit status 1)."""


@dataclass(frozen=True)
class Stack:
    name: str
    region: str
    outputs: dict
    parameters: dict
    status: str = ""

    @property
    def engine(self) -> str:
        return self.parameters.get("Engine", "serverless")

    def output(self, name: str) -> str:
        try:
            return self.outputs[name]
        except KeyError:
            raise StackError(f"stack {self.name} in {self.region} has no output {name}: deploy this version of the "
                             "template (sam build && sam deploy)") from None  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--stack or --config-env, --region, --profile: as the AWS CLI and `sam deploy` take them."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--stack", metavar="NAME", help="the stack's name (default: the samconfig environment's)")
    which.add_argument(
        "--config-env",
        metavar="ENV",
        default="default",
        help="samconfig.toml environment whose stack_name and region to use (default: %(default)s)",
    )
    parser.add_argument("--region", help="AWS region (default: samconfig.toml's, then the profile's)")
    parser.add_argument("--profile", help="AWS named profile (default: boto3's: AWS_PROFILE, then 'default')")


def resolve(args: argparse.Namespace, default_region: str | None) -> tuple:
    """(stack name, region) from --stack / --config-env and --region, as `sam deploy` would pick them."""
    config = read_samconfig()
    env = config.get(args.config_env) if not args.stack else config.get("default")
    if not args.stack and not isinstance(env, Mapping):
        envs = ", ".join(k for k, v in config.items() if isinstance(v, Mapping))
        raise UsageError(f"samconfig.toml has no environment {args.config_env!r} (it has: {envs})")
    sections = [(env or {}).get(s, {}).get("parameters", {}) for s in ("deploy", "global")]
    name = args.stack or sections[0].get("stack_name")
    if not name:
        raise UsageError(f"samconfig.toml's {args.config_env!r} has no stack_name: pass --stack NAME")
    region = args.region or next((str(s["region"]) for s in sections if s.get("region")), None) or default_region
    if not region:
        raise UsageError("no region: pass --region")
    return name, region


def describe(cfn, name: str, region: str) -> Stack:
    """The stack, if it is this application's; StackError in one line otherwise."""
    try:
        found = call(cfn, "describe_stacks", StackName=name)["Stacks"]
    except CallFailed as exc:
        if exc.code == "ValidationError" and "does not exist" in exc.detail:
            raise StackError(f"no stack {name} in {region}: check --stack and --region (or --config-env)") from None
        raise StackError(explain(exc)) from None
    stack = found[0]
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
    parameters = {p["ParameterKey"]: p.get("ResolvedValue", p.get("ParameterValue", "")) for p in
                  stack.get("Parameters", [])}  # fmt: skip
    if outputs.get("Application") != APPLICATION:
        raise StackError(f"stack {name} in {region} is not an {APPLICATION} stack (no output Application = "
                         f"{APPLICATION}); name the stack `sam deploy` made from this repository")  # fmt: skip
    return Stack(name, region, outputs, parameters, stack.get("StackStatus", ""))


def explain(exc: CallFailed) -> str:
    """A failed call in one line that names it."""
    if exc.code in DENIED:
        return f"{exc.action} denied: allow it to this identity, or use a profile that has it (--profile)"
    if exc.code in NO_CREDENTIALS:
        return f"no AWS credentials, {exc.action} not sent: aws configure sso (or aws configure), then --profile NAME"
    if exc.code in UNREACHABLE:
        return f"{exc.action} could not reach AWS ({exc.detail})"
    return f"{exc.action} failed ({exc.code}: {exc.detail})"
