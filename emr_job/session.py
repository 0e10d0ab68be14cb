"""The Spark session: under spark-submit the cluster's settings win; `python -m emr_job` gets a local one."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def spark_session():
    from pyspark.sql import SparkSession

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    builder = SparkSession.builder.appName("emr_job")
    if "PYSPARK_GATEWAY_PORT" not in os.environ:  # not launched by spark-submit
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers use this venv, not PATH's python
        root = str(Path(__file__).resolve().parent.parent)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        builder = (
            builder.master(os.environ.get("SPARK_MASTER", "local[*]"))
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.shuffle.partitions", "8")
            .config("spark.driver.memory", os.environ.get("SPARK_DRIVER_MEMORY", "1g"))
            # Spark runs one task per core: numpy's BLAS threads in each would only oversubscribe them.
            .config("spark.executorEnv.OPENBLAS_NUM_THREADS", "1")
        )
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark
