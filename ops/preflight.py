"""Preflight: can this account and region take the stack, and does this machine have what `sam build` runs?

Every check is a plain function over injected boto3 clients (read calls only) or injected probes of the machine,
and returns Check records; none prints. `run_preflight` runs them for one Target: the deployment that
`sam deploy --config-env ENV` would make (template defaults, then samconfig.toml, then the command line)."""

from __future__ import annotations

import base64
import functools
import os
import re
import shlex
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import yaml
from botocore.exceptions import BotoCoreError, ClientError

from emr_job import package  # stdlib only: samconfig.toml's parameter_overrides, read as `make deploy` reads them

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "template.yaml"
SAMCONFIG = ROOT / "samconfig.toml"
MAKEFILE = ROOT / "Makefile"
LOCAL_SAM = ".venv-sam/bin/sam"  # where `make sam-setup` installs the tested SAM CLI
QUOTA_SERVICE, QUOTA_CODE = "emr-serverless", "L-D05C8A75"  # "Max concurrent vCPUs per account", per region
EMR_TAG = "for-use-with-amazon-emr-managed-policies"  # AmazonEMRServicePolicy_v2 acts only on resources tagged so
CLEANUP_ROLE = "AWSServiceRoleForEMRCleanup"
MIN_PYTHON = (3, 9)  # emr_job/package.py, which `sam build` runs with the machine's python3
DEFAULT_INDEX = "https://pypi.org/simple/"
DENIED = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "UnauthorizedException"}
NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "ProfileNotFound", "SSOTokenLoadError",
                  "UnauthorizedSSOTokenError", "TokenRetrievalError"}  # fmt: skip
REFUSED = {"ExpiredToken", "ExpiredTokenException", "InvalidClientTokenId", "UnrecognizedClientException",
           "SignatureDoesNotMatch", "AuthFailure", "RequestExpired"}  # fmt: skip
UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError"}
READ_PERMISSIONS = ("sts:GetCallerIdentity", "servicequotas:GetServiceQuota", "servicequotas:GetAWSDefaultServiceQuota",
                    "ec2:DescribeSubnets", "ec2:DescribeVpcs", "ec2:DescribeRouteTables", "ec2:DescribeVpcEndpoints",
                    "iam:GetRole")  # fmt: skip

CHECKS_HELP = f"""\
checks, in this order (each prints ok, warn or FAIL; what is not ok comes with the command that fixes it):
  region       the region is one the template's EuropeanRegion rule allows (GDPR) and offers EMR Serverless
               (Engine=ec2: EMR), per botocore's endpoint data
  parameters   every parameter is one template.yaml declares, within its AllowedValues; one without a default
               and without a value is a warning (a new stack needs it, an existing stack keeps its own)
  sam          the SAM CLI answers `sam --version` (--sam, else `sam` on PATH, else {LOCAL_SAM}); older than
               the version `make sam-setup` installs is a warning
  python       python3 on PATH has pip and is {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer (sam build runs `python3 -m pip`)
  make         `make --version` answers (sam build runs lambdas/Makefile and emr_job/Makefile)
  index        pip's package index (PIP_INDEX_URL, else pip config's index-url, else PyPI) answers over HTTPS
  credentials  sts:GetCallerIdentity answers; without credentials the checks below are not run
  quota        Engine=serverless: the account's EMR Serverless quota "Max concurrent vCPUs per account"
               ({QUOTA_SERVICE} {QUOTA_CODE}; GetServiceQuota, else GetAWSDefaultServiceQuota) covers MaxVcpu
  ec2-*        Engine=ec2: Ec2SubnetId exists; the subnet and its VPC are tagged
               {EMR_TAG}=true; an S3 gateway endpoint is on the subnet's route
               table; a private subnet has a NAT route or interface endpoints for Glue and EMR;
               {CLEANUP_ROLE} exists (missing: a warning)

A refused AWS call is a FAIL that names the IAM action. The read permissions used:
  {", ".join(READ_PERMISSIONS[:4])},
  {", ".join(READ_PERMISSIONS[4:])}.
Exit status: 0 when nothing failed (warnings allowed), 1 when a check failed, 2 for bad usage."""


class UsageError(ValueError):
    """The command line or samconfig.toml names something that does not exist."""


class CallFailed(Exception):
    """An AWS read call that did not answer: the IAM action it needs, and AWS's (or botocore's) error code."""

    def __init__(self, action: str, code: str, detail: str):
        super().__init__(f"{action}: {code}: {detail}")
        self.action, self.code, self.detail = action, code, detail


@dataclass(frozen=True)
class Check:
    name: str  # a stable id for --json readers: region, quota, ec2-subnet-tag, ...
    status: str  # ok | warn | fail
    message: str  # what was seen, one line
    fix: str = ""  # the command (or change) that fixes it; further lines are alternatives


def ok(name: str, message: str) -> Check:
    return Check(name, "ok", message)


def warn(name: str, message: str, fix: str) -> Check:
    return Check(name, "warn", message, fix)


def fail(name: str, message: str, fix: str = "") -> Check:
    return Check(name, "fail", message, fix)


@dataclass(frozen=True)
class Target:
    """The deployment `sam deploy --config-env ENV` would make: where, with which parameters, with which CLI."""

    config_env: str
    region: str
    parameters: dict  # template defaults, then samconfig's parameter_overrides, then --parameter-overrides
    declared: dict  # template.yaml's Parameters, as written
    eu_regions: tuple
    profile: str | None = None
    sam: str | None = None

    @property
    def engine(self) -> str:
        return self.parameters.get("Engine", "serverless")


def run_command(command: list) -> tuple:
    """(exit status, stdout and stderr); 127 when the program cannot be started."""
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, str(exc)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def http_status(url: str, timeout: float = 5.0) -> int:
    """The HTTP status of a GET; OSError when nothing answers. Credentials in the URL are sent as Basic auth."""
    parts = urllib.parse.urlsplit(url)
    headers = {"User-Agent": "image-features-preflight"}
    if parts.username:
        user = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(user.encode()).decode()
        url = redacted(url)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def offered_regions(service: str) -> list:
    return boto3.session.Session().get_available_regions(service)


@dataclass(frozen=True)
class Probes:
    """The machine's side of the checks; tests give canned answers, so they never reach the network."""

    which: Callable = shutil.which
    run: Callable = run_command  # [program, args...] -> (exit status, output)
    fetch: Callable = http_status  # url -> HTTP status, or OSError
    regions: Callable = offered_regions  # service -> the regions botocore's endpoint data lists for it
    env: Mapping = field(default_factory=lambda: os.environ)


# ---- the deployment --------------------------------------------------------------------------------------------


class _CfnLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's when there: ten times faster
    """template.yaml with CloudFormation's short forms (!Ref, !Sub, ...) read as their long forms."""


def _cfn_tag(loader, suffix, node):
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {"Ref" if suffix == "Ref" else f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _cfn_tag)


@functools.lru_cache(maxsize=4)
def load_template(path: Path = TEMPLATE) -> dict:
    with open(path) as fh:
        return yaml.load(fh, Loader=_CfnLoader)  # a SafeLoader: no arbitrary objects


def eu_regions(template: dict) -> tuple:
    """The regions of the template's EuropeanRegion rule: the list CloudFormation itself will check."""
    for assertion in template["Rules"]["EuropeanRegion"]["Assertions"]:
        regions, _ = assertion["Assert"]["Fn::Contains"]
        return tuple(regions)
    raise ValueError("template.yaml: the EuropeanRegion rule has no assertion")


def read_samconfig(path: Path = SAMCONFIG) -> dict:
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # as emr_job/package.py does: the SAM CLI's environment has tomlkit
        import tomlkit as tomllib

    with open(path, "rb") as fh:
        return tomllib.loads(fh.read().decode())


def parse_overrides(text: str) -> dict:
    """`Key=Value Key='a value'` as SAM's --parameter-overrides reads it: quotes keep spaces."""
    try:
        tokens = shlex.split(text)
    except ValueError as exc:  # an unclosed quote
        raise UsageError(f"parameter overrides {text!r}: {exc}") from exc
    pairs = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise UsageError(f"parameter override {token!r} is not Key=Value")
        pairs[key] = value
    return pairs


def resolve_target(config_env: str, *, region: str | None = None, profile: str | None = None, overrides: str = "",
                   sam: str | None = None, default_region: str | None = None) -> Target:  # fmt: skip
    """Region as `sam deploy` picks it: --region, then samconfig.toml (deploy, then global), then boto3's own."""
    template, config = load_template(), read_samconfig()
    if not isinstance(config.get(config_env), Mapping):
        envs = ", ".join(k for k, v in config.items() if isinstance(v, Mapping))
        raise UsageError(f"samconfig.toml has no environment {config_env!r} (it has: {envs})")
    env, declared = config[config_env], template["Parameters"]
    parameters = {name: str(spec["Default"]) for name, spec in declared.items() if "Default" in spec}
    parameters.update(parse_overrides(package.overrides(config_env) if "deploy" in env else ""))
    parameters.update(parse_overrides(overrides))
    sections = [env.get(section, {}).get("parameters", {}) for section in ("deploy", "global")]
    region = region or next((str(s["region"]) for s in sections if s.get("region")), None) or default_region
    if not region:
        raise UsageError("no region: pass --region, or set region under [ENV.global.parameters] in samconfig.toml")
    return Target(config_env, region, parameters, declared, eu_regions(template), profile, sam)


def aws_cli(target: Target, command: str) -> str:
    """An AWS CLI command for a fix line, aimed at the same region and profile as the checks."""
    profile = f" --profile {target.profile}" if target.profile else ""
    return f"aws {command} --region {target.region}{profile}"


def vcpus(text: str) -> float | None:
    """'16 vCPU' or '16' -> 16.0 (EMR Serverless capacity strings)."""
    match = re.match(r"\s*(\d+(?:\.\d+)?)\s*(vcpu)?\s*$", text, re.IGNORECASE)
    return float(match.group(1)) if match else None


# ---- AWS calls -------------------------------------------------------------------------------------------------


IAM_PREFIX = {"monitoring": "cloudwatch"}  # signing names that are not the IAM prefix of their actions


def call(client, method: str, **kwargs) -> dict:
    """One read call; any failure becomes CallFailed naming the IAM action (for the services used here, the
    signing name is the IAM prefix: sts, servicequotas, ec2, iam)."""
    prefix = IAM_PREFIX.get(client.meta.service_model.signing_name, client.meta.service_model.signing_name)
    action = f"{prefix}:{client.meta.method_to_api_mapping[method]}"
    try:
        return getattr(client, method)(**kwargs)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise CallFailed(action, error.get("Code", ""), error.get("Message", "")) from exc
    except BotoCoreError as exc:
        raise CallFailed(action, type(exc).__name__, str(exc)) from exc


def failed_call(name: str, title: str, exc: CallFailed, target: Target) -> Check:
    profile = f" --profile {target.profile}" if target.profile else ""
    if exc.code in DENIED:
        fix = f"allow {exc.action} to the identity you deploy with, or use a profile that has it (--profile)"
        return fail(name, f"{title}: {exc.action} denied", fix)
    if exc.code in NO_CREDENTIALS:
        fix = "aws configure sso   (or aws configure), then pass --profile NAME or set AWS_PROFILE"
        return fail(name, f"{title}: no AWS credentials, {exc.action} not sent ({exc.detail})", fix)
    if exc.code in REFUSED:
        fix = (f"aws sso login{profile}   (or renew the access keys)\nor, in an opt-in region, enable it: "
               f"aws account enable-region --region-name {target.region}{profile}")  # fmt: skip
        return fail(name, f"{title}: {exc.action} refused the credentials ({exc.code}: {exc.detail})", fix)
    if exc.code in UNREACHABLE:
        fix = "check the network, or the proxy (HTTPS_PROXY), towards AWS's endpoints"
        return fail(name, f"{title}: {exc.action} could not reach AWS ({exc.detail})", fix)
    return fail(name, f"{title}: {exc.action} failed ({exc.code}: {exc.detail})")


def guarded(name: str, title: str, target: Target, check: Callable) -> list:
    """A check's results, or one failed Check naming the call that did not answer."""
    try:
        result = check()
    except CallFailed as exc:
        return [failed_call(name, title, exc, target)]
    return result if isinstance(result, list) else [result]


# ---- checks: region and parameters -----------------------------------------------------------------------------


def check_region(target: Target, probes: Probes) -> Check:
    service, label = ("emr-serverless", "EMR Serverless") if target.engine == "serverless" else ("emr", "EMR")
    offered = set(probes.regions(service))
    in_eu, has_it = target.region in target.eu_regions, target.region in offered
    if in_eu and has_it:
        return ok("region", f"region {target.region}: in the EU, offers {label}")
    problems = [] if in_eu else ["not in the EU, and the template's EuropeanRegion rule refuses it (GDPR)"]
    problems += [] if has_it else [f"does not offer {label}"]
    choices = [r for r in target.eu_regions if r in offered]
    pick = "eu-west-3" if "eu-west-3" in choices else (choices or ["eu-..."])[0]
    fix = (f'region = "{pick}" under [{target.config_env}.global.parameters] in samconfig.toml, or --region {pick}'
           f"\nEU regions that offer {label}: {', '.join(choices) or 'none that this botocore knows'}")  # fmt: skip
    return fail("region", f"region {target.region}: {'; '.join(problems)}", fix)


def check_parameters(target: Target) -> Check:
    given, declared = target.parameters, target.declared
    unknown = sorted(set(given) - set(declared))
    allowed = {k: [str(v) for v in spec["AllowedValues"]] for k, spec in declared.items() if "AllowedValues" in spec}
    bad = [f"{k}={given[k]!r} (allowed: {', '.join(values)})" for k, values in allowed.items()
           if k in given and given[k] not in values]  # fmt: skip
    if unknown or bad:
        what = ([f"not in template.yaml: {', '.join(unknown)}"] if unknown else []) + bad
        where = f"parameter_overrides of [{target.config_env}.deploy.parameters] in samconfig.toml"
        return fail("parameters", f"parameters: {'; '.join(what)}", f"correct --parameter-overrides or the {where}")
    seen = f"Engine={target.engine}, " + (f"MaxVcpu={given.get('MaxVcpu')}" if target.engine == "serverless"
                                          else f"Ec2SubnetId={given.get('Ec2SubnetId')}")  # fmt: skip
    missing = sorted(k for k in declared if k not in given)
    if missing:
        fix = f"--parameter-overrides {' '.join(f'{k}=...' for k in missing)}   (or sam deploy --guided)"
        return warn("parameters", f"parameters: {seen}; no value for {', '.join(missing)}: a new stack needs one, "
                    "an existing stack keeps its own", fix)  # fmt: skip
    return ok("parameters", f"parameters: {seen}")


# ---- checks: the tools `sam build` runs ------------------------------------------------------------------------


def tested_sam_version(makefile: Path = MAKEFILE) -> tuple | None:
    """The SAM CLI version `make sam-setup` installs: the Makefile's SAM_CLI_VERSION."""
    try:
        match = re.search(r"^SAM_CLI_VERSION\s*:?=\s*(\d+)\.(\d+)\.(\d+)", makefile.read_text(), re.MULTILINE)
    except OSError:
        return None
    return tuple(int(x) for x in match.groups()) if match else None


def check_sam(target: Target, probes: Probes) -> Check:
    setup = "make sam-setup   (the tested SAM CLI, into .venv-sam/; make deploy uses that one)"
    sam = probes.which(target.sam) if target.sam else probes.which("sam") or probes.which(str(ROOT / LOCAL_SAM))
    if not sam:
        where = f"{target.sam} is not there" if target.sam else f"missing: no `sam` on PATH, no {LOCAL_SAM}"
        return fail("sam", f"sam: the SAM CLI {where}", setup)
    rc, out = probes.run([sam, "--version"])
    version = re.search(r"(\d+)\.(\d+)\.(\d+)", out) if rc == 0 else None
    if not version:
        return fail("sam", f"sam: `{sam} --version` failed: {(out.splitlines() or ['no output'])[-1]}", setup)
    found, tested = tuple(int(x) for x in version.groups()), tested_sam_version()
    if tested and found < tested:
        older = f"SAM CLI {'.'.join(map(str, found))} ({sam}) is older than the tested {'.'.join(map(str, tested))}"
        return warn("sam", f"sam: {older}; it may not know the functions' runtime (python3.14)", setup)
    return ok("sam", f"sam: SAM CLI {'.'.join(map(str, found))} ({sam})")


def check_python(probes: Probes) -> Check:
    python = probes.which("python3")
    if not python:
        fix = "install Python 3.9 or newer with pip (python.org, or the system's python3 and python3-pip packages)"
        return fail("python", "python: no python3 on PATH (sam build runs `python3 -m pip`)", fix)
    rc, out = probes.run([python, "-m", "pip", "--version"])
    if rc != 0:
        fix = "python3 -m ensurepip --upgrade   (Debian/Ubuntu: sudo apt-get install python3-pip)"
        return fail("python", f"python: {python} has no pip (sam build runs `python3 -m pip`)", fix)
    pip, lang = re.match(r"pip (\S+)", out), re.search(r"\(python (\d+)\.(\d+)\)", out)
    version = (int(lang.group(1)), int(lang.group(2))) if lang else None
    shown = f"Python {version[0]}.{version[1]}" if version else "Python ?"
    if version and version < MIN_PYTHON:
        need = f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]}"
        return fail("python", f"python: {python} is {shown}; sam build needs {need} or newer",
                    f"put Python {need} or newer first on PATH, as python3")  # fmt: skip
    return ok("python", f"python: {python}, pip {pip.group(1) if pip else '?'} ({shown})")


def check_make(probes: Probes) -> Check:
    make = probes.which("make")
    rc, out = probes.run([make, "--version"]) if make else (127, "")
    if rc != 0:
        fix = "install make (Debian/Ubuntu: sudo apt-get install make; macOS: xcode-select --install)"
        return fail("make", "make: missing (sam build runs lambdas/Makefile and emr_job/Makefile)", fix)
    return ok("make", f"make: {(out.splitlines() or ['make'])[0]}")


def pip_index_url(probes: Probes) -> str:
    """The index `pip install` would use: PIP_INDEX_URL, then pip's configuration, then PyPI."""
    if probes.env.get("PIP_INDEX_URL"):
        return probes.env["PIP_INDEX_URL"]
    python = probes.which("python3")
    rc, out = probes.run([python, "-m", "pip", "config", "list"]) if python else (1, "")
    found = dict(line.split("=", 1) for line in out.splitlines() if "=" in line) if rc == 0 else {}
    for key in ("install.index-url", "global.index-url"):
        if found.get(key):
            return found[key].strip().strip("'\"")
    return DEFAULT_INDEX


def redacted(url: str) -> str:
    """The URL without the credentials it may carry (private indexes put tokens there)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])) if parts.username else url


def check_index(probes: Probes) -> Check:
    index = pip_index_url(probes)
    fix = "check the network or the proxy (HTTPS_PROXY), or an index you can reach: pip config set global.index-url URL"
    try:
        status = probes.fetch(index.rstrip("/") + "/pip/")  # the simple API's page of a project every index has
    except OSError as exc:
        reason = getattr(exc, "reason", None) or exc
        return fail("index", f"index: {redacted(index)} unreachable ({reason}); sam build downloads from it", fix)
    if 200 <= status < 400:
        return ok("index", f"index: {redacted(index)} answers (HTTP {status})")
    hint = "; does it need credentials?" if status in (401, 403) else ""
    return fail("index", f"index: {redacted(index)} answered HTTP {status}{hint}", fix)


# ---- checks: the account (read calls) --------------------------------------------------------------------------


def check_credentials(sts) -> Check:
    identity = call(sts, "get_caller_identity")
    return ok("credentials", f"credentials: account {identity['Account']}, {identity['Arn']}")


def spark_conf(target: Target, key: str, default: int) -> int:
    match = re.search(rf"{re.escape(key)}=(\d+)", target.parameters.get("SparkSubmitParameters", ""))
    return int(match.group(1)) if match else default


def check_quota(target: Target, quotas) -> Check:
    asked = vcpus(target.parameters.get("MaxVcpu", ""))
    if asked is None:
        return fail("quota", f"quota: MaxVcpu={target.parameters.get('MaxVcpu')!r} is not a vCPU count",
                    "--parameter-overrides MaxVcpu='16 vCPU'")  # fmt: skip
    ids = {"ServiceCode": QUOTA_SERVICE, "QuotaCode": QUOTA_CODE}
    try:
        quota, source = call(quotas, "get_service_quota", **ids)["Quota"], "this account's quota"
    except CallFailed as exc:
        if exc.code != "NoSuchResourceException":
            raise
        # Never changed in this account: GetServiceQuota has nothing, and the AWS default applies.
        quota, source = call(quotas, "get_aws_default_service_quota", **ids)["Quota"], "the AWS default"
    allowed = float(quota["Value"])
    seen = f"EMR Serverless allows {allowed:g} concurrent vCPUs in {target.region} ({source})"
    if allowed >= asked:
        return ok("quota", f"quota: {seen}; MaxVcpu is {asked:g}")
    # The other way out: a smaller application, and no more executors than it holds beside the driver.
    driver, cores = spark_conf(target, "spark.driver.cores", 4), spark_conf(target, "spark.executor.cores", 4)
    executors = max(1, int(allowed - driver) // cores)
    fix = aws_cli(target, f"service-quotas request-service-quota-increase --service-code {QUOTA_SERVICE} "
                          f"--quota-code {QUOTA_CODE} --desired-value {asked:g}")  # fmt: skip
    fix += (f"\nor deploy with MaxVcpu='{allowed:g} vCPU' and --conf spark.dynamicAllocation.maxExecutors={executors}"
            " in SparkSubmitParameters")  # fmt: skip
    return fail("quota", f"quota: MaxVcpu is {asked:g}, but {seen}: runs would not get that capacity", fix)


# ---- checks: Engine=ec2 ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Network:
    """What an EMR on EC2 cluster launches into: the subnet, its VPC, its route table, the VPC's endpoints."""

    subnet: dict
    vpc: dict
    route_table: dict
    endpoints: list


def describe_network(ec2, subnet_id: str) -> Network | None:
    """None when the subnet does not exist in this region."""
    try:
        [subnet] = call(ec2, "describe_subnets", SubnetIds=[subnet_id])["Subnets"]
    except CallFailed as exc:
        if exc.code in ("InvalidSubnetID.NotFound", "InvalidSubnetID.Malformed"):
            return None
        raise
    in_vpc = {"Name": "vpc-id", "Values": [subnet["VpcId"]]}
    [vpc] = call(ec2, "describe_vpcs", VpcIds=[subnet["VpcId"]])["Vpcs"]
    tables = call(ec2, "describe_route_tables", Filters=[{"Name": "association.subnet-id", "Values": [subnet_id]}])
    if not tables["RouteTables"]:  # a subnet without a route table of its own uses the VPC's main one
        main = {"Name": "association.main", "Values": ["true"]}
        tables = call(ec2, "describe_route_tables", Filters=[in_vpc, main])
    table = (tables["RouteTables"] or [{"RouteTableId": "(none)", "Routes": []}])[0]
    endpoints, page = [], {"NextToken": None}
    while "NextToken" in page:
        token = {"NextToken": page["NextToken"]} if page["NextToken"] else {}
        page = call(ec2, "describe_vpc_endpoints", Filters=[in_vpc], **token)
        endpoints += page["VpcEndpoints"]
        page = page if page.get("NextToken") else {}
    usable = [e for e in endpoints if str(e.get("State", "")).lower() in ("available", "pending")]
    return Network(subnet, vpc, table, usable)


def default_route(table: dict) -> str:
    """Where 0.0.0.0/0 goes: igw-... (a public subnet), nat-..., another target (a transit gateway...), or ''."""
    targets = ("GatewayId", "NatGatewayId", "TransitGatewayId", "NetworkInterfaceId", "InstanceId",
               "VpcPeeringConnectionId", "CarrierGatewayId")  # fmt: skip
    for route in table.get("Routes", []):
        if route.get("DestinationCidrBlock") == "0.0.0.0/0" and route.get("State") != "blackhole":
            return next((route[k] for k in targets if route.get(k)), "")
    return ""


def check_emr_tag(name: str, kind: str, resource_id: str, tags: list | None, target: Target) -> Check:
    value = {t["Key"]: t["Value"] for t in tags or []}.get(EMR_TAG)
    if value == "true":
        return ok(name, f"ec2 {kind} {resource_id}: tagged {EMR_TAG}=true")
    seen = f"has no tag {EMR_TAG}" if value is None else f"has {EMR_TAG}={value!r}, not 'true'"
    fix = aws_cli(target, f"ec2 create-tags --resources {resource_id} --tags Key={EMR_TAG},Value=true")
    return fail(name, f"ec2 {kind} {resource_id}: {seen}, so EMR's service role may not launch clusters there", fix)


def check_s3_endpoint(net: Network, target: Target) -> Check:
    service, table, vpc_id = f"com.amazonaws.{target.region}.s3", net.route_table["RouteTableId"], net.vpc["VpcId"]
    gateways = [e for e in net.endpoints if e.get("ServiceName") == service and e.get("VpcEndpointType") == "Gateway"]
    on_table = [e["VpcEndpointId"] for e in gateways if table in e.get("RouteTableIds", [])]
    if on_table:
        return ok("ec2-s3-endpoint", f"ec2 S3 gateway endpoint: {on_table[0]} on route table {table}")
    out = default_route(net.route_table)
    # Without one, S3 traffic leaves by the default route (NAT charges per GB); with no default route, nothing goes.
    status, why = ("warn", f"S3 traffic goes through {out}") if out else ("fail", "the nodes cannot reach S3")
    if gateways:
        endpoint = gateways[0]["VpcEndpointId"]
        seen = f"{endpoint} is not on the subnet's route table {table}"
        fix = aws_cli(target, f"ec2 modify-vpc-endpoint --vpc-endpoint-id {endpoint} --add-route-table-ids {table}")
    else:
        seen = f"none in {vpc_id} on route table {table}"
        create = f"ec2 create-vpc-endpoint --vpc-id {vpc_id} --service-name {service}"
        fix = aws_cli(target, f"{create} --route-table-ids {table}")
    return Check("ec2-s3-endpoint", status, f"ec2 S3 gateway endpoint: {seen}; {why}", fix)


def check_egress(net: Network, target: Target) -> Check:
    """A private subnet reaches the Glue API (each run's publish) and EMR through a NAT or interface endpoints."""
    subnet_id, table, out = net.subnet["SubnetId"], net.route_table["RouteTableId"], default_route(net.route_table)
    if out.startswith(("igw-", "nat-")):
        kind = "public subnet" if out.startswith("igw-") else "private subnet"
        return ok("ec2-egress", f"ec2 egress: {kind}, 0.0.0.0/0 -> {out}: Glue and EMR reachable")
    services = {"glue": "Glue", "elasticmapreduce": "EMR"}
    found = {s: [e["VpcEndpointId"] for e in net.endpoints if e.get("VpcEndpointType") == "Interface"
                 and e.get("ServiceName") == f"com.amazonaws.{target.region}.{s}" and e.get("PrivateDnsEnabled")]
             for s in services}  # fmt: skip
    missing = [s for s in services if not found[s]]
    if not missing:
        ids = ", ".join(f"{services[s]} {found[s][0]}" for s in services)
        return ok("ec2-egress", f"ec2 egress: private subnet with interface endpoints ({ids})")
    names = " and ".join(services[s] for s in missing)
    create = "ec2 create-vpc-endpoint --vpc-endpoint-type Interface --private-dns-enabled"
    fix = "\n".join(aws_cli(target, f"{create} --vpc-id {net.vpc['VpcId']} --subnet-ids {subnet_id} "
                                    f"--service-name com.amazonaws.{target.region}.{s}") for s in missing)  # fmt: skip
    fix += f"\nor a NAT gateway and the route 0.0.0.0/0 to it in {table}"
    if out:
        return warn("ec2-egress", f"ec2 egress: private subnet, 0.0.0.0/0 -> {out}, which preflight cannot follow; "
                    f"no interface endpoint (with private DNS) for {names}", fix)  # fmt: skip
    harm = " or ".join({"glue": "publish to Glue", "elasticmapreduce": "talk to EMR"}[s] for s in missing)
    return fail("ec2-egress", f"ec2 egress: private subnet without a NAT route or interface endpoints (with private "
                f"DNS) for {names}: runs could not {harm}", fix)  # fmt: skip


def check_network(target: Target, ec2) -> list:
    subnet_id = target.parameters.get("Ec2SubnetId", "")
    if not subnet_id:
        return [fail("ec2-subnet", "ec2 subnet: Engine=ec2 needs Ec2SubnetId (the template's Ec2NeedsATaggedSubnet)",
                     "--parameter-overrides Ec2SubnetId=subnet-...   (tagged: docs/DEPLOY.md, step 2)")]  # fmt: skip
    net = describe_network(ec2, subnet_id)
    if net is None:
        listing = aws_cli(target, "ec2 describe-subnets --query 'Subnets[].[SubnetId,VpcId,AvailabilityZone]'")
        return [fail("ec2-subnet", f"ec2 subnet {subnet_id}: not found in {target.region}", listing)]
    kind = "public" if default_route(net.route_table).startswith("igw-") else "private"
    where = f"{kind}, in {net.vpc['VpcId']} ({net.subnet.get('AvailabilityZone', '?')})"
    return [
        ok("ec2-subnet", f"ec2 subnet {subnet_id}: {where}, route table {net.route_table['RouteTableId']}"),
        check_emr_tag("ec2-subnet-tag", "subnet", subnet_id, net.subnet.get("Tags"), target),
        check_emr_tag("ec2-vpc-tag", "VPC", net.vpc["VpcId"], net.vpc.get("Tags"), target),
        check_s3_endpoint(net, target),
        check_egress(net, target),
    ]


def check_cleanup_role(target: Target, iam) -> Check:
    try:
        call(iam, "get_role", RoleName=CLEANUP_ROLE)
    except CallFailed as exc:
        if exc.code != "NoSuchEntity":
            raise
        # Not fatal: the stack lets the functions create it with the first cluster, unless an SCP forbids that.
        fix = aws_cli(target, "iam create-service-linked-role --aws-service-name elasticmapreduce.amazonaws.com")
        return warn("ec2-cleanup-role", f"ec2 {CLEANUP_ROLE}: missing; the first cluster creates it unless an "
                    "SCP or a permissions boundary stops the functions", fix)  # fmt: skip
    return ok("ec2-cleanup-role", f"ec2 {CLEANUP_ROLE}: exists")


# ---- all of them -----------------------------------------------------------------------------------------------


def run_preflight(target: Target, clients: Callable, probes: Probes | None = None) -> list:
    """clients(service name) -> a boto3 client for the target's region and profile."""
    probes = probes or Probes()
    checks = [check_region(target, probes), check_parameters(target), check_sam(target, probes),
              check_python(probes), check_make(probes), check_index(probes)]  # fmt: skip
    identity = guarded("credentials", "credentials", target, lambda: check_credentials(clients("sts")))
    checks += identity
    if identity[0].status != "ok":  # every call below would fail the same way
        return checks
    if target.engine == "serverless":
        checks += guarded("quota", "quota", target, lambda: check_quota(target, clients("service-quotas")))
    elif target.engine == "ec2":
        checks += guarded("ec2-subnet", "ec2 network", target, lambda: check_network(target, clients("ec2")))
        role = lambda: check_cleanup_role(target, clients("iam"))  # noqa: E731
        checks += guarded("ec2-cleanup-role", f"ec2 {CLEANUP_ROLE}", target, role)
    return checks
