# Everything installs from this repository's pinned files: `make run` and `make test` on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SAM_VENV := .venv-sam
SCAN_VENV := .venv-scan
SAM_CLI_VERSION := 1.170.0
PIP_INSTALL = $(1)/bin/pip install --disable-pip-version-check -q

INPUT ?= out/sample-images
OUTPUT ?= out/results
WEIGHTS ?= random
EVENT ?= events/sqs_batch.json
BENCH_N ?= 5000
STACK_ENV ?= default
OVERRIDES ?=
WEIGHTS_FILE ?= dist/mobilenet_v2.weights.h5
SAM ?= $(SAM_VENV)/bin/sam
IMAGE_FEATURES ?= $(SAM_VENV)/bin/image-features

export SAM_CLI_TELEMETRY := 0
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup sam-setup scan-setup run sample test bench lint invoke demo demo-up package weights preflight deploy status \
  logs clean

setup: $(VENV)/.installed $(VENV)/bin/image-features
$(VENV)/.installed: requirements-dev.txt emr_job/requirements.txt lambdas/requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(call PIP_INSTALL,$(VENV)) -r requirements-dev.txt -c constraints.txt
	touch $@

# The operator's commands (image-features preflight, ...), from this checkout: pyproject.toml's console script, in
# .venv and in .venv-sam (they need boto3 and PyYAML only, so make deploy needs no TensorFlow or Spark).
%/bin/image-features: pyproject.toml | %/.installed
	$(call PIP_INSTALL,$*) --no-deps -e .
	touch $@

# SAM CLI pins many packages of its own: it gets a virtual environment of its own.
sam-setup: $(SAM_VENV)/.installed $(SAM_VENV)/bin/image-features
$(SAM_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(SAM_VENV)
	$(call PIP_INSTALL,$(SAM_VENV)) aws-sam-cli==$(SAM_CLI_VERSION)
	touch $@

# checkov and parliament (template scanners in make test) pin packages of their own too.
scan-setup: $(SCAN_VENV)/.installed
$(SCAN_VENV)/.installed: requirements-scan.txt constraints-scan.txt
	$(PYTHON) -m venv $(SCAN_VENV)
	$(call PIP_INSTALL,$(SCAN_VENV)) -r requirements-scan.txt -c constraints-scan.txt
	touch $@

out/.sample-images.done: emr_job/sample.py | $(VENV)/.installed
	rm -rf out/sample-images
	$(PY) -m emr_job.sample out/sample-images --per-label 20
	touch $@

sample: out/.sample-images.done

run: setup $(if $(filter out/sample-images,$(INPUT)),sample)
	$(PY) -m emr_job --input "$(INPUT)" --output "$(OUTPUT)" --weights "$(WEIGHTS)" $(ARGS)

test: setup sam-setup scan-setup
	$(VENV)/bin/pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/cfn-lint template.yaml

bench: setup
	$(PY) tests/bench/bench.py --n $(BENCH_N) $(ARGS)

invoke: setup
	$(PY) tests/local_invoke.py $(EVENT)

# The deployed flow on this machine: template.yaml's resources on a moto server, the functions, a local EMR.
demo: setup
	$(PY) -m tests.localstack demo $(ARGS)

demo-up: setup
	$(PY) -m tests.localstack up $(ARGS)

# The job's files and its runtime archive for EMR, as `sam build` makes them for the JobRuntime layer.
package: setup
	$(PY) -m emr_job.package layer dist/job --architecture $(or $(ARCH),ARM64)

# ImageNet weights as a weights file, for --weights PATH locally (the stack fetches its own when it deploys).
weights: setup
	$(PY) -m emr_job.package fetch-imagenet $(WEIGHTS_FILE)

# Read-only checks of what sam deploy needs (region, quota, tools, Engine=ec2's subnet), for the same environment,
# overrides and SAM CLI as make deploy; it exits 1, and stops make deploy, when the deployment would fail.
preflight: sam-setup
	$(IMAGE_FEATURES) preflight --config-env $(STACK_ENV) --sam $(SAM) \
	  $(if $(strip $(OVERRIDES)),--parameter-overrides "$(OVERRIDES)") $(ARGS)

# The README's rollout with checks around it: `sam build && sam deploy`. OVERRIDES="Key='a value' ..." are added to
# the samconfig environment's parameter_overrides (SAM would otherwise replace them), quotes kept for SAM to read.
deploy: sam-setup preflight
	$(SAM) validate --lint
	$(SAM) build
	$(SAM) deploy --config-env $(STACK_ENV) $(if $(strip $(OVERRIDES)),--parameter-overrides \
	  "$$($(SAM_VENV)/bin/python emr_job/package.py overrides --config-env $(STACK_ENV)) $(OVERRIDES)")

# The operator's view of the STACK_ENV stack: what the pipeline does now (ARGS="--json", "--url"), and its logs.
# From .venv-sam, like preflight: boto3 and PyYAML are all they need.
status: sam-setup
	$(IMAGE_FEATURES) status --config-env $(STACK_ENV) $(ARGS)

logs: sam-setup
	$(IMAGE_FEATURES) logs --config-env $(STACK_ENV) $(ARGS)

clean:
	rm -rf out dist .aws-sam .pytest_cache bench-out
