#!/bin/bash
# EMR on EC2 bootstrap action: Python 3.11 with the job's pinned packages in /opt/image-features/venv.
# Arguments: the S3 URIs of requirements.txt and constraints.txt (uploaded beside this script by make deploy).
# pyspark is never installed here: the cluster's own Spark (3.5 on EMR 7) must stay the one in use.
set -euo pipefail
REQUIREMENTS_URI="$1"
CONSTRAINTS_URI="$2"
VENV=/opt/image-features/venv

sudo dnf install -y python3.11 python3.11-pip
sudo mkdir -p /opt/image-features
sudo chown "$(id -u):$(id -g)" /opt/image-features
aws s3 cp "$REQUIREMENTS_URI" /opt/image-features/requirements.txt
aws s3 cp "$CONSTRAINTS_URI" /opt/image-features/constraints.txt
python3.11 -m venv "$VENV"
"$VENV/bin/pip" install --no-cache-dir -r /opt/image-features/requirements.txt -c /opt/image-features/constraints.txt
if "$VENV/bin/pip" show pyspark >/dev/null 2>&1; then
  echo "pyspark must come from EMR, not from requirements.txt" >&2
  exit 1
fi
