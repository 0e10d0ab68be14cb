"""Command line: `python -m emr_job ...` locally, `spark-submit emr_job/main.py ...` on EMR."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script by spark-submit: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emr_job.images import ImageError  # noqa: E402  (after the sys.path fix above)
from emr_job.model import WeightsError, load_arrays, resolve_weights  # noqa: E402
from emr_job.pca import PcaError  # noqa: E402

log = logging.getLogger("emr_job")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="emr_job", description=__doc__)
    parser.add_argument("--input", required=True, help="folder or s3:// prefix laid out as <label>/<file>")
    parser.add_argument("--output", required=True, help="folder or s3:// prefix for features/, pca/, ...")
    parser.add_argument("--manifest", help="run manifest (JSON with added/removed URIs), local or s3://")
    parser.add_argument(
        "--weights", default="random", help="random (seeded, offline) | imagenet | PATH | s3://... (default random)"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--variance", type=float, help="keep the fewest components reaching this (default 0.95)")
    group.add_argument("--k", type=int, help="keep exactly k components")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    parser.add_argument("--io-threads", type=int, default=8, help="concurrent reads+decodes per task")
    args = parser.parse_args(argv)
    if args.variance is not None and not 0 < args.variance <= 1:
        parser.error(f"--variance must be in (0, 1], got {args.variance}")
    if args.k is not None and args.k < 1:
        parser.error(f"--k must be at least 1, got {args.k}")
    if args.k is None and args.variance is None:
        args.variance = 0.95
    return args


def spark_session():
    """Under spark-submit the cluster's settings win; `python -m emr_job` gets a local session."""
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


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    started = time.monotonic()
    from emr_job.job import JobConfig, run
    from emr_job.report import summary

    cfg = JobConfig(
        input=args.input,
        output=args.output,
        manifest=args.manifest,
        weights=args.weights,
        variance=args.variance,
        k=args.k,
        batch_size=args.batch_size,
        io_threads=args.io_threads,
    )
    try:
        weights = resolve_weights(cfg.weights, tempfile.mkdtemp(prefix="emr_job-"))
    except WeightsError as exc:
        log.error("%s", exc)
        return 1
    # The driver's TensorFlow import and weight loading overlap the JVM's start.
    with ThreadPoolExecutor(1) as pool:
        arrays = pool.submit(load_arrays, weights)
        spark = spark_session()
        log.info("spark session ready in %.1fs", time.monotonic() - started)
        try:
            rpt = run(spark, cfg, log=log.info, weights_loading=(weights, arrays))
        except (WeightsError, PcaError, ImageError, FileNotFoundError, ValueError) as exc:
            log.error("run failed, previous results left as they were: %s", exc)
            return 1
        finally:
            spark.stop()
    print(summary(rpt), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
