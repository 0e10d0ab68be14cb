"""image-features: the operator's commands for this stack (docs/DEPLOY.md).

image-features preflight [--config-env ENV] [--region R] [--profile P] [--parameter-overrides "K=V ..."] [--json]
    before `sam deploy` (make deploy runs it first): can this account, region and machine take the stack?
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError

from ops import logs, preflight, status

LABELS = {"ok": "ok", "warn": "warn", "fail": "FAIL"}
# A preflight should answer in seconds, also when an endpoint does not: short timeouts, one retry.
CLIENT_CONFIG = Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2, "mode": "standard"})


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="image-features", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = main.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "preflight",
        help="check that this account, region and machine can take the stack, and say what to fix",
        description="Check, with read-only calls, that `sam build && sam deploy --config-env ENV` can succeed "
        "here, and print what to fix, with the command that fixes it.",
        epilog=preflight.CHECKS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("--config-env", default="default", metavar="ENV",
                       help="samconfig.toml environment whose region and parameter_overrides to check (default: "
                       "%(default)s)")  # fmt: skip
    check.add_argument("--region", help="AWS region (default: samconfig.toml's, then the profile's, as sam deploy)")
    check.add_argument("--profile", help="AWS named profile (default: boto3's: AWS_PROFILE, then 'default')")
    check.add_argument("--parameter-overrides", default="", metavar='"KEY=VALUE ..."',
                       help="template parameters over samconfig.toml's, as sam deploy reads them (quotes keep "
                       "spaces: MaxVcpu='32 vCPU')")  # fmt: skip
    check.add_argument("--sam", metavar="PATH", help=f"the SAM CLI to check (default: `sam` on PATH, else "
                       f"{preflight.LOCAL_SAM}); make deploy passes the one it runs")  # fmt: skip
    check.add_argument("--json", action="store_true", help="print the checks as a JSON list, for scripts")
    logs.add_parser(commands)
    status.add_parser(commands)
    return main


def render_text(checks: list) -> str:
    lines = []
    for check in checks:
        lines.append(f"{LABELS[check.status]:<6}{check.message}")
        for i, fix in enumerate(check.fix.splitlines()):
            lines.append(f"      {'fix: ' if i == 0 else '     '}{fix}")
    count = {status: sum(c.status == status for c in checks) for status in LABELS}
    tally = f"{count['fail']} failed, {count['warn']} warning{'s' * (count['warn'] != 1)}, {count['ok']} ok"
    verdict = "not ready for sam deploy: fix the FAIL lines first" if count["fail"] else "ready for sam deploy"
    return "\n".join([*lines, f"preflight: {tally}: {verdict}"])


def render_json(checks: list) -> str:
    return json.dumps([{**asdict(c), "fix": c.fix or None} for c in checks], indent=2)


def run_preflight(args, clients=None, probes=None) -> int:
    try:
        session = None if clients else boto3.Session(profile_name=args.profile)
        target = preflight.resolve_target(args.config_env, region=args.region, profile=args.profile,
                                          overrides=args.parameter_overrides, sam=args.sam,
                                          default_region=session.region_name if session else None)  # fmt: skip
    except (preflight.UsageError, BotoCoreError) as exc:  # an unknown environment or profile, a malformed override
        print(f"image-features preflight: error: {exc}", file=sys.stderr)
        return 2
    clients = clients or (lambda service: session.client(service, region_name=target.region, config=CLIENT_CONFIG))
    checks = preflight.run_preflight(target, clients, probes)
    print(render_json(checks) if args.json else render_text(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0


def main(argv=None, *, clients=None, probes=None) -> int:
    """The console script. clients (service -> boto3 client) and probes (preflight.Probes) are for tests."""
    args = parser().parse_args(argv)
    if args.command == "preflight":
        return run_preflight(args, clients, probes)
    if getattr(args, "run", None):
        return args.run(args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
