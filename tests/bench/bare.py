"""The job's task body without Spark: one process per core, each running emr_job.featurize.featurize_partition
on a round-robin share of the files (as the job deals them), with the job's ONNX model, or with a network that
returns zeros (--no-network). It shows what the featurize stage could reach with no Spark at all, and how much
of the CPU the network takes beside the decoding.

    python tests/bench/bare.py PHOTOS WEIGHTS OUT [--no-network]   -> one JSON line: wall_s, img_s
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def task(share: int, shares: int, args, barrier, results) -> None:
    import numpy as np
    import pyarrow as pa

    from emr_job import featurize, model, network
    from emr_job.store import arrow_schema

    paths = sorted(str(p) for p in Path(args.photos).rglob("*") if p.is_file())[share::shares]
    rows = [{"path": p, "label": Path(p).parent.name, "version": "v"} for p in paths]
    batch = pa.RecordBatch.from_pylist(rows, schema=featurize.IN_ARROW)
    payload = SimpleNamespace(value=network.onnx_model(network.read_weights(args.weights)))
    featurize._task = lambda: (1, share)  # one core per task, as spark.task.cpus=1 gives
    if args.no_network:
        model.featurizer = lambda *a, **k: lambda images: np.zeros((len(images), model.FEATURE_DIM), np.float32)
    out = Path(args.out) / str(share)
    out.mkdir(parents=True, exist_ok=True)
    barrier.wait()  # every process ready: the clock covers the task bodies alone
    start = time.perf_counter()
    body = featurize.featurize_partition(iter([batch]), payload, "bench", "onnx", 32, 8, str(out), "bare",
                                         arrow_schema("features"))  # fmt: skip
    for _ in body:
        pass
    results.put((start, time.perf_counter(), len(rows)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos")
    parser.add_argument("weights")
    parser.add_argument("out")
    parser.add_argument("--no-network", action="store_true", help="a network that returns zeros")
    args = parser.parse_args(argv)
    shares = os.cpu_count()
    barrier, results = mp.Barrier(shares), mp.Queue()
    procs = [mp.Process(target=task, args=(i, shares, args, barrier, results)) for i in range(shares)]
    for p in procs:
        p.start()
    done: list = []
    while len(done) < shares:
        try:
            done.append(results.get(timeout=5))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                raise SystemExit("a task process failed (its traceback is above)") from None
    for p in procs:
        p.join()
    wall = max(end for _, end, _ in done) - min(start for start, _, _ in done)
    images = sum(n for _, _, n in done)
    print(json.dumps({"wall_s": round(wall, 2), "img_s": round(images / wall, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
