"""The resources a run used and their price, as report.json states them."""

from types import SimpleNamespace

import pytest

from emr_job import cost


def test_a_local_spark_run_counts_its_cores_and_driver_memory_for_its_whole_time(job, tmp_path):
    from tests.job.images import make_tree

    make_tree(str(tmp_path / "in"), labels=("x",), per_label=3)
    rpt = job(tmp_path / "in", tmp_path / "out", k=2)

    r = rpt["resources"]
    assert r["basis"] == "local Spark, 2 cores"  # the test session is local[2]
    # From the listing to the swap: a little less than the whole run, never more
    assert 0.8 * 2 * rpt["timings_s"]["total"] <= r["vcpu_seconds"] <= 2 * rpt["timings_s"]["total"] + 0.5
    assert r["gb_seconds"] == pytest.approx(r["vcpu_seconds"] / 2 * 1.0, rel=0.05)  # 1g of driver memory
    expected = r["vcpu_seconds"] / 3600 * cost.PRICE_VCPU_HOUR + r["gb_seconds"] / 3600 * cost.PRICE_GB_HOUR
    assert r["estimated_usd"] == pytest.approx(expected, abs=1e-5)


def test_a_cluster_run_adds_each_executor_while_spark_lists_it(monkeypatch):
    # Given a cluster: a driver of 2 vCPU / 4g, executors of 4 vCPU and 8g (+10% overhead each)
    now = [0.0]
    meter = cost.ResourceMeter(clock=lambda: now[0])
    conf = {"spark.driver.cores": "2", "spark.driver.memory": "4g", "spark.executor.cores": "4",
            "spark.executor.memory": "8g"}  # fmt: skip
    sc = SimpleNamespace(master="yarn", defaultParallelism=8, getConf=lambda: SimpleNamespace(get=conf.get))
    monkeypatch.setattr(cost.ResourceMeter, "_sample", lambda self, sc: None)  # samples are taken by hand below
    meter.attach(SimpleNamespace(sparkContext=sc))

    # When Spark lists no executor for 10 s, then two for 60 s
    for seconds, executors in ((10, 0), (60, 2)):
        now[0] += seconds
        meter.tick(executors)
    r = meter.summary(price_vcpu_hour=0.05, price_gb_hour=0.005)

    # Then the driver counts for the 70 s, and each executor for its 60 s
    assert r["vcpu_seconds"] == pytest.approx(2 * 70 + 2 * 4 * 60)
    assert r["gb_seconds"] == pytest.approx((4 + 0.4) * 70 + 2 * 8.8 * 60)
    usd = r["vcpu_seconds"] / 3600 * 0.05 + r["gb_seconds"] / 3600 * 0.005
    assert r["estimated_usd"] == pytest.approx(usd, abs=1e-5)
    assert r["basis"] == "driver 2 vCPU + executors of 4 vCPU / 8.8 GB, sampled"


def test_spark_memory_settings_read_as_gb():
    assert [cost._gb(t, 1.0) for t in ("4g", "512m", "14336m", "1t", "", None, "lots")] == [
        4.0, 0.5, 14.0, 1024.0, 1.0, 1.0, 1.0
    ]  # fmt: skip
