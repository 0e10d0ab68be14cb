"""image-features preflight: each check that fails, on its own, with what to fix; then the command as a whole.
AWS through moto (STS, EC2, IAM) and botocore's Stubber for Service Quotas (moto has no EMR Serverless quotas);
the machine's tools and the package index through injected probes: no test reaches the network."""

import dataclasses
import json
import os
import subprocess
import sys
import urllib.error

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from ops import preflight
from ops.cli import main
from ops.preflight import CLEANUP_ROLE, EMR_TAG, QUOTA_CODE, QUOTA_SERVICE, Probes

REGION = "eu-west-3"
TOOLS = {"sam": "/usr/local/bin/sam", "python3": "/usr/bin/python3", "make": "/usr/bin/make"}
ANSWERS = {
    ("sam", "--version"): "SAM CLI, version 1.170.0",
    ("python3", "-m", "pip", "--version"): "pip 24.0 from /usr/lib/python3/dist-packages/pip (python 3.12)",
    ("python3", "-m", "pip", "config", "list"): "",
    ("make", "--version"): "GNU Make 4.3\nBuilt for x86_64-pc-linux-gnu",
}


def probes(missing=(), broken=(), fetch=None, regions=None, env=None, answers=None) -> Probes:
    """A machine with sam, python3 with pip, make and a reachable index, less what `missing` and `broken` name."""
    answers = {**ANSWERS, **(answers or {})}

    def which(name):
        name = os.path.basename(name)
        return None if name in missing else TOOLS.get(name)

    def run(command):
        program = os.path.basename(command[0])
        return (1, "No module named pip") if program in broken else (0, answers[(program, *command[1:])])

    return Probes(which=which, run=run, fetch=fetch or (lambda url: 200), env=env or {},
                  regions=regions or preflight.offered_regions)  # fmt: skip


def target(overrides="", region=REGION, **kwargs) -> preflight.Target:
    """The `default` environment of samconfig.toml with the template's defaults, as the command resolves it."""
    return preflight.resolve_target("default", region=region, overrides=f"AlertEmail=none {overrides}", **kwargs)


def quotas(applied=None, default=None, error=None):
    """A Service Quotas client that answers GetServiceQuota (or refuses it) and GetAWSDefaultServiceQuota."""
    client = boto3.client("service-quotas", region_name=REGION)
    stub = Stubber(client)
    ids = {"ServiceCode": QUOTA_SERVICE, "QuotaCode": QUOTA_CODE}
    quota = {**ids, "QuotaName": "Max concurrent vCPUs per account", "Unit": "None", "Adjustable": True}
    if applied is not None:
        stub.add_response("get_service_quota", {"Quota": {**quota, "Value": applied}}, ids)
    else:
        stub.add_client_error("get_service_quota", error or "NoSuchResourceException", http_status_code=400)
        if default is not None:
            stub.add_response("get_aws_default_service_quota", {"Quota": {**quota, "Value": default}}, ids)
    stub.activate()
    return client, stub


def by_name(checks) -> dict:
    return {c.name: c for c in checks}


@pytest.fixture(scope="module")
def aws():
    """One moto account for the module (its first EC2 call is slow): each test makes its own VPC."""
    with pytest.MonkeyPatch.context() as env, mock_aws():
        env.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")  # no test launches an instance
        yield {s: boto3.client(s, region_name=REGION) for s in ("sts", "ec2", "iam")}


def network(ec2, *, subnet_tag="true", vpc_tag="true", s3=True, route="nat", interface=()) -> str:
    """A VPC and subnet for EMR on EC2; route: igw (public), nat, or None (private, no way out)."""
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    table = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    ec2.associate_route_table(RouteTableId=table, SubnetId=subnet)
    for resource, value in ((subnet, subnet_tag), (vpc, vpc_tag)):
        if value:
            ec2.create_tags(Resources=[resource], Tags=[{"Key": EMR_TAG, "Value": value}])
    if route == "igw":
        igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
        ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)
        ec2.create_route(RouteTableId=table, DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)
    elif route == "nat":
        nat = ec2.create_nat_gateway(SubnetId=subnet)["NatGateway"]["NatGatewayId"]
        ec2.create_route(RouteTableId=table, DestinationCidrBlock="0.0.0.0/0", NatGatewayId=nat)
    if s3:
        ec2.create_vpc_endpoint(VpcId=vpc, ServiceName=f"com.amazonaws.{REGION}.s3", VpcEndpointType="Gateway",
                                RouteTableIds=[table])  # fmt: skip
    for service in interface:
        ec2.create_vpc_endpoint(VpcId=vpc, ServiceName=f"com.amazonaws.{REGION}.{service}", SubnetIds=[subnet],
                                VpcEndpointType="Interface", PrivateDnsEnabled=True)  # fmt: skip
    return subnet


def cleanup_role(iam):
    trust = {"Statement": [{"Effect": "Allow", "Principal": {"Service": "elasticmapreduce.amazonaws.com"},
                            "Action": "sts:AssumeRole"}]}  # fmt: skip
    iam.create_role(RoleName=CLEANUP_ROLE, Path="/aws-service-role/elasticmapreduce.amazonaws.com/",
                    AssumeRolePolicyDocument=json.dumps(trust))  # fmt: skip


# ---- region and parameters ---------------------------------------------------------------------------------------


def test_a_region_outside_the_eu_fails_and_names_the_eu_regions_that_would_do():
    # Given a deployment to N. Virginia, which offers EMR Serverless
    # When the region is checked
    check = preflight.check_region(target(region="us-east-1"), probes())

    # Then it fails on the template's EU rule, read from template.yaml, and says where to deploy instead
    assert check.status == "fail" and "not in the EU" in check.message and "offer" not in check.message
    assert 'region = "eu-west-3" under [default.global.parameters]' in check.fix
    assert "eu-central-1" in check.fix and "eu-south-2" in check.fix


def test_an_eu_region_without_emr_serverless_fails():
    # Given an EU region that botocore's endpoint data does not list for EMR Serverless
    offered = lambda service: ["eu-west-1", "eu-central-1"] if service == "emr-serverless" else [REGION]  # noqa: E731

    # When the region is checked
    check = preflight.check_region(target(), probes(regions=offered))

    # Then it fails for that reason alone, and names the EU regions that offer it
    assert check.status == "fail" and check.message == f"region {REGION}: does not offer EMR Serverless"
    assert "EU regions that offer EMR Serverless: eu-west-1, eu-central-1" in check.fix
    # ... while Engine=ec2 needs EMR on EC2 there, not EMR Serverless
    assert preflight.check_region(target("Engine=ec2"), probes(regions=offered)).status == "ok"


def test_a_parameter_the_template_does_not_declare_or_allow_fails():
    check = preflight.check_parameters(target("MaxVcpus=16 Engine=fargate"))
    assert check.status == "fail" and "not in template.yaml: MaxVcpus" in check.message
    assert "Engine='fargate' (allowed: serverless, ec2)" in check.message


def test_a_parameter_without_default_or_value_is_a_warning():
    given = {k: v for k, v in target().parameters.items() if k != "AlertEmail"}
    check = preflight.check_parameters(dataclasses.replace(target(), parameters=given))
    assert check.status == "warn" and "no value for AlertEmail" in check.message
    assert check.fix.startswith("--parameter-overrides AlertEmail=...")


def test_overrides_reach_the_checks_as_sam_reads_them():
    # Given samconfig's dev environment (MaxVcpu='16 vCPU', quoted) and an override of the command line
    resolved = preflight.resolve_target("dev", overrides="MaxMemory='32 GB'")

    # Then the region comes from samconfig, values keep their spaces, and the command line wins
    assert resolved.region == "eu-west-3" and resolved.engine == "serverless"
    assert resolved.parameters["MaxVcpu"] == "16 vCPU" and resolved.parameters["MaxMemory"] == "32 GB"
    assert resolved.parameters["EmrReleaseLabel"].startswith("emr-7.")  # a template default
    assert resolved.eu_regions[:3] == ("eu-west-1", "eu-west-2", "eu-west-3")


# ---- the tools `sam build` runs ----------------------------------------------------------------------------------


def test_a_missing_sam_cli_fails_with_the_make_target_that_installs_it():
    check = preflight.check_sam(target(), probes(missing=("sam",)))
    assert check.status == "fail" and "no `sam` on PATH, no .venv-sam/bin/sam" in check.message
    assert check.fix.startswith("make sam-setup")


def test_an_older_sam_cli_is_a_warning():
    check = preflight.check_sam(target(), probes(answers={("sam", "--version"): "SAM CLI, version 1.100.0"}))
    assert check.status == "warn" and "older than the tested" in check.message


def test_python_without_pip_fails():
    check = preflight.check_python(probes(broken=("python3",)))
    assert check.status == "fail" and check.message.startswith("python: /usr/bin/python3 has no pip")
    assert "ensurepip" in check.fix


def test_python_older_than_3_9_fails():
    old = {("python3", "-m", "pip", "--version"): "pip 20.0 from /usr/lib/python3/dist-packages/pip (python 3.8)"}
    assert preflight.check_python(probes(answers=old)).status == "fail"


def test_missing_make_fails():
    check = preflight.check_make(probes(missing=("make",)))
    assert check.status == "fail" and "apt-get install make" in check.fix


def test_an_unreachable_index_fails_without_showing_its_credentials():
    # Given pip configured for a private index whose URL holds a token, and no route to it
    asked = []

    def unreachable(url):
        asked.append(url)
        raise urllib.error.URLError("timed out")

    env = {"PIP_INDEX_URL": "https://build:s3cr3t@pypi.example.org/simple"}

    # When the index is checked
    check = preflight.check_index(probes(fetch=unreachable, env=env))

    # Then it fails, names the index but never its token, and the probe asked the index's page for pip
    assert asked == ["https://build:s3cr3t@pypi.example.org/simple/pip/"]
    assert check.status == "fail" and "https://pypi.example.org/simple unreachable (timed out)" in check.message
    assert "s3cr3t" not in check.message + check.fix and "index-url" in check.fix


def test_the_index_comes_from_pip_config_and_a_refusal_fails():
    config = {("python3", "-m", "pip", "config", "list"): "global.index-url='https://mirror.example.org/simple/'"}
    check = preflight.check_index(probes(answers=config, fetch=lambda url: 403))
    assert check.status == "fail"
    assert check.message == "index: https://mirror.example.org/simple/ answered HTTP 403; does it need credentials?"


# ---- the EMR Serverless quota ------------------------------------------------------------------------------------


def test_a_quota_below_max_vcpu_fails_with_the_increase_command():
    # Given an account whose applied quota is 32 vCPUs, and an application of 64
    client, stub = quotas(applied=32.0)

    # When the quota is checked
    check = preflight.check_quota(target("MaxVcpu='64 vCPU'"), client)

    # Then it fails, with the request that raises it, or the smaller sizes that fit
    assert check.status == "fail" and "32 concurrent vCPUs in eu-west-3 (this account's quota)" in check.message
    increase, smaller = check.fix.splitlines()
    assert increase == ("aws service-quotas request-service-quota-increase --service-code emr-serverless "
                        f"--quota-code {QUOTA_CODE} --desired-value 64 --region eu-west-3")  # fmt: skip
    assert smaller == ("or deploy with MaxVcpu='32 vCPU' and --conf spark.dynamicAllocation.maxExecutors=7 "
                       "in SparkSubmitParameters")  # 2 driver cores + 7 executors of 4 = 30 <= 32  # fmt: skip
    stub.assert_no_pending_responses()


def test_a_never_raised_quota_is_the_aws_default():
    # Given an account that never asked for more: GetServiceQuota has nothing, the AWS default is 16
    client, stub = quotas(default=16.0)

    # When an application of 32 vCPUs is checked
    check = preflight.check_quota(target("MaxVcpu='32 vCPU'"), client)

    # Then the default was read, and it does not cover the application
    stub.assert_no_pending_responses()
    assert check.status == "fail" and "allows 16 concurrent vCPUs in eu-west-3 (the AWS default)" in check.message
    assert "--desired-value 32" in check.fix
    # ... and an application of 16 fits it
    client, _ = quotas(default=16.0)
    assert preflight.check_quota(target("MaxVcpu=16"), client).status == "ok"


# ---- Engine=ec2 --------------------------------------------------------------------------------------------------


def ec2_checks(aws, **shape) -> dict:
    subnet = network(aws["ec2"], **shape)
    return by_name(preflight.check_network(target(f"Engine=ec2 Ec2SubnetId={subnet}"), aws["ec2"]))


def test_a_well_set_private_subnet_passes(aws):
    checks = ec2_checks(aws)
    assert {name: c.status for name, c in checks.items()} == {
        "ec2-subnet": "ok", "ec2-subnet-tag": "ok", "ec2-vpc-tag": "ok", "ec2-s3-endpoint": "ok", "ec2-egress": "ok",
    }  # fmt: skip
    assert "private" in checks["ec2-subnet"].message and "nat-" in checks["ec2-egress"].message


def test_an_untagged_subnet_fails_on_its_own(aws):
    checks = ec2_checks(aws, subnet_tag=None)
    failed = [c for c in checks.values() if c.status != "ok"]
    assert [c.name for c in failed] == ["ec2-subnet-tag"]
    subnet = checks["ec2-subnet-tag"].message.split()[2].rstrip(":")
    assert failed[0].fix == (f"aws ec2 create-tags --resources {subnet} --tags Key={EMR_TAG},Value=true "
                             "--region eu-west-3")  # fmt: skip


def test_an_untagged_vpc_fails_on_its_own(aws):
    checks = ec2_checks(aws, vpc_tag="True")  # the policy's condition compares "true" exactly
    assert [c.name for c in checks.values() if c.status != "ok"] == ["ec2-vpc-tag"]
    assert f"has {EMR_TAG}='True', not 'true'" in checks["ec2-vpc-tag"].message


def test_no_s3_gateway_endpoint_fails_where_s3_is_otherwise_out_of_reach(aws):
    # Given a private subnet without a way out but Glue and EMR interface endpoints, and no S3 endpoint
    checks = ec2_checks(aws, s3=False, route=None, interface=("glue", "elasticmapreduce"))

    # Then only the S3 endpoint fails, with the command that creates it on the subnet's route table
    assert [c.name for c in checks.values() if c.status != "ok"] == ["ec2-s3-endpoint"]
    check = checks["ec2-s3-endpoint"]
    assert check.status == "fail" and "the nodes cannot reach S3" in check.message
    assert check.fix.startswith("aws ec2 create-vpc-endpoint --vpc-id vpc-")
    assert "--service-name com.amazonaws.eu-west-3.s3 --route-table-ids rtb-" in check.fix


def test_no_s3_gateway_endpoint_is_a_warning_behind_an_internet_gateway(aws):
    check = ec2_checks(aws, s3=False, route="igw")["ec2-s3-endpoint"]
    assert check.status == "warn" and "S3 traffic goes through igw-" in check.message


def test_a_private_subnet_without_nat_or_endpoints_fails(aws):
    # Given a private subnet with an S3 endpoint but no NAT route and no interface endpoint for Glue
    checks = ec2_checks(aws, route=None, interface=("elasticmapreduce",))

    # Then egress fails, naming Glue only, with the endpoint to create or the NAT route to add
    assert [c.name for c in checks.values() if c.status != "ok"] == ["ec2-egress"]
    check = checks["ec2-egress"]
    assert "for Glue:" in check.message and "EMR" not in check.message.split("for Glue")[1].split(":")[0]
    glue, nat = check.fix.splitlines()
    assert "--vpc-endpoint-type Interface --private-dns-enabled" in glue
    assert glue.endswith("--service-name com.amazonaws.eu-west-3.glue --region eu-west-3")
    assert nat.startswith("or a NAT gateway")
    # ... and with both interface endpoints, the subnet needs no NAT
    assert ec2_checks(aws, route=None, interface=("glue", "elasticmapreduce"))["ec2-egress"].status == "ok"


def test_an_unknown_or_missing_subnet_fails(aws):
    [unknown] = preflight.check_network(target("Engine=ec2 Ec2SubnetId=subnet-0123456789abcdef0"), aws["ec2"])
    assert unknown.status == "fail" and unknown.message.endswith("not found in eu-west-3")
    [missing] = preflight.check_network(target("Engine=ec2"), aws["ec2"])
    assert missing.status == "fail" and "needs Ec2SubnetId" in missing.message


def test_a_missing_cleanup_role_is_only_a_warning(aws):
    # Given an account where no EMR cluster ever ran
    # When the service-linked role is checked
    check = preflight.check_cleanup_role(target("Engine=ec2"), aws["iam"])

    # Then it is a warning (the first cluster creates it), with the command that creates it beforehand
    assert check.status == "warn" and check.message.startswith(f"ec2 {CLEANUP_ROLE}: missing")
    assert check.fix.startswith("aws iam create-service-linked-role --aws-service-name elasticmapreduce.amazonaws.com")
    # ... and once it exists, it is ok
    cleanup_role(aws["iam"])
    try:
        assert preflight.check_cleanup_role(target("Engine=ec2"), aws["iam"]).status == "ok"
    finally:
        aws["iam"].delete_role(RoleName=CLEANUP_ROLE)  # the account is the module's


# ---- the command -------------------------------------------------------------------------------------------------


def test_all_ok_exits_0_and_prints_one_line_per_check(aws, capsys):
    # Given an account whose quota covers the application, and every tool in place
    client, _ = quotas(applied=64.0)
    clients = lambda service: client if service == "service-quotas" else aws[service]  # noqa: E731

    # When the command runs for samconfig's default environment
    code = main(["preflight", "--region", REGION, "--parameter-overrides", "MaxVcpu='64 vCPU' AlertEmail=none"],
                clients=clients, probes=probes())  # fmt: skip

    # Then every check is ok, one line each, and the last line says so
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0] == "ok    region eu-west-3: in the EU, offers EMR Serverless"
    assert [line.split()[0] for line in out[:-1]] == ["ok"] * 8
    assert [line.split()[1] for line in out[:-1]] == ["region", "parameters:", "sam:", "python:", "make:", "index:",
                                                      "credentials:", "quota:"]  # fmt: skip
    assert out[-1] == "preflight: 0 failed, 0 warnings, 8 ok: ready for sam deploy"


def test_json_lists_the_checks_and_a_warning_keeps_exit_0(aws, capsys):
    subnet = network(aws["ec2"])
    clients = lambda service: aws[service]  # noqa: E731

    code = main(["preflight", "--region", REGION, "--json", "--parameter-overrides",
                 f"Engine=ec2 Ec2SubnetId={subnet} AlertEmail=none"], clients=clients, probes=probes())  # fmt: skip

    checks = json.loads(capsys.readouterr().out)
    assert code == 0
    assert all(set(c) == {"name", "status", "message", "fix"} for c in checks)
    assert [c["name"] for c in checks][-6:] == ["ec2-subnet", "ec2-subnet-tag", "ec2-vpc-tag", "ec2-s3-endpoint",
                                                "ec2-egress", "ec2-cleanup-role"]  # fmt: skip
    [role] = [c for c in checks if c["status"] != "ok"]
    assert role["name"] == "ec2-cleanup-role" and role["status"] == "warn"
    assert role["fix"] == ("aws iam create-service-linked-role --aws-service-name elasticmapreduce.amazonaws.com "
                           "--region eu-west-3")  # fmt: skip
    assert all(c["fix"] is None for c in checks if c["status"] == "ok")


def test_a_denied_call_is_a_failed_check_naming_the_action(aws, capsys):
    # Given an identity that may not read Service Quotas
    client, _ = quotas(error="AccessDeniedException")
    clients = lambda service: client if service == "service-quotas" else aws[service]  # noqa: E731

    # When the command runs
    code = main(["preflight", "--region", REGION, "--parameter-overrides", "AlertEmail=none"], clients=clients,
                probes=probes())  # fmt: skip

    # Then the quota check fails, naming the IAM action that was refused, and the command exits 1
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL  quota: servicequotas:GetServiceQuota denied\n" in out
    assert "      fix: allow servicequotas:GetServiceQuota to the identity you deploy with" in out
    verdict = "preflight: 1 failed, 0 warnings, 7 ok: not ready for sam deploy: fix the FAIL lines first"
    assert out.splitlines()[-1] == verdict


def test_without_credentials_the_aws_checks_are_one_failure(aws, monkeypatch, tmp_path, capsys):
    # Given no credentials anywhere (and no instance metadata to ask; moto stands in for AWS all the same)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    session = boto3.Session()  # a new one: boto3's default session keeps the credentials it found before
    clients = lambda service: session.client(service, region_name=REGION)  # noqa: E731

    code = main(["preflight", "--region", REGION, "--parameter-overrides", "AlertEmail=none"], clients=clients,
                probes=probes())  # fmt: skip

    out = capsys.readouterr().out
    assert code == 1 and "FAIL  credentials: no AWS credentials, sts:GetCallerIdentity not sent" in out
    assert "quota" not in out and "Traceback" not in out


@pytest.mark.parametrize(
    "argv",
    [["--config-env", "staging"], ["--parameter-overrides", "MaxVcpu"], ["--parameter-overrides", "MaxVcpu='16"]],
)
def test_bad_usage_exits_2(argv, capsys):
    assert main(["preflight", "--region", REGION, *argv], clients=lambda s: None, probes=probes()) == 2
    assert "error:" in capsys.readouterr().err


def test_help_explains_each_check(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["preflight", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for name in ("region", "parameters", "sam", "python", "make", "index", "credentials", "quota", "ec2-*"):
        assert f"\n  {name} " in out


def test_the_command_loads_no_spark_and_no_model_runtime():
    # The operator's commands run on a deployer's machine: the console script must not pull the job's engines in.
    heavy = "{'pyspark', 'tensorflow', 'onnxruntime', 'keras', 'numpy'}"
    code = f"import sys, ops.cli; print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=preflight.ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
