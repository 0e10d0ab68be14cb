"""The SAM stack: lint and build, and each security / GDPR property checked on the parsed template."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from tests.template.cfn import (
    ENGINES,
    MODES,
    RESOURCES,
    ROOT,
    TEMPLATE,
    arn_text,
    as_list,
    identity_statements,
    resolve,
)

BIN = Path(sys.executable).parent
SAM = ROOT / ".venv-sam" / "bin" / "sam"


# --- tools ---------------------------------------------------------------------------------------------
def test_cfn_lint_is_clean():
    proc = subprocess.run([str(BIN / "cfn-lint"), str(ROOT / "template.yaml")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def sam_env():
    if not SAM.exists():
        pytest.fail("SAM CLI missing: `make test` installs it into .venv-sam (make sam-setup)")
    return {**os.environ, "SAM_CLI_TELEMETRY": "0", "AWS_DEFAULT_REGION": "eu-west-3"}


def test_sam_validate_lint(sam_env):
    proc = subprocess.run([str(SAM), "validate", "--lint"], cwd=ROOT, env=sam_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is a valid SAM Template" in proc.stdout + proc.stderr


def test_sam_build_packages_the_functions_and_the_jobs_runtime_without_docker(sam_build):
    build = sam_build
    for function, handler in [("TriggerFunction", "trigger/app.py"), ("JobStateFunction", "job_state/app.py"),
                              ("ArtifactsFunction", "artifacts/app.py")]:  # fmt: skip
        assert (build / function / handler).is_file()
        assert (build / function / "pipeline" / "control.py").is_file()
        assert (build / function / "aws_lambda_powertools").is_dir()
        assert (build / function / "boto3").is_dir()  # the SDK the code is tested with, not the runtime's
    assert (build / "ArtifactsFunction" / "crhelper").is_dir()
    for layer, arch in [("JobRuntimeX86", "x86_64"), ("JobRuntimeArm64", "arm64")]:
        job = build / layer / "job"
        manifest = json.loads((job / "manifest.json").read_text())["files"]
        assert set(manifest) == {"emr_job.zip", "main.py", f"runtime-{arch}.tar.gz"}
        # A Lambda function and its layers hold at most 250 MB unzipped (Lambda quotas)
        size = sum(f.stat().st_size for d in (build / layer, build / "ArtifactsFunction") for f in d.rglob("*"))
        assert size < 250 * 2**20, size


# --- storage security and GDPR ------------------------------------------------------------------------
BUCKET = RESOURCES["DataBucket"]["Properties"]


@pytest.mark.parametrize("kms", [True, False])
def test_default_encryption_kms_or_s3_by_parameter(kms):
    rule = resolve(BUCKET["BucketEncryption"], {"UseKms": kms})["ServerSideEncryptionConfiguration"][0]
    if kms:
        assert rule["ServerSideEncryptionByDefault"] == {
            "SSEAlgorithm": "aws:kms",
            "KMSMasterKeyID": {"Fn::GetAtt": ["DataKey", "Arn"]},
        }
        assert RESOURCES["DataKey"]["Properties"]["EnableKeyRotation"] is True
    else:
        assert rule["ServerSideEncryptionByDefault"] == {"SSEAlgorithm": "AES256"}
    assert rule["BucketKeyEnabled"] is True


def test_a_failed_first_create_leaves_nothing_behind_that_a_retry_would_trip_on():
    # A rollback of the first create deletes the bucket (fixed name) and the key; a stack deletion keeps both
    for name in ("DataBucket", "DataKey"):
        assert RESOURCES[name]["DeletionPolicy"] == "RetainExceptOnCreate"
        assert RESOURCES[name]["UpdateReplacePolicy"] == "Retain"  # (it takes no RetainExceptOnCreate)
    # ... which S3 allows once JobArtifacts' Delete removed every version it wrote, as its policy lets it
    statements = {s["Sid"]: s for s in RESOURCES["ArtifactsFunction"]["Properties"]["Policies"][0]["Statement"]
                  if isinstance(s, dict) and "Sid" in s}  # fmt: skip
    assert "s3:DeleteObjectVersion" in statements["PutArtifactsInPlace"]["Action"]
    assert "s3:ListBucketVersions" in statements["ListArtifacts"]["Action"]
    # And a lost response fails the custom resource a minute after its function's timeout, not after an hour
    timeout = RESOURCES["ArtifactsFunction"]["Properties"]["Timeout"]
    assert timeout < RESOURCES["JobArtifacts"]["Properties"]["ServiceTimeout"] <= timeout + 120


def test_block_public_access_all_four():
    assert BUCKET["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True, "RestrictPublicBuckets": True,
    }  # fmt: skip


def test_bucket_policy_denies_plain_http():
    [statement] = RESOURCES["DataBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    assert statement["Effect"] == "Deny" and statement["Principal"] == "*" and statement["Action"] == "s3:*"
    assert statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert {arn_text(r) for r in statement["Resource"]} == {"${DataBucket.Arn}", "${DataBucket.Arn}/*"}


def test_dead_letter_queues_and_the_alert_topic_refuse_plain_http():
    [queues] = [RESOURCES["DeadLetterQueuesPolicy"]["Properties"]]
    assert queues["Queues"] == [{"Ref": "UploadDeadLetterQueue"}, {"Ref": "JobStateDeadLetterQueue"}]
    topic = RESOURCES["AlertTopicPolicy"]["Properties"]
    assert topic["Topics"] == [{"Ref": "AlertTopic"}]
    for document in (queues["PolicyDocument"], topic["PolicyDocument"]):
        denies = [st for st in document["Statement"] if st["Effect"] == "Deny"]
        assert [st["Condition"] for st in denies] == [{"Bool": {"aws:SecureTransport": "false"}}]
        assert denies[0]["Principal"] == "*"
    # The topic policy replaces SNS's default one: CloudWatch alarms of this account may still publish
    [alarms] = [st for st in topic["PolicyDocument"]["Statement"] if st["Effect"] == "Allow"]
    assert alarms["Principal"] == {"Service": "cloudwatch.amazonaws.com"} and alarms["Action"] == "sns:Publish"
    assert alarms["Condition"]["StringEquals"] == {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}


def test_key_policy_grants_each_service_what_its_documentation_asks_and_no_more():
    statements = {st["Sid"]: st for st in RESOURCES["DataKey"]["Properties"]["KeyPolicy"]["Statement"]}
    # S3 user guide (notification to an encrypted queue): no condition S3 would not send
    s3 = statements["S3NotificationsToTheEncryptedQueue"]
    assert set(s3["Action"]) == {"kms:GenerateDataKey", "kms:Decrypt"} and "Condition" not in s3
    # CloudWatch Logs user guide (encrypt-log-data-kms): the log group ARN in the encryption context
    logs = statements["CloudWatchLogsEncryptThisStacksLogGroups"]
    assert logs["Principal"] == {"Service": {"Fn::Sub": "logs.${AWS::Region}.amazonaws.com"}}
    context = logs["Condition"]["ArnLike"]["kms:EncryptionContext:aws:logs:arn"]["Fn::Sub"]
    assert context.endswith(":log-group:/aws/lambda/image-features-${Stage}-*")
    for name in ("TriggerLogGroup", "JobStateLogGroup", "ArtifactsLogGroup"):  # every group the key encrypts
        assert RESOURCES[name]["Properties"]["LogGroupName"]["Fn::Sub"].startswith(
            "/aws/lambda/image-features-${Stage}-"
        )
    # CloudWatch alarms only decrypt and make data keys to publish to the encrypted topic
    alarms = statements["CloudWatchAlarmsPublishToTheEncryptedTopic"]
    assert alarms["Principal"] == {"Service": "cloudwatch.amazonaws.com"}
    assert set(alarms["Action"]) == {"kms:Decrypt", "kms:GenerateDataKey*"}


def test_trust_policies_name_the_account_and_source_where_the_service_sends_them():
    def trust(role):
        [statement] = RESOURCES[role]["Properties"]["AssumeRolePolicyDocument"]["Statement"]
        return statement.get("Condition", {})

    assert trust("EmrRuntimeRole") == {"StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}}
    service = trust("EmrServiceRole")
    assert service["StringEquals"] == {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
    assert service["ArnLike"]["aws:SourceArn"]["Fn::Sub"].startswith("arn:${AWS::Partition}:elasticmapreduce:")
    assert trust("EmrInstanceRole") == {}  # EC2 assumes instance roles without a source context


def test_the_first_cluster_of_an_account_may_create_only_emrs_cleanup_role():
    statements = identity_statements({"UseKms": True, **ENGINES[1]})["TriggerFunction"]
    [slr] = [st for st in statements if "iam:CreateServiceLinkedRole" in as_list(st["Action"])]
    role = "/aws-service-role/elasticmapreduce.amazonaws.com*/AWSServiceRoleForEMRCleanup*"
    assert arn_text(slr["Resource"]).endswith(role)
    emr = ["elasticmapreduce.amazonaws.com", "elasticmapreduce.amazonaws.com.cn"]
    assert slr["Condition"] == {"StringLike": {"iam:AWSServiceName": emr}}
    [policy] = [st for st in statements if "iam:PutRolePolicy" in as_list(st["Action"])]
    assert as_list(policy["Action"]) == ["iam:PutRolePolicy"] and arn_text(policy["Resource"]).endswith(role)
    serverless = identity_statements({"UseKms": True, **ENGINES[0]})["TriggerFunction"]
    assert not [st for st in serverless if "iam:CreateServiceLinkedRole" in as_list(st["Action"])]


def test_bucket_owner_enforced_and_versioned():
    assert BUCKET["OwnershipControls"] == {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]}
    assert BUCKET["VersioningConfiguration"] == {"Status": "Enabled"}


def test_retention_is_a_parameter_for_images_logs_and_old_versions():
    rules = {r.get("Prefix", "*"): r for r in BUCKET["LifecycleConfiguration"]["Rules"]}
    assert rules["images/"]["ExpirationInDays"] == {"Ref": "ImagesRetentionDays"}
    # results/ follows images/: an age rule there would delete table files still in use; unreferenced ones are
    # deleted by each run and then expire as noncurrent versions
    assert "results/" not in rules
    assert rules["logs/"]["ExpirationInDays"] == {"Ref": "LogsRetentionDays"}
    assert rules["*"]["NoncurrentVersionExpiration"] == {"NoncurrentDays": {"Ref": "NoncurrentVersionRetentionDays"}}
    for name in ("TriggerLogGroup", "JobStateLogGroup"):
        assert RESOURCES[name]["Properties"]["RetentionInDays"] == {"Ref": "LogsRetentionDays"}


@pytest.mark.parametrize("conditions", ENGINES, ids=["serverless", "ec2"])
def test_no_notification_loop(conditions):
    notifications = BUCKET["NotificationConfiguration"]["QueueConfigurations"]
    assert {n["Filter"]["S3Key"]["Rules"][0]["Value"] for n in notifications} == {"images/"}
    # ... and nothing the stack runs can write there
    for owner, statements in identity_statements(conditions).items():
        for s in statements:
            if s["Effect"] == "Allow" and {"s3:PutObject", "s3:*", "*"} & set(as_list(s["Action"])):
                targets = [arn_text(r) for r in as_list(s["Resource"])]
                assert not any("/images/" in t or t.endswith("Arn}/*") for t in targets), (owner, targets)


def test_every_kind_of_change_under_images_reaches_the_queue():
    notifications = BUCKET["NotificationConfiguration"]["QueueConfigurations"]
    # Lifecycle expiry sends LifecycleExpiration, not ObjectRemoved (S3 user guide, lifecycle-configure-notification)
    assert {n["Event"] for n in notifications} == {
        "s3:ObjectCreated:*", "s3:ObjectRemoved:*", "s3:LifecycleExpiration:*",
    }  # fmt: skip
    assert all(n["Queue"] == {"Fn::GetAtt": ["UploadQueue", "Arn"]} for n in notifications)


def test_region_is_eu_west_3_by_default_and_eu_only():
    config = tomllib.loads((ROOT / "samconfig.toml").read_text())
    assert {env: c["global"]["parameters"]["region"] for env, c in config.items() if env != "version"} == {
        "default": "eu-west-3", "dev": "eu-west-3", "prod": "eu-west-3", "local": "eu-west-3",
    }  # fmt: skip
    regions = TEMPLATE["Rules"]["EuropeanRegion"]["Assertions"][0]["Assert"]["Fn::Contains"][0]
    assert all(r.startswith("eu-") for r in regions) and "eu-west-3" in regions


def test_samconfig_environments_and_capabilities():
    config = tomllib.loads((ROOT / "samconfig.toml").read_text())
    for env in ("default", "dev", "prod"):
        deploy = config[env]["deploy"]["parameters"]
        # Engine=ec2 names its instance profile (EMR wants the role's name): CloudFormation then needs NAMED_IAM,
        # which `sam deploy --guided` takes from here (guided_context: the environment's capabilities by default)
        assert deploy["capabilities"] == "CAPABILITY_IAM CAPABILITY_NAMED_IAM"
        assert "Stage=" in deploy["parameter_overrides"]
        # A failed first create ends ROLLBACK_COMPLETE, which no later deploy may update: SAM deletes it instead
        # (samcli/lib/deploy/deployer.py, rollback_delete_stack), so running the same command retries it
        assert deploy["on_failure"] == "DELETE"
    assert config["prod"]["deploy"]["parameters"]["stack_name"] != config["dev"]["deploy"]["parameters"]["stack_name"]


# --- IAM ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("conditions", [{**e, **m} for e in ENGINES for m in MODES])
def test_no_wildcard_action_on_wildcard_resource(conditions):
    for owner, statements in identity_statements(conditions).items():
        for s in statements:
            actions, resources = as_list(s["Action"]), as_list(s["Resource"])
            wild_action = any(a == "*" or a.endswith(":*") for a in actions)
            assert not (wild_action and "*" in resources), (owner, s)


def test_runtime_role_reads_images_and_artifacts_writes_results_and_logs_only():
    statements = identity_statements({"UseKms": True, **ENGINES[0]})["JobDataPolicy"]
    reads = {arn_text(r) for s in statements if "s3:GetObject" in as_list(s["Action"]) for r in as_list(s["Resource"])}
    writes = {arn_text(r) for s in statements if "s3:PutObject" in as_list(s["Action"]) for r in as_list(s["Resource"])}
    assert writes == {"${DataBucket.Arn}/results/*", "${DataBucket.Arn}/logs/*"}
    assert reads - writes == {"${DataBucket.Arn}/images/*", "${DataBucket.Arn}/artifacts/*"}
    role = RESOURCES["EmrRuntimeRole"]["Properties"]
    assert role["ManagedPolicyArns"] == [{"Ref": "JobDataPolicy"}]
    assert role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {"Service": "emr-serverless.amazonaws.com"}


@pytest.mark.parametrize(
    "conditions, roles, services",
    [
        (ENGINES[0], {"${EmrRuntimeRole.Arn}"}, ["emr-serverless.amazonaws.com"]),
        (ENGINES[1], {"${EmrServiceRole.Arn}", "${EmrInstanceRole.Arn}"},
         ["elasticmapreduce.amazonaws.com", "ec2.amazonaws.com"]),
    ],
    ids=["serverless", "ec2"],
)  # fmt: skip
def test_pass_role_only_on_the_job_roles_and_only_to_emr(conditions, roles, services):
    for owner, statements in identity_statements(conditions).items():
        for s in statements:
            if "iam:PassRole" not in as_list(s["Action"]):
                continue
            if owner == "EmrServiceRole":  # EMR passes the instance role to EC2 when it launches the cluster
                assert {arn_text(r) for r in as_list(s["Resource"])} == {"${EmrInstanceRole.Arn}"}
                assert s["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
                continue
            assert owner in ("TriggerFunction", "JobStateFunction", "RunControlPolicy")
            assert {arn_text(r) for r in as_list(s["Resource"])} == roles
            assert s["Condition"] == {"StringEquals": {"iam:PassedToService": services}}


def test_ec2_instance_profile_carries_its_role_name_and_the_service_role_may_pass_it():
    # EMR refuses an instance profile named otherwise than its role (management guide, emr-iam-roles-custom);
    # AmazonEMRServicePolicy_v2 passes only EMR_EC2_DefaultRole, so the service role gets its own grant.
    profile = RESOURCES["EmrInstanceProfile"]["Properties"]
    assert profile["InstanceProfileName"] == {"Ref": "EmrInstanceRole"} and profile["Roles"] == [
        {"Ref": "EmrInstanceRole"}
    ]
    [grant] = identity_statements(ENGINES[1])["EmrServiceRole"]
    assert grant["Action"] == "iam:PassRole" and arn_text(grant["Resource"]) == "${EmrInstanceRole.Arn}"
    # ... and a stack with Engine=ec2 must be given a subnet (tagged for the managed policy, docs/DEPLOY.md)
    rule = TEMPLATE["Rules"]["Ec2NeedsATaggedSubnet"]
    assert rule["RuleCondition"] == {"Fn::Equals": [{"Ref": "Engine"}, "ec2"]}
    assert "for-use-with-amazon-emr-managed-policies" in rule["Assertions"][0]["AssertDescription"]


def test_state_rules_match_only_this_stacks_runs():
    events = RESOURCES["JobStateFunction"]["Properties"]["Events"]
    serverless = events["ServerlessRunEnded"]["Properties"]["Pattern"]["detail"]
    assert resolve(serverless["applicationId"], ENGINES[0]) == [{"Ref": "EmrApplication"}]
    for name in ("ClusterStepEnded", "ClusterEndedWithErrors"):
        assert events[name]["Properties"]["Pattern"]["detail"]["name"] == [
            {"prefix": {"Fn::Sub": "image-features-${Stage}-run-"}}
        ]
    # the launcher names clusters and steps with that prefix
    env = TEMPLATE["Globals"]["Function"]["Environment"]["Variables"]
    assert env["RUN_NAME_PREFIX"] == {"Fn::Sub": "image-features-${Stage}"}


@pytest.mark.parametrize("kms", [True, False], ids=["kms", "s3"])
def test_cloudwatch_alarms_can_publish_to_the_alert_topic(kms):
    # A topic under the AWS-managed aws/sns key refuses alarm notifications (AWS knowledge center,
    # cloudwatch-receive-sns-for-alarm-trigger): a customer key that lets CloudWatch use it, or none.
    topic = resolve(RESOURCES["AlertTopic"]["Properties"], {"UseKms": kms})
    if not kms:
        assert "KmsMasterKeyId" not in topic
        return
    assert topic["KmsMasterKeyId"] == {"Ref": "DataKey"}
    statements = RESOURCES["DataKey"]["Properties"]["KeyPolicy"]["Statement"]
    grants = [s for s in statements if "cloudwatch.amazonaws.com" in as_list(s["Principal"].get("Service", []))]
    assert grants and {"kms:Decrypt", "kms:GenerateDataKey*"} <= set(grants[0]["Action"])


# The AWS calls each function's code makes (boto3 and Powertools), per engine.
# (s3:ListBucket: the digest of images/, lambdas/pipeline/inputs.py)
COMMON = {"dynamodb:GetItem", "dynamodb:UpdateItem", "kms:Decrypt", "kms:GenerateDataKey", "iam:PassRole",
          "sns:Publish", "s3:ListBucket", "events:PutEvents"}  # fmt: skip
START = {
    "serverless": {"emr-serverless:StartJobRun", "emr-serverless:TagResource", "emr-serverless:GetJobRun",
                   "emr-serverless:ListJobRuns"},
    # RunJobFlow makes AWSServiceRoleForEMRCleanup with the caller's permissions on an account's first cluster
    "ec2": {"elasticmapreduce:RunJobFlow", "elasticmapreduce:ListClusters", "elasticmapreduce:AddTags",
            "elasticmapreduce:DescribeCluster", "elasticmapreduce:ListSteps",
            "elasticmapreduce:PutAutoTerminationPolicy", "iam:CreateServiceLinkedRole", "iam:PutRolePolicy"},
}  # fmt: skip
# Only the reconciler (JobStateFunction) cancels a run past its timeout
CANCEL = {"serverless": {"emr-serverless:CancelJobRun"}, "ec2": {"elasticmapreduce:TerminateJobFlows"}}


@pytest.mark.parametrize("engine", ["serverless", "ec2"])
def test_each_function_holds_only_the_actions_it_calls(engine):
    conditions = {"UseKms": True, **ENGINES[0 if engine == "serverless" else 1]}
    statements = identity_statements(conditions)
    granted = {
        f: {a for s in statements[f] for a in as_list(s["Action"])} for f in ("TriggerFunction", "JobStateFunction")
    }
    assert granted["TriggerFunction"] == COMMON | START[engine] | {"sqs:SendMessage"}  # ticks, dead letters
    assert granted["JobStateFunction"] == COMMON | START[engine] | CANCEL[engine] | {"s3:GetObject"}  # the report


# --- wiring ------------------------------------------------------------------------------------------
ARTIFACT_VARIABLES = {"ARTIFACTS_VERSION", "JOB_ENTRY_URI", "JOB_ARCHIVE_URI", "RUNTIME_ARCHIVE_URI", "WEIGHTS_URI"}


def test_environment_variables_are_exactly_those_the_code_reads():
    sys.path.insert(0, str(ROOT / "lambdas"))
    from pipeline.settings import ENV_VARS, POWERTOOLS_ENV_VARS

    declared = set(TEMPLATE["Globals"]["Function"]["Environment"]["Variables"])
    assert declared | ARTIFACT_VARIABLES == set(ENV_VARS) | set(POWERTOOLS_ENV_VARS)
    # What runs execute comes from JobArtifacts, and goes to the two functions that start runs
    for name, res in RESOURCES.items():
        own = res.get("Properties", {}).get("Environment", {}).get("Variables", {})
        if name in ("TriggerFunction", "JobStateFunction"):
            assert own == {v: {"Fn::GetAtt": ["JobArtifacts", ARTIFACT_ATTRIBUTES[v]]} for v in ARTIFACT_VARIABLES}
        else:
            assert not own, name
    # ... and only settings.py reads the environment
    for path in (ROOT / "lambdas").rglob("*.py"):
        if path.name != "settings.py":
            assert not re.search(r"os\.environ|getenv", path.read_text()), path


def test_queue_feeds_the_trigger_with_partial_failures_and_a_dead_letter_queue():
    queue = RESOURCES["UploadQueue"]["Properties"]
    assert queue["RedrivePolicy"]["deadLetterTargetArn"] == {"Fn::GetAtt": ["UploadDeadLetterQueue", "Arn"]}
    trigger = RESOURCES["TriggerFunction"]["Properties"]
    source = trigger["Events"]["Uploads"]["Properties"]
    assert source["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    window = TEMPLATE["Parameters"]["BatchingWindowSeconds"]
    assert window["MinValue"] >= 1  # Lambda refuses a window under 1 s when BatchSize is above 10
    assert source["BatchSize"] == 10000 and source["MaximumBatchingWindowInSeconds"] == {"Ref": "BatchingWindowSeconds"}
    # Reserved concurrency would throttle the pollers and dead-letter uploads; MaximumConcurrency caps them
    assert "ReservedConcurrentExecutions" not in trigger and source["ScalingConfig"]["MaximumConcurrency"] >= 2
    # Lambda needs visibility >= 6 x timeout for SQS sources; the window adds to it
    assert queue["VisibilityTimeout"] >= 6 * TEMPLATE["Globals"]["Function"]["Timeout"] + window["MaxValue"]


def test_job_state_function_follows_emr_state_changes_and_the_schedules():
    function = RESOURCES["JobStateFunction"]["Properties"]
    events = function["Events"]
    patterns = {name: e["Properties"]["Pattern"] for name, e in events.items() if e["Type"] == "EventBridgeRule"}
    assert patterns["ServerlessRunEnded"]["detail-type"] == ["EMR Serverless Job Run State Change"]
    assert set(patterns["ServerlessRunEnded"]["detail"]["state"]) == {"SUCCESS", "FAILED", "CANCELLED"}
    assert patterns["ClusterStepEnded"]["detail-type"] == ["EMR Step Status Change"]
    # The schedules call the function with the actions its handler dispatches on
    sys.path.insert(0, str(ROOT / "lambdas"))
    schedules = {e["Properties"]["Input"] for e in events.values() if e["Type"] == "ScheduleV2"}
    assert {json.loads(i)["action"] for i in schedules} == {"reconcile", "daily"}
    assert events["Reconcile"]["Properties"]["ScheduleExpression"] == {"Fn::Sub": "rate(${ReconcileMinutes} minutes)"}
    # Events it failed on, after Lambda's retries, are kept and alarmed on
    assert function["DeadLetterQueue"] == {
        "Type": "SQS",
        "TargetArn": {"Fn::GetAtt": ["JobStateDeadLetterQueue", "Arn"]},
    }
    assert function["EventInvokeConfig"] == {"MaximumRetryAttempts": 2}
    alarm = RESOURCES["JobStateDeadLetterAlarm"]["Properties"]
    assert alarm["Dimensions"] == [
        {"Name": "QueueName", "Value": {"Fn::GetAtt": ["JobStateDeadLetterQueue", "QueueName"]}}
    ]


def test_emr_serverless_application_is_cheap_when_idle():
    app = RESOURCES["EmrApplication"]["Properties"]
    assert app["Type"] == "Spark" and app["ReleaseLabel"] == {"Ref": "EmrReleaseLabel"}
    assert TEMPLATE["Parameters"]["EmrReleaseLabel"]["Default"].startswith("emr-7.")
    assert app["AutoStartConfiguration"] == {"Enabled": True}
    assert app["AutoStopConfiguration"] == {"Enabled": True, "IdleTimeoutMinutes": 15}
    assert set(app["MaximumCapacity"]) == {"Cpu", "Memory", "Disk"}
    assert "InitialCapacity" not in app  # no pre-initialized (billed while idle) workers
    assert resolve(app["ImageConfiguration"], {"HasCustomImage": True}) == {"ImageUri": {"Ref": "CustomImageUri"}}
    # A custom image is optional: the runtime reaches the workers from S3, so no rule asks for one
    assert "ServerlessNeedsTheJobImage" not in TEMPLATE["Rules"]
    assert app["Architecture"] == {"Ref": "Architecture"}
    architecture = TEMPLATE["Parameters"]["Architecture"]
    assert architecture["Default"] == "ARM64" and set(architecture["AllowedValues"]) == {"ARM64", "X86_64"}


# A new account's EMR Serverless quota, "Max concurrent vCPUs per account" (L-D05C8A75): docs/DEPLOY.md, Quotas.
NEW_ACCOUNT_VCPUS = 16


def test_a_runs_defaults_fit_a_new_accounts_emr_serverless_vcpu_quota():
    # What a run asks for at its start and at its peak: the driver plus the initial, then the maximum, executors
    parameters = TEMPLATE["Parameters"]
    confs = dict(re.findall(r"--conf (\S+?)=(\S+)", parameters["SparkSubmitParameters"]["Default"]))
    driver, executor = int(confs["spark.driver.cores"]), int(confs["spark.executor.cores"])
    initial = int(confs["spark.dynamicAllocation.initialExecutors"])  # EMR Serverless's own default is 3
    peak = int(confs["spark.dynamicAllocation.maxExecutors"])
    ceiling = int(parameters["MaxVcpu"]["Default"].split()[0])
    assert driver + initial * executor <= driver + peak * executor <= ceiling <= NEW_ACCOUNT_VCPUS
    # ... and the memory ceiling holds as many workers: 4 GB for the driver, 8 GB per executor (the defaults' sizes)
    memory = int(parameters["MaxMemory"]["Default"].split()[0])
    assert driver * 2 + peak * executor * 2 <= memory


def test_runs_are_priced_at_the_list_prices_of_their_architecture_unless_the_deployer_gives_the_regions():
    env = TEMPLATE["Globals"]["Function"]["Environment"]["Variables"]
    prices = TEMPLATE["Mappings"]["ServerlessListPrices"]
    for name, column in (("PRICE_VCPU_HOUR", "VcpuHour"), ("PRICE_GB_HOUR", "GbHour")):
        parameter = "PriceVcpuHour" if column == "VcpuHour" else "PriceGbHour"
        for arm64, key in ((True, "ARM64"), (False, "X86-64")):
            listed = resolve(env[name], {f"Has{parameter}": False, "IsArm64": arm64})
            assert listed == {"Fn::FindInMap": ["ServerlessListPrices", key, column]}
        assert resolve(env[name], {f"Has{parameter}": True}) == {"Ref": parameter}
        assert TEMPLATE["Parameters"][parameter]["Default"] == ""
        assert TEMPLATE["Conditions"][f"Has{parameter}"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": parameter}, ""]}]}
    # Graviton is the cheaper, and DEPLOY.md cites every default with its source
    assert float(prices["ARM64"]["VcpuHour"]) < float(prices["X86-64"]["VcpuHour"])
    deploy = (ROOT / "docs" / "DEPLOY.md").read_text()
    assert all(f"`{price}`" in deploy for row in prices.values() for price in row.values())
    assert "https://aws.amazon.com/emr/pricing/" in deploy
    # A local run's report prices its resources at the same list (x86_64, this machine's): one source, checked
    from emr_job import cost

    x86 = prices["X86-64"]
    assert float(x86["VcpuHour"]) == cost.PRICE_VCPU_HOUR and float(x86["GbHour"]) == cost.PRICE_GB_HOUR


def test_state_table_and_alerts_have_a_topic():
    table = RESOURCES["RunsTable"]["Properties"]
    assert table["KeySchema"] == [{"AttributeName": "id", "KeyType": "HASH"}]
    assert table["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    assert RESOURCES["AlertTopic"]["Type"] == "AWS::SNS::Topic"
    alarms = [r for r in RESOURCES.values() if r["Type"] == "AWS::CloudWatch::Alarm"]
    assert alarms and all(a["Properties"]["AlarmActions"] == [{"Ref": "AlertTopic"}] for a in alarms)


# settings variable -> the JobArtifacts attribute it carries (lambdas/artifacts/publish.py returns them)
ARTIFACT_ATTRIBUTES = {"ARTIFACTS_VERSION": "Version", "JOB_ENTRY_URI": "JobEntryUri",
                       "JOB_ARCHIVE_URI": "JobArchiveUri", "RUNTIME_ARCHIVE_URI": "RuntimeArchiveUri",
                       "WEIGHTS_URI": "WeightsUri"}  # fmt: skip


def test_the_stack_puts_what_runs_execute_in_place_itself():
    # A layer `sam build` makes (emr_job/Makefile), one per architecture, chosen by the parameter
    for name, condition in (("JobRuntimeArm64", "IsArm64"), ("JobRuntimeX86", "IsX86")):
        layer = RESOURCES[name]
        assert layer["Type"] == "AWS::Serverless::LayerVersion" and layer["Condition"] == condition
        assert layer["Metadata"] == {"BuildMethod": "makefile"} and layer["Properties"]["ContentUri"] == "emr_job/"
        assert f"build-{name}:" in (ROOT / "emr_job" / "Makefile").read_text()
    chosen = {"Fn::If": ["IsArm64", {"Ref": "JobRuntimeArm64"}, {"Ref": "JobRuntimeX86"}]}
    assert RESOURCES["ArtifactsFunction"]["Properties"]["Layers"] == [chosen]
    # A custom resource copies it to S3 at every deployment; a new layer version makes CloudFormation update it
    resource = RESOURCES["JobArtifacts"]["Properties"]
    assert resource["ServiceToken"] == {"Fn::GetAtt": ["ArtifactsFunction", "Arn"]}
    assert resource["Layer"] == chosen and resource["Source"] == "/opt/job"
    assert resource["ModelWeights"] == {"Ref": "ModelWeights"}
    assert resource["KeepSupersededMinutes"] == {"Ref": "JobTimeoutMinutes"}
    weights = TEMPLATE["Parameters"]["ModelWeights"]
    assert weights["Default"] == "imagenet" and re.fullmatch(weights["AllowedPattern"], "s3://my-bucket/w.h5")
    # The functions are built with the same Makefile method: no local interpreter of the runtime's version
    for name in ("TriggerFunction", "JobStateFunction", "ArtifactsFunction"):
        assert RESOURCES[name]["Metadata"]["BuildMethod"] == "makefile"
        assert f"build-{name}:" in (ROOT / "lambdas" / "Makefile").read_text()
    sys.path.insert(0, str(ROOT / "lambdas"))
    from artifacts.publish import ATTRIBUTES  # what publish() returns (tests/lambdas/test_artifacts.py)

    assert set(ARTIFACT_ATTRIBUTES.values()) == set(ATTRIBUTES)


def test_functions_run_on_the_newest_python_runtime():
    # AWS Lambda runtimes page: python3.14 and python3.13 are deprecated on 2029-06-30, python3.11 on 2027-06-30
    assert TEMPLATE["Globals"]["Function"]["Runtime"] == "python3.14"
    assert "--python-version 3.14" in (ROOT / "lambdas" / "Makefile").read_text().replace("$(LAMBDA_PYTHON)", "3.14")


def test_guided_deploy_asks_for_the_alert_address_and_the_weights():
    alert = TEMPLATE["Parameters"]["AlertEmail"]
    assert "Default" not in alert  # CloudFormation needs a value: the guided deploy asks, `none` opts out
    assert re.fullmatch(alert["AllowedPattern"], "ops@example.org") and re.fullmatch(alert["AllowedPattern"], "none")
    assert not re.fullmatch(alert["AllowedPattern"], "")
    assert RESOURCES["AlertEmailSubscription"]["Condition"] == "HasAlertEmail"
    groups = TEMPLATE["Metadata"]["AWS::CloudFormation::Interface"]["ParameterGroups"]
    assert groups[0]["Parameters"][:3] == ["ModelWeights", "ModelWeightsSha256", "AlertEmail"]


def test_lambda_and_job_recognise_the_same_image_extensions():
    sys.path.insert(0, str(ROOT / "lambdas"))
    from pipeline.notifications import IMAGE_EXTENSIONS as TRIGGER

    from emr_job.images import IMAGE_EXTENSIONS as JOB

    assert TRIGGER == JOB  # separate deployables, one list each: an upload the trigger drops is never featurized
