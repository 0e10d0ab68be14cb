"""Command line: `python -m emr_job ...` locally, `spark-submit emr_job/main.py ...` on EMR."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script by spark-submit: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emr_job.cost import PRICE_GB_HOUR, PRICE_VCPU_HOUR  # noqa: E402  (after the sys.path fix above)
from emr_job.images import ImageError  # noqa: E402
from emr_job.model import WeightsError  # noqa: E402
from emr_job.pca import PcaError  # noqa: E402

log = logging.getLogger("emr_job")
LAUNCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # it names the run's progress object


class _Stderr:
    """Whatever sys.stderr is when a line is logged: at a terminal the progress bar (rich) swaps it, to print the
    log above the bar rather than through it."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="emr_job", description=__doc__)
    parser.add_argument("--input", required=True, help="folder or s3:// prefix laid out as <label>/<file>")
    parser.add_argument("--output", required=True, help="folder or s3:// prefix for report.json and tables/")
    parser.add_argument(
        "--weights", default="random", help="random (seeded, offline) | imagenet | PATH | s3://... (default random)"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--variance", type=float, help="keep the fewest components reaching this (default 0.95)")
    group.add_argument("--k", type=int, help="keep exactly k components")
    parser.add_argument(
        "--engine", choices=("onnx", "tensorflow"), default="onnx",
        help="runs the network: onnx (ONNX Runtime, default, faster) or tensorflow (the reference)",
    )  # fmt: skip
    parser.add_argument(
        "--refit", choices=("auto", "always", "never"), default="auto",
        help="auto (default): keep the published PCA basis until the data drifts, so stored coordinates stay put; "
        "always: refit at every run; never: only when the weights change or an image is erased",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    parser.add_argument("--io-threads", type=int, default=8, help="concurrent reads+decodes per task")
    parser.add_argument(
        "--keep-snapshots-hours", type=float, default=0.5,
        help="superseded table snapshots (and files only they reach) stay this long for readers (default 0.5)",
    )  # fmt: skip
    parser.add_argument("--launch-id", help="the pipeline run that launched this job (set by the pipeline)")
    parser.add_argument("--price-vcpu-hour", type=float, default=PRICE_VCPU_HOUR,
                        help=f"USD per vCPU-hour, for the report's cost (default {PRICE_VCPU_HOUR})")  # fmt: skip
    parser.add_argument("--price-gb-hour", type=float, default=PRICE_GB_HOUR,
                        help=f"USD per GB-hour, for the report's cost (default {PRICE_GB_HOUR})")  # fmt: skip
    parser.add_argument("--glue-database", help="Glue database whose tables follow the published ones (on AWS)")
    args = parser.parse_args(argv)
    if args.variance is not None and not 0 < args.variance <= 1:
        parser.error(f"--variance must be in (0, 1], got {args.variance}")
    if args.k is not None and args.k < 1:
        parser.error(f"--k must be at least 1, got {args.k}")
    if args.glue_database is not None:
        from emr_job.catalog import GLUE_DATABASE

        if not GLUE_DATABASE.match(args.glue_database):
            parser.error(f"--glue-database {args.glue_database!r}: lower-case letters, digits and underscores only")
    if args.launch_id is not None and not LAUNCH_ID.fullmatch(args.launch_id):
        parser.error(f"--launch-id {args.launch_id!r}: letters, digits, '.', '_' and '-' only")
    if args.k is None and args.variance is None:
        args.variance = 0.95
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=_Stderr())
    logging.getLogger("pyiceberg").setLevel(logging.WARNING)  # "Defaulting to PyArrow FileIO", per table
    # The EMR runtime's pyiceberg has no compiled Avro decoder (emr_job/requirements.txt says why): expected there.
    warnings.filterwarnings("ignore", message="Falling back to pure Python Avro decoder")
    args = parse_args(argv)
    from emr_job.catalog import CatalogError
    from emr_job.job import AfterSwapError, JobConfig, run
    from emr_job.report import summary
    from emr_job.session import spark_session
    from emr_job.store import CommitError

    cfg = JobConfig(
        input=args.input,
        output=args.output,
        weights=args.weights,
        variance=args.variance,
        k=args.k,
        batch_size=args.batch_size,
        io_threads=args.io_threads,
        keep_snapshots_hours=args.keep_snapshots_hours,
        launch_id=args.launch_id,
        price_vcpu_hour=args.price_vcpu_hour,
        price_gb_hour=args.price_gb_hour,
        glue_database=args.glue_database,
        engine=args.engine,
        refit=args.refit,
    )
    started = []

    def session():
        if not started:
            started.append(spark_session())
        return started[0]

    try:
        if "PYSPARK_GATEWAY_PORT" in os.environ:
            # Under spark-submit the SparkContext is made even for work the driver does alone: YARN's cluster
            # mode (EMR on EC2 steps) fails an application that never creates one.
            session()
        rpt = run(cfg, log=log.info, session=session)
    except AfterSwapError as exc:
        print(summary(exc.result), flush=True)
        log.error("run failed after publishing: %s", exc)
        return 1
    except CatalogError as exc:
        log.error("run failed: %s", exc)
        return 1
    except (WeightsError, PcaError, ImageError, FileNotFoundError, ValueError, CommitError) as exc:
        log.error("run failed, previous results left as they were: %s", exc)
        return 1
    finally:
        for spark in started:
            spark.stop()
    print(summary(rpt), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
