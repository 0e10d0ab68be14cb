"""What a run used, and what that costs at EMR Serverless prices: vCPU-seconds and GB-seconds of the driver and of
every executor while it was up, sampled during the run. An estimate for people (report.json, report.html); on AWS
the job-state function records what EMR itself measured (totalResourceUtilization, or normalized hours)."""

from __future__ import annotations

import os
import re
import resource
import threading
import time
from typing import Optional

# EMR Serverless list prices (USD, x86_64, US East N. Virginia), the defaults of --price-vcpu-hour/--price-gb-hour.
# The stack passes its region's and architecture's prices (template.yaml, whose x86_64 row a test keeps equal
# to these); docs/DEPLOY.md cites them.
PRICE_VCPU_HOUR = 0.052624
PRICE_GB_HOUR = 0.0057785
SAMPLE_S = 2.0


def _gb(text: Optional[str], default_gb: float) -> float:
    """A Spark memory setting ("4g", "512m", "14336m") in GB."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]?)b?", (text or "").strip().lower())
    if not match:
        return default_gb
    scale = {"k": 1 / 1024**2, "m": 1 / 1024, "g": 1.0, "t": 1024.0, "": 1 / 1024**3}[match.group(2)]
    return float(match.group(1)) * scale


class ResourceMeter:
    """Integrates cores and memory over the run: the driver all along, executors while Spark lists them."""

    def __init__(self, clock=time.monotonic):
        self.clock, self.start = clock, clock()
        self.driver_cores = min(4, len(os.sched_getaffinity(0)))  # the driver's own featurizing threads
        self.driver_gb: Optional[float] = None  # None: the process's peak RSS
        self.executor_vcpu_s = self.executor_gb_s = 0.0
        self.basis = "this process, without Spark"
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def attach(self, spark) -> None:
        """Spark started: a local master is the driver with its cores; a cluster adds executors, sampled."""
        if self._thread is not None:
            return
        conf, sc = spark.sparkContext.getConf(), spark.sparkContext
        self.driver_gb = _gb(conf.get("spark.driver.memory"), 1.0)
        if sc.master.startswith("local"):
            self.driver_cores, self.basis = sc.defaultParallelism, f"local Spark, {sc.defaultParallelism} cores"
            return
        self.driver_cores = int(conf.get("spark.driver.cores", "1"))
        self.driver_gb += _gb(conf.get("spark.driver.memoryOverhead"), max(0.375, 0.1 * self.driver_gb))
        cores = int(conf.get("spark.executor.cores", "1"))
        memory = _gb(conf.get("spark.executor.memory"), 1.0)
        memory += _gb(conf.get("spark.executor.memoryOverhead"), max(0.375, 0.1 * memory))
        self.executor_cores, self.executor_gb, self._last = cores, memory, self.clock()
        self.basis = f"driver {self.driver_cores} vCPU + executors of {cores} vCPU / {memory:.1f} GB, sampled"
        self._thread = threading.Thread(target=self._sample, args=(sc,), daemon=True)
        self._thread.start()

    def _sample(self, sc) -> None:
        while not self._stop.wait(SAMPLE_S):
            try:  # block managers: the driver's and one per executor
                executors = max(0, sc._jsc.sc().getExecutorMemoryStatus().size() - 1)
            except Exception:
                return  # Spark is stopping
            self.tick(executors)

    def tick(self, executors: int) -> None:
        """Count the executors Spark lists now for the time since the last sample."""
        now = self.clock()
        self.executor_vcpu_s += executors * self.executor_cores * (now - self._last)
        self.executor_gb_s += executors * self.executor_gb * (now - self._last)
        self._last = now

    def summary(self, price_vcpu_hour: float = PRICE_VCPU_HOUR, price_gb_hour: float = PRICE_GB_HOUR) -> dict:
        self._stop.set()
        wall = self.clock() - self.start
        driver_gb = self.driver_gb or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        vcpu_s = self.driver_cores * wall + self.executor_vcpu_s
        gb_s = driver_gb * wall + self.executor_gb_s
        usd = vcpu_s / 3600 * price_vcpu_hour + gb_s / 3600 * price_gb_hour
        return {
            "vcpu_seconds": round(vcpu_s, 1),
            "gb_seconds": round(gb_s, 1),
            "estimated_usd": round(usd, 5),
            "prices": {"usd_per_vcpu_hour": price_vcpu_hour, "usd_per_gb_hour": price_gb_hour},
            "basis": self.basis,
        }
