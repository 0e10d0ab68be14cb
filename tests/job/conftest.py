import os

import pytest


@pytest.fixture(scope="session")
def spark():
    os.environ["SPARK_MASTER"] = "local[2]"
    from emr_job.session import spark_session

    session = spark_session()
    yield session
    session.stop()


@pytest.fixture
def job(spark):
    """Run the job in-process on the test session: job(input, output, **JobConfig fields) -> report. Small trees
    go through Spark too, unless a test sets driver_max_images / driver_max_rows (the driver-side path)."""
    from emr_job.job import JobConfig, run

    def go(src, out, fail_at=None, **options):
        options = {"driver_max_images": 0, "driver_max_rows": 0, **options}
        return run(JobConfig(input=str(src), output=str(out), **options), session=lambda: spark, fail_at=fail_at)

    return go
