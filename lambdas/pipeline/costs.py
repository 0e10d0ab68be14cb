"""What a settled run used, as EMR measured it, and an estimate of its price: kept in the state item's last_run (as
strings, like the rest of it) and sent as metrics (control.py). Figures only, never anything of an image; no
Powertools here, so that the operator's commands (ops/) can import the launchers beside it.

EMR Serverless: GetJobRun's totalResourceUtilization (vCPU-, memory GB- and storage GB-hours the run used, to the
second) and billedResourceUtilization (what AWS bills: at least a minute per worker, storage only beyond the 20 GB
each worker has free). EMR on EC2: DescribeCluster's NormalizedInstanceHours, an approximation in m1.small-hours
that is not a price; EMR may still add to it while the cluster terminates after its step."""

from __future__ import annotations

from typing import Optional

# GetJobRun's ResourceUtilization fields -> last_run's names (hours)
SERVERLESS = (("vCPUHour", "vcpu_hours"), ("memoryGBHour", "memory_gb_hours"), ("storageGBHour", "storage_gb_hours"))
METRICS = {
    "vcpu_hours": "RunVcpuHours",
    "memory_gb_hours": "RunMemoryGbHours",
    "storage_gb_hours": "RunStorageGbHours",
    "normalized_instance_hours": "RunNormalizedInstanceHours",
    "estimated_usd": "RunEstimatedUsd",
}


def serverless_usage(job_run: dict) -> dict:
    """GetJobRun's jobRun -> {vcpu_hours, memory_gb_hours, storage_gb_hours, billed_...}: what EMR gives of them."""
    usage = {}
    for prefix, field in (("", "totalResourceUtilization"), ("billed_", "billedResourceUtilization")):
        for api, name in SERVERLESS:
            value = (job_run.get(field) or {}).get(api)
            if value is not None:
                usage[prefix + name] = float(value)
    return usage


def ec2_usage(cluster: dict) -> dict:
    """DescribeCluster's Cluster -> {normalized_instance_hours} as it stands now (or {} if EMR gives none)."""
    hours = cluster.get("NormalizedInstanceHours")
    return {} if hours is None else {"normalized_instance_hours": float(hours)}


def basis(usage: dict) -> str:
    """The hours a run is priced and measured on: billed where EMR reports them (non-zero), else the hours used."""
    return "billed_" if usage.get("billed_vcpu_hours") else ""


def summary(usage: dict, price_vcpu_hour: Optional[float], price_gb_hour: Optional[float]) -> dict:
    """The usage, and its estimated price in USD where prices are set. Storage is not priced: the default workers'
    disks are within the free 20 GB, and billed storage beyond it shows in billed_storage_gb_hours."""
    out, on = dict(usage), basis(usage)
    if price_vcpu_hour is not None and on + "vcpu_hours" in usage:
        usd = usage[on + "vcpu_hours"] * price_vcpu_hour + usage.get(on + "memory_gb_hours", 0.0) * price_gb_hour
        out.update(estimated_usd=usd, priced_on="billed" if on else "used",
                   prices_usd=f"{price_vcpu_hour} per vCPU-hour, {price_gb_hour} per GB-hour")  # fmt: skip
    return out


def as_strings(figures: dict) -> dict:
    """last_run's form: hours to 6 significant digits, dollars to 4 decimals."""
    return {name: value if isinstance(value, str) else f"{value:.4f}" if name == "estimated_usd" else f"{value:.6g}"
            for name, value in figures.items()}  # fmt: skip
