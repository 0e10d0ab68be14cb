"""`make bench`: the numbers docs/PERFORMANCE.md reports, measured in one run on this machine.

  job         model limits (MobileNetV2 as a tf.function, and as the job's ONNX model, on tensors in RAM; ONNX
              Runtime's the faster of one process on every core and one single-thread process per core);
              cold `python -m emr_job` on N synthetic 100x100 JPEGs (wall time, stages, peak RSS per process;
              ONNX Runtime's limit, the decode limit and the job in alternating rounds, best of each, here
              and on SCALE_N; the ceiling from the two limits, see ceiling()),
              and with --engine tensorflow; the peer (the usual Spark approach, tests/bench/peer.py) on the
              same images, and Spark's predict_batch_udf (capped at 8 GB and 20 min; --no-predict-batch-udf
              skips it); re-runs with nothing changed and with 1% new; the job and the peer on SCALE_N images
              (peak RSS should not grow with N)
  photos      PHOTOS camera-size photos (12 MP JPEGs with every EXIF orientation, some PNGs, two of 48 MP): in 3
              alternating rounds, best of each: the decode limit (the job's own decoding, one process per core),
              ONNX Runtime's limit (for the ceiling), the job's task body without Spark (tests/bench/bare.py;
              with the network, and with one returning zeros), and the project cold; the peer; then one line
              with every ratio against issue 17's targets and against the ceiling
  decode      decoding choices for camera photos (tests/bench/decode.py): time per image and the features' cosine
              to a full decode followed by the same resize
  model       a run's model.onnx (tests/bench/model_file.py): size, load time and throughput against the job's
              network, and how close a client's decoding gets to the stored rows (recipe, full decode with
              Pillow's bilinear, full decode with a plain bilinear), on small images and camera photos
  trickle     runs whose cost follows the change: at 20,000 stored images, a run adding 1% and one erasing an
              image against the full run (wall time, cold); at 1,000,000 synthetic rows, the bytes a run adding
              100 images reads against the store's (features, moments cache, pca)
  pca         emr_job.pca against pyspark.ml.feature.PCA on the same 20,000 x 1280 features, k=100
  trigger     the trigger on 10 and on 10,000 records after a million changes (moto): AWS calls, time
  daily       the daily pass's digest of 100,000 objects under images/ (a moto server in its own process, so the
              figures are the function's own): wall time, ListObjectsV2 calls, peak memory (tracemalloc), CPU,
              botocore's parse time per page, and the cost per day in USD
  reconcile   planning on STORED synthetic feature rows with 1% changed (wall, peak RSS), bytes rewritten
  listing     listing 20,000 local image files with the versions the job uses (size:mtime:ctime:inode) and
              with size:mtime alone, and what hashing their content instead would cost
  query       `python -m emr_job.query` on 100,000 stored images (k=50): wall time of the command, and its
              parts (reading the results, the model on the photos, the nearest-neighbour search)

Prints one JSON line (and writes it to OUT/bench.json). --only SECTION runs one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "lambdas")]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}

LIMIT_CODE = """
import json, os, sys, time
import numpy as np
engine, batch, seconds, weights = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
threads = int(sys.argv[5]) if len(sys.argv) > 5 else os.cpu_count()
x = np.random.default_rng(0).integers(0, 255, (batch, 224, 224, 3), dtype=np.uint8)
if engine == "tensorflow":  # MobileNetV2 as one tf.function, TensorFlow's own threads
    from emr_job.model import build_network, _tf
    tf = _tf()
    net = build_network()
    @tf.function(input_signature=[tf.TensorSpec([batch, 224, 224, 3], tf.uint8)])
    def run(images):
        return net(tf.cast(images, tf.float32) / 127.5 - 1.0, training=False)
    call = lambda: run(x).numpy()
else:  # the same network and weights as ONNX Runtime runs them in the job
    import onnxruntime as ort
    from emr_job import network
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(network.onnx_model(network.read_weights(weights)), options)
    call = lambda: session.run(None, {"images": x})
call()
n, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    call()
    n += batch
print(json.dumps({"limit_img_s": n / (time.perf_counter() - start)}))
"""


# --- processes and memory ------------------------------------------------------------------------------
def _children() -> dict:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                parents[int(entry)] = int(fields[1])
            except OSError:
                continue
    return parents


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _kind(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    if "java" in cmd.split(" ")[0]:
        return "jvm"
    if "pyspark.daemon" in cmd:
        return "python_worker"
    if "emr_job" in cmd:
        return "driver"
    return "other"


def run_measured(cmd: list, limit_mb: int = 0, timeout_s: float = 0) -> dict:
    """Run cmd; sample the RSS of its whole process tree every 0.2 s. Peak MB per kind of process. With limits,
    the tree is killed once its RSS passes limit_mb or it runs past timeout_s (RuntimeError saying which)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    peaks: dict = {}
    peak_total = [0]
    killed: list = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            parents, tree, frontier = _children(), set(), {proc.pid}
            while frontier:
                tree |= frontier
                frontier = {p for p, pp in parents.items() if pp in frontier} - tree
            total = 0
            for pid in tree:
                rss = _rss_kb(pid)
                total += rss
                kind = _kind(pid)
                peaks[kind] = max(peaks.get(kind, 0), rss)
            peak_total[0] = max(peak_total[0], total)
            over_time = timeout_s and time.perf_counter() - start > timeout_s
            if not killed and ((limit_mb and total > limit_mb * 1024) or over_time):
                killed.append(f"over {timeout_s:.0f} s" if over_time else f"over {limit_mb} MB of RSS")
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if killed:
        raise RuntimeError(f"killed after {wall:.0f} s: {killed[0]}")
    if proc.returncode != 0:
        first = re.search(r"^.*(?:OutOfMemoryError|Error:|Exception:).*$", err, re.M)  # the cause, not the unwinding
        raise RuntimeError(f"{' '.join(cmd)} failed: {first.group(0).strip() if first else ''}\n{err[-3000:]}")
    return {
        "wall_s": round(wall, 2),
        "peak_rss_mb": {k: round(v / 1024) for k, v in sorted(peaks.items()) if k != "other"},
        "peak_rss_total_mb": round(peak_total[0] / 1024),
        "stdout": out,
    }


# --- the job -------------------------------------------------------------------------------------------
def make_images(root: Path, n: int, seed: int = 0, prefix: str = "") -> int:
    import numpy as np

    from emr_job.sample import FRUITS, fruit_image

    rng = np.random.default_rng(seed)
    labels = list(FRUITS.items())
    for i in range(n):
        label, (colour, shape) = labels[i % len(labels)]
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        fruit_image(colour, shape, rng).save(folder / f"{prefix}{i:06d}.jpg", quality=90)
    return n


def json_line(*args: str) -> dict:
    """Run `python ARGS...` here; the JSON object its last stdout line prints (RuntimeError with its stderr)."""
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def model_limit(engine: str, batch: int, seconds: float, weights: Path) -> float:
    """Images per second of the network alone on tensors in RAM, every core busy. For ONNX Runtime the faster of
    one process with a thread per core and one single-thread process per core (the job's layout): the first
    swung between 161 and 215 img/s in two adjacent rounds on this VM, the second held 202-211."""
    layouts = [[os.cpu_count()]] + ([[1] * os.cpu_count()] if engine == "onnx" else [])
    return max(_limit_processes(engine, batch, seconds, weights, layout) for layout in layouts)


def _limit_processes(engine: str, batch: int, seconds: float, weights: Path, threads: list) -> float:
    """The summed rate of one LIMIT_CODE process per entry of threads (its intra-op threads), run together."""
    procs = [subprocess.Popen([sys.executable, "-c", LIMIT_CODE, engine, str(batch), str(seconds), str(weights),
                               str(n)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in threads]  # fmt: skip
    total = 0.0
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(err[-2000:])
        total += json.loads(out.strip().splitlines()[-1])["limit_img_s"]
    return total


def job(images: Path, output: Path, weights: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "emr_job", "--input", str(images), "--output", str(output), "--weights", str(weights)]
    measured = run_measured([*cmd, *extra])
    report = json.loads((output / "report.json").read_text())
    stages = dict(report["timings_s"])
    stages["startup"] = round(measured["wall_s"] - stages.pop("total"), 2)  # interpreter, JVM, exit
    return {**measured, "report": report, "stages_s": stages}


def peer(images: Path, output: Path, weights: Path, k: int, *extra: str, **limits) -> dict:
    """The usual Spark approach (tests/bench/peer.py), cold, on the same images and weights, with the same k."""
    cmd = [sys.executable, str(ROOT / "tests" / "bench" / "peer.py"), "--input", str(images), "--output", str(output),
           "--weights", str(weights), "--k", str(k), *extra]  # fmt: skip
    measured = run_measured(cmd, **limits)
    return {**json.loads(measured.pop("stdout").strip().splitlines()[-1]), **measured}


def save_weights(path: Path) -> None:
    code = (
        "import sys; from emr_job.model import build_network, _tf; tf = _tf(); tf.keras.utils.set_random_seed(1);"
        " build_network().save_weights(sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, env=ENV, check=True, capture_output=True)


# --- camera photos -------------------------------------------------------------------------------------
def _photo(args: tuple) -> str:
    """One photo-like image (smooth colour fields with fine grain), saved as the bench's camera photos are."""
    import numpy as np
    from PIL import Image, ImageChops

    root, i, n, seed = args
    rng = np.random.default_rng([seed, i])
    w, h = (8000, 6000) if i in (7, n // 2) else (4032, 3024)
    small = Image.fromarray((rng.random((h // 64 + 1, w // 64 + 1, 3)) * 255).astype(np.uint8))
    grain = Image.fromarray(np.repeat(rng.integers(122, 135, (h, w, 1), dtype=np.uint8), 3, axis=2))
    img = ImageChops.add(small.resize((w, h), Image.BICUBIC), grain, offset=-128)  # grain of -6..6 levels
    folder = Path(root) / f"camera{i % 4}"
    folder.mkdir(parents=True, exist_ok=True)
    if i % 20 == 19:
        img.save(folder / f"{i:05d}.png", compress_level=1)
        return "png"
    exif = Image.Exif()
    exif[0x0112] = 1 + i % 8  # Orientation
    img.save(folder / f"{i:05d}.jpg", quality=92, exif=exif)
    return "jpeg_48mp" if w == 8000 else "jpeg_12mp"


def make_photos(root: Path, n: int, seed: int = 0) -> dict:
    """n camera-size photos under root/<label>/: 12 MP (4032x3024) JPEGs with every EXIF orientation, one in 20 a
    12 MP PNG, and two 48 MP JPEGs; about 3 MB a JPEG. Made on every core."""
    from collections import Counter
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(os.cpu_count()) as pool:
        kinds = Counter(pool.map(_photo, [(str(root), i, n, seed) for i in range(n)], chunksize=8))
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return {**dict(sorted(kinds.items())), "mean_mb": round(size / n / 1e6, 2)}


DECODE_CODE = """
import json, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from emr_job.images import decode_image

def one(path):
    with open(path, "rb") as fh:
        data = fh.read()
    start = time.perf_counter()
    decode_image(data)
    return time.perf_counter() - start

paths = sorted(str(p) for p in Path(sys.argv[1]).rglob("*") if p.is_file())
rounds = []
with ProcessPoolExecutor(os.cpu_count()) as pool:
    list(pool.map(one, paths[: os.cpu_count()]))  # workers started and imports done before the clock
    for _ in range(int(sys.argv[2])):  # the best round: the limit, not this VM's neighbours
        start = time.perf_counter()
        busy = sum(pool.map(one, paths))
        rounds.append((time.perf_counter() - start, busy))
wall, busy = min(rounds)
print(json.dumps({"limit_img_s": len(paths) / wall, "ms_per_image_one_core": 1000 * busy / len(paths),
                  "rounds_img_s": [round(len(paths) / w, 1) for w, _ in rounds]}))
"""


def decode_limit(photos: Path, rounds: int = 3) -> dict:
    """The job's own decoding (emr_job.images.decode_image) on the files, one process per core, nothing else:
    the best of a few rounds."""
    return json_line("-c", DECODE_CODE, str(photos), str(rounds))


def ceiling(decode_img_s: float, network_img_s: float) -> float:
    """The most any job can reach on a CPU-only machine: each image costs its decoding and then the network, on
    the same cores, so their times add. Neither limit alone bounds the job: 0.9x the decode limit on photos needs
    a network 9x faster than the decoding."""
    return 1.0 / (1.0 / decode_img_s + 1.0 / network_img_s)


def bare(photos: Path, weights: Path, out: Path, *extra: str) -> dict:
    """The job's task body in one plain process per core, no Spark (tests/bench/bare.py)."""
    shutil.rmtree(out, ignore_errors=True)
    try:
        return json_line(str(ROOT / "tests" / "bench" / "bare.py"), str(photos), str(weights), str(out), *extra)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def photo_benchmark(work: Path, n: int, weights: Path, log, rounds: int = 3) -> dict:
    """Camera photos: the decode limit and the project cold, in alternating rounds on the same files, best of
    each (this VM's speed drifts by tens of percent within minutes: alternating gives both sides the same luck);
    then the usual approach."""
    photos = work / "photos"
    log(f"making {n} camera photos")
    made = make_photos(photos, n)
    limits, networks, runs, bare_runs, decode_only = [], [], [], [], []
    for i in range(rounds):
        limits.append(decode_limit(photos, rounds=1))
        networks.append(model_limit("onnx", 32, 10.0, weights))
        log(f"round {i + 1}: decode limit {limits[-1]['limit_img_s']:.1f} img/s, the network's"
            f" {networks[-1]:.1f}; the task body without Spark")  # fmt: skip
        bare_runs.append(bare(photos, weights, work / "bare"))
        decode_only.append(bare(photos, weights, work / "bare", "--no-network"))
        log(f"round {i + 1}: task body {bare_runs[-1]['img_s']} img/s, {decode_only[-1]['img_s']} with no network;"
            f" the project cold on {n} photos")  # fmt: skip
        shutil.rmtree(work / "out-photos", ignore_errors=True)
        runs.append(job(photos, work / "out-photos", weights))
    limit = max(limits, key=lambda x: x["limit_img_s"])
    bare_best, decode_only_best = max(r["img_s"] for r in bare_runs), max(r["img_s"] for r in decode_only)
    ran = min(runs, key=lambda x: x["wall_s"])
    featurize_s = min(r["stages_s"]["featurize"] for r in runs)
    top = ceiling(limit["limit_img_s"], max(networks))
    log("the peer on the photos")
    try:
        usual = peer(photos, work / "peer-photos", weights, ran["report"]["k"])
        over_peer = {"peer_wall_s": usual["wall_s"], "peer_img_s": round(n / usual["wall_s"], 1),
                     "project_over_peer": round(usual["wall_s"] / ran["wall_s"], 2)}  # fmt: skip
    except RuntimeError as exc:  # the usual approach may not cope with photos at all: that is the finding
        over_peer = {"peer_failed": str(exc).split("\n", 1)[0][-400:]}
    shutil.rmtree(work / "peer-photos", ignore_errors=True)
    shutil.rmtree(photos)
    return {
        "n": n,
        "photos": made,
        "decode_limit_img_s": round(limit["limit_img_s"], 1),
        "decode_ms_per_image_one_core": round(limit["ms_per_image_one_core"], 1),
        "decode_rounds_img_s": [round(x["limit_img_s"], 1) for x in limits],
        "job_wall_s": ran["wall_s"],
        "job_rounds_wall_s": [r["wall_s"] for r in runs],
        "job_rounds_featurize_s": [r["stages_s"]["featurize"] for r in runs],
        "job_img_s": round(n / ran["wall_s"], 1),
        "ratio_to_decode_limit": round(n / ran["wall_s"] / limit["limit_img_s"], 3),
        "featurize_img_s": round(n / featurize_s, 1),
        "featurize_ratio_to_decode_limit": round(n / featurize_s / limit["limit_img_s"], 3),
        "limit_onnx_img_s": round(max(networks), 1),
        "limit_onnx_rounds_img_s": [round(x, 1) for x in networks],
        "ceiling_img_s": round(top, 1),
        "ratio_to_ceiling": round(n / ran["wall_s"] / top, 3),
        "featurize_ratio_to_ceiling": round(n / featurize_s / top, 3),
        # The task body in plain processes: the most the featurize stage could reach without Spark's costs; and
        # with a network returning zeros, the decoding inside tasks (the network's share of the CPU is the gap).
        "task_body_rounds_img_s": [r["img_s"] for r in bare_runs],
        "task_body_ratio_to_decode_limit": round(bare_best / limit["limit_img_s"], 3),
        "task_body_no_network_rounds_img_s": [r["img_s"] for r in decode_only],
        "task_body_no_network_ratio_to_decode_limit": round(decode_only_best / limit["limit_img_s"], 3),
        "stages_s": ran["stages_s"],
        "peak_rss_mb": ran["peak_rss_mb"],
        "peak_rss_total_mb": ran["peak_rss_total_mb"],
        "resources": ran["report"].get("resources"),
        **over_peer,
    }


TARGETS = {  # issue 17: end to end, and the featurize stage, against the limit that binds
    "small_20k": (0.85, 0.92),
    "small_5k": (0.6, None),
    "photos": (0.75, 0.9),
}


def ratios(r: dict) -> str:
    """Every ratio against its target, on one line."""

    def mark(value, target):
        return f"{value}x" + ("" if target is None else f" ({'met' if value >= target else 'MISSED'}: {target}x)")

    def top(x):  # the ceiling, where the bench measured it
        if "ceiling_img_s" not in x:
            return ""
        return (f"; of the ceiling, decoding then the network ({x['ceiling_img_s']} img/s): end to end"
                f" {x['ratio_to_ceiling']}x, featurize {x['featurize_ratio_to_ceiling']}x")  # fmt: skip

    parts = []
    if "limit_onnx_img_s" in r:
        parts.append(f"small {r['n']}: end to end {mark(r['ratio_to_onnx_limit'], TARGETS['small_5k'][0])},"
                     f" featurize {r['featurize_ratio_to_onnx_limit']}x of ONNX Runtime's limit"
                     f" ({r['limit_onnx_img_s']} img/s){top(r)}")  # fmt: skip
    if "scale" in r and "featurize_ratio_to_onnx_limit" in r["scale"]:
        big, (e2e, feat) = r["scale"], TARGETS["small_20k"]
        parts.append(f"small {big['n']}: end to end {mark(big['ratio_to_onnx_limit'], e2e)},"
                     f" featurize {mark(big['featurize_ratio_to_onnx_limit'], feat)}"
                     f" of {big['limit_onnx_img_s']} img/s{top(big)};"
                     f" peak RSS {r['peak_rss_total_mb']} -> {big['peak_rss_total_mb']} MB")  # fmt: skip
    if "photos" in r:
        ph, (e2e, feat) = r["photos"], TARGETS["photos"]
        parts.append(f"photos {ph['n']}: end to end {mark(ph['ratio_to_decode_limit'], e2e)},"
                     f" featurize {mark(ph['featurize_ratio_to_decode_limit'], feat)} of the decode limit"
                     f" ({ph['decode_limit_img_s']} img/s){top(ph)}; the task body without Spark"
                     f" {ph['task_body_ratio_to_decode_limit']}x, with no network"
                     f" {ph['task_body_no_network_ratio_to_decode_limit']}x; project / peer"
                     f" {ph.get('project_over_peer', 'peer failed')}")  # fmt: skip
    return "ratios: " + " | ".join(parts)


# --- PCA -----------------------------------------------------------------------------------------------
def pca_benchmark(work: Path, rows: int = 20000, k: int = 100) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from emr_job.job import _map_files
    from emr_job.pca import file_moments, fit_from_moments
    from emr_job.session import spark_session

    # Features shaped like MobileNetV2's: non-negative, a decaying spectrum, 1280 wide.
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(200, 1280))
    scales = 1.0 / np.arange(1, 201) ** 0.8
    x = np.clip(rng.normal(size=(rows, 200)) * scales @ basis * 0.3 + 1.0, 0, 6).astype(np.float32)
    folder = work / "pca_features"
    folder.mkdir()
    files = []
    for part in range(2):  # as the job writes them: files of ROWS_PER_FILE rows
        chunk = x[part * rows // 2 : (part + 1) * rows // 2]
        offsets = pa.array(np.arange(0, (len(chunk) + 1) * 1280, 1280, dtype=np.int32))
        files.append(str(folder / f"part-{part}.parquet"))
        column = pa.ListArray.from_arrays(offsets, pa.array(chunk.reshape(-1)))
        pq.write_table(pa.table({"features": column}), files[-1])

    os.environ["SPARK_MASTER"] = "local[2]"
    spark = spark_session()
    from pyspark.ml.feature import PCA
    from pyspark.ml.functions import array_to_vector

    vectors = spark.read.parquet(str(folder)).select(array_to_vector("features").alias("v")).cache()
    vectors.count()  # Spark ML starts from vectors already in memory; ours reads the files each time

    def ours_fit():  # as the job runs it: one task per file
        return fit_from_moments(_map_files(spark, files, file_moments), None, k)

    def ml_fit():
        return PCA(k=k, inputCol="v", outputCol="p").fit(vectors)

    ours_fit(), ml_fit()  # both warm: Python workers started, JVM code compiled
    start = time.perf_counter()
    ml = ml_fit()
    ml_s = time.perf_counter() - start
    start = time.perf_counter()
    ours = ours_fit()
    ours_s = time.perf_counter() - start

    ml_ratio = np.array(ml.explainedVariance.toArray())
    ml_components = ml.pc.toArray().T  # (k, 1280)
    cosines = np.abs(np.sum(ml_components * ours.components, axis=1))
    spark.stop()
    return {
        "rows": rows,
        "k": k,
        "spark_ml_fit_s": round(ml_s, 2),
        "ours_fit_s": round(ours_s, 2),
        "speedup": round(ml_s / ours_s, 1),
        "explained_variance_max_rel_diff": float(np.max(np.abs(ours.explained_variance_ratio - ml_ratio) / ml_ratio)),
        "components_min_abs_cosine": float(cosines.min()),
    }


# --- trigger -------------------------------------------------------------------------------------------
def trigger_benchmark(records: int = 10000) -> dict:
    """AWS calls and handler time of one batch: 10 records on a fresh state, 10,000 after a million changes."""
    from types import SimpleNamespace

    from botocore.client import BaseClient
    from moto import mock_aws

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="eu-west-3")
    os.environ.pop("AWS_ENDPOINT_URL", None)
    from tests.lambdas.conftest import load, s3_record, sqs_event
    from tests.lambdas.stack import create_stack

    context = SimpleNamespace(
        function_name="bench", memory_limit_in_mb=512, aws_request_id="bench-1",
        invoked_function_arn="arn:aws:lambda:eu-west-3:123456789012:function:bench",
        get_remaining_time_in_millis=lambda: 60000,
    )  # fmt: skip
    real = BaseClient._make_api_call

    def invoke(n: int, prior_changes: int) -> tuple:
        with mock_aws():
            stack = create_stack()
            os.environ.update({**stack.env, "QUIET_SECONDS": "60"})  # uploads still arriving: mark and wait
            app = load("trigger.app")
            if prior_changes:
                stack.ddb.put_item(TableName="runs", Item={"id": {"S": "pipeline"}, "gen": {"N": str(prior_changes)},
                                                           "processed_gen": {"N": "0"}})  # fmt: skip
            bodies = [{"Records": [s3_record(f"images/L{i % 97}/{i:06d}.jpg") for i in range(j, min(j + 10, n))]}
                      for j in range(0, n, 10)]  # fmt: skip
            event = sqs_event(bodies)
            calls = []
            BaseClient._make_api_call = lambda self, name, params: (calls.append(name), real(self, name, params))[1]
            try:
                start = time.perf_counter()
                response = app.lambda_handler(event, context)
                elapsed = time.perf_counter() - start
            finally:
                BaseClient._make_api_call = real
            assert response == {"batchItemFailures": []}, response
            return elapsed, calls

    small_s, small_calls = invoke(10, 0)
    big_s, big_calls = invoke(records, 1_000_000)
    return {
        "records": records,
        "handler_s": round(big_s, 3),
        "handler_s_for_10_records": round(small_s, 3),
        "aws_calls": big_calls,
        "aws_calls_for_10_records": small_calls,
    }


# --- daily pass ----------------------------------------------------------------------------------------
# The moto server lives in its own process: the function's memory and CPU are measured apart from the fake S3's.
# It fills its backend directly (100,000 PUT requests would take minutes), then serves until stdin closes.
DAILY_SERVER = """
import sys
import boto3
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from moto.server import ThreadedMotoServer
port, bucket, n, labels = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
server.start()
boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(
    Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
for i in range(n):
    backend.put_object(bucket, f"images/label{i % labels:03d}/{i:07d}.jpg", b"x" * (1 + i % 997))
print("ready", flush=True)
sys.stdin.read()
server.stop()
"""
S3_LIST_USD_PER_1000 = 0.005  # S3 Standard LIST requests, https://aws.amazon.com/s3/pricing/
S3_GET_USD_PER_1000 = 0.0004  # S3 Standard GET requests (report.json), same page
LAMBDA_USD_PER_GB_S = 0.0000133334  # arm64 duration, https://aws.amazon.com/lambda/pricing/
LAMBDA_USD_PER_REQUEST = 0.20 / 1_000_000  # same page
LAMBDA_GB = 0.5  # template.yaml: MemorySize 512
LAMBDA_VCPU = 512 / 1769  # a function gets one vCPU at 1,769 MB, in proportion below (Lambda's memory settings docs)


def daily_benchmark(objects: int = 100_000, labels: int = 100) -> dict:
    """The daily pass's listing and digest of images/ as the job-state function runs it (its S3 client, threads,
    digest), against a moto server holding `objects` image keys in `labels` folders."""
    import tracemalloc

    import requests
    from botocore import parsers
    from pipeline import inputs
    from pipeline.inputs import current_inputs, s3_client
    from pipeline.wiring import CLIENT_CONFIG

    from tests.conftest import free_port

    port, bucket = free_port(), "photos-eu"
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="eu-west-3")
    server = subprocess.Popen([sys.executable, "-c", DAILY_SERVER, str(port), bucket, str(objects), str(labels)],
                              cwd=ROOT, env={**ENV, **os.environ}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert server.stdout.readline().strip() == "ready"
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        inputs.LIST_BUDGET_S = 3600  # moto serves one request at a time: slower than S3 and the function's budget
        s3 = s3_client(CLIENT_CONFIG)
        lists = []
        s3.meta.events.register("before-call.s3.ListObjectsV2", lambda **kwargs: lists.append(1))
        tracemalloc.start()
        start = time.perf_counter()
        digest = current_inputs(s3, bucket, "images/")
        wall, calls = time.perf_counter() - start, len(lists)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert digest["images"] == objects, digest
        # CPU without tracemalloc (which triples it), on the first tenth of the folders: it grows with the objects
        cpu = time.process_time()
        tenth = current_inputs(s3, bucket, "images/label00")
        cpu = (time.process_time() - cpu) * objects / tenth["images"]

        # botocore's parse of one 1,000-key page: its default date parsing, and LastModified left as text
        body = requests.get(f"{endpoint}/{bucket}?list-type=2&prefix=images/label000/", timeout=60).content
        shape = s3.meta.service_model.operation_model("ListObjectsV2").output_shape
        parse_ms = {}
        for name, options in (("default", {}), ("text_timestamps", {"timestamp_parser": str})):
            parser = parsers.RestXMLParser(**options)
            begin = time.perf_counter()
            for _ in range(5):
                parser.parse({"body": body, "headers": {}, "status_code": 200}, shape)
            parse_ms[name] = round((time.perf_counter() - begin) / 5 * 1000, 1)
    finally:
        server.stdin.close()
        server.wait(timeout=60)
        os.environ.pop("AWS_ENDPOINT_URL", None)

    # CPU-bound on Lambda: S3 answers the ten listing threads at once (moto here serves them one at a time, so the
    # wall time above is moto's), and the function runs at its share of a vCPU (of this machine's speed).
    lambda_s = cpu / LAMBDA_VCPU
    s3_usd = calls / 1000 * S3_LIST_USD_PER_1000 + S3_GET_USD_PER_1000 / 1000
    lambda_usd = lambda_s * LAMBDA_GB * LAMBDA_USD_PER_GB_S + LAMBDA_USD_PER_REQUEST
    return {
        "objects": objects,
        "label_folders": labels,
        "digest_wall_s": round(wall, 2),
        "digest_cpu_s": round(cpu, 2),  # from a tenth, without tracemalloc
        "list_objects_v2_calls": calls,
        "peak_traced_mb": round(peak / 2**20, 1),
        "parse_ms_per_1000_key_page": parse_ms,
        "lambda_s_estimate": round(lambda_s, 1),
        "usd_per_day": {
            "s3_requests": round(s3_usd, 6),
            "lambda": round(lambda_usd, 6),
            "total": round(s3_usd + lambda_usd, 6),
        },
    }


# --- reconciliation at scale ---------------------------------------------------------------------------
def scale_benchmark(work: Path, n: int) -> dict:
    """Planning on n stored images with 1% changed (fresh process: its own peak RSS), and bytes rewritten."""
    store = work / "scale-store"
    script = str(ROOT / "tests" / "bench" / "scale.py")

    def step(name: str) -> dict:
        return json_line(script, name, str(store), str(n))

    built = step("build")
    planned = step("plan")
    rewritten = step("rewrite")
    shutil.rmtree(store)
    return {"build": built, "plan": planned, "rewrite": rewritten}


def listing_benchmark(work: Path, files: int = 20_000, rounds: int = 3) -> dict:
    """What local versions cost: the job's listing with size:mtime:ctime:inode against size:mtime, warm, best
    of a few rounds; and reading plus hashing every file instead (what a content version would cost)."""
    import hashlib

    from emr_job import storage

    root = work / "listing"
    make_images(root, files, seed=6)
    job_version = storage.local_version
    formats = {"size:mtime": lambda st: f"{st.st_size}:{st.st_mtime_ns}", "size:mtime:ctime:inode": job_version}
    result = {"files": files}
    try:
        for name, version in formats.items():
            storage.local_version = version
            best, table = None, None
            for _ in range(rounds):
                start = time.perf_counter()
                table, _ = storage.list_images(str(root))
                best = min(best or 1e9, time.perf_counter() - start)
            result[name] = {"list_s": round(best, 3), "version_bytes": table.column("version").nbytes}
    finally:
        storage.local_version = job_version
    start = time.perf_counter()
    size = 0
    for path in table.column("path").to_pylist():
        with open(path, "rb") as fh:
            data = fh.read()
        size += len(data)
        hashlib.blake2b(data, digest_size=16).digest()
    result["hash_every_file"] = {"s": round(time.perf_counter() - start, 3), "bytes": size}
    shutil.rmtree(root)
    return result


def query_benchmark(work: Path, stored: int = 100_000) -> dict:
    """The similarity query as a user runs it, cold (a new process), on one photo and on ten, with a weights
    file (random weights would need TensorFlow to make them: not what a user queries with)."""
    store = work / "query-store"
    script = str(ROOT / "tests" / "bench" / "scale.py")
    weights = work / "weights.weights.h5"
    if not weights.exists():
        save_weights(weights)
    subprocess.run([sys.executable, script, "query-store", str(store), str(stored), str(weights)], cwd=ROOT,
                   env=ENV, check=True, capture_output=True)  # fmt: skip
    photos = work / "query-photos"
    make_images(photos, 10, seed=5)
    paths = sorted(str(p) for p in photos.rglob("*.jpg"))
    result = {"stored": stored}
    for count in (1, 10):
        cmd = [sys.executable, "-m", "emr_job.query", "--results", str(store), "--json", *paths[:count]]
        start = time.perf_counter()
        out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        parts = json.loads(out.stdout)[0]["timings_s"]
        result[f"{count}_photos"] = {"wall_s": round(wall, 2), **{k: round(v, 3) for k, v in parts.items()}}
    shutil.rmtree(store)
    return result


def trickle_benchmark(work: Path, weights: Path, log, stored: int = 1_000_000) -> dict:
    """Runs that cost what changed, one sitting: at 20,000 stored images, the full run, then a run adding 1% (200
    images) and a run erasing one image, each cold (`python -m emr_job`, wall time); then, at `stored` synthetic
    rows, the bytes a run adding 100 images reads (tests/bench/scale.py trickle)."""
    images, out = work / "trickle-in", work / "trickle-out"
    make_images(images, 20000)
    full = job(images, out, weights)
    log(f"trickle: full run of 20,000 images {full['wall_s']} s")
    make_images(images, 200, seed=7, prefix="new")
    added = job(images, out, weights)
    victim = sorted(images.rglob("*.jpg"))[0]
    victim.unlink()
    erased = job(images, out, weights)
    log(f"trickle: 1% added {added['wall_s']} s, one erased {erased['wall_s']} s")

    def summary(r: dict) -> dict:
        rpt = r["report"]
        return {"wall_s": r["wall_s"], "stages_s": r["stages_s"], "basis": rpt.get("basis"),
                "moments": rpt.get("moments"),
                "spark": "without Spark" not in (rpt.get("resources") or {}).get("basis", "")}  # fmt: skip

    result = {"machine": machine(), "full": summary(full), "add_1pct": summary(added), "erase_1": summary(erased),
              "add_ratio": round(added["wall_s"] / full["wall_s"], 3),
              "erase_ratio": round(erased["wall_s"] / full["wall_s"], 3)}  # fmt: skip
    shutil.rmtree(out)
    new = work / "trickle-new"
    make_images(new, 100, seed=9, prefix="trickle")
    script = str(ROOT / "tests" / "bench" / "scale.py")
    result["million"] = json_line(script, "trickle", str(work / "trickle-store"), str(stored), str(weights), str(new))
    shutil.rmtree(work / "trickle-store")
    return result


def machine() -> str:
    """CPU model and whether it has AVX-512: figures compare only within one machine."""
    model, flags = "unknown", ""
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    return f"{os.cpu_count()} vCPU {model}, {'AVX-512' if 'avx512f' in flags else 'no AVX-512'}"


ROUNDS_5K, ROUNDS_20K = 3, 2


def limit_and_job(images: Path, output: Path, weights: Path, batch: int, rounds: int, log) -> tuple:
    """ONNX Runtime's limit, the decode limit and the project cold, in alternating rounds, best of each (this VM's
    speed drifts by tens of percent within minutes: alternating gives both sides the same luck). The best run
    carries the rounds, and its ratios to the ceiling."""
    limits, decodes, runs = [], [], []
    for i in range(rounds):
        limits.append(model_limit("onnx", batch, 15.0, weights))
        decodes.append(decode_limit(images, rounds=1)["limit_img_s"])
        shutil.rmtree(output, ignore_errors=True)
        runs.append(job(images, output, weights))
        log(f"round {i + 1}: ONNX Runtime's limit {limits[-1]:.1f} img/s, decoding's {decodes[-1]:.1f}, the project"
            f" {runs[-1]['wall_s']} s")  # fmt: skip
    best = min(runs, key=lambda r: r["wall_s"])
    rounds_seen = {"limit_onnx_rounds_img_s": [round(x, 1) for x in limits],
                   "decode_limit_rounds_img_s": [round(x, 1) for x in decodes],
                   "job_rounds_wall_s": [r["wall_s"] for r in runs],
                   "featurize_rounds_s": [r["stages_s"]["featurize"] for r in runs]}  # fmt: skip
    top = ceiling(max(decodes), max(limits))
    n = best["report"]["images_total"]  # a cold run sees every image
    ceilings = {"decode_limit_img_s": round(max(decodes), 1), "ceiling_img_s": round(top, 1),
                "ratio_to_ceiling": round(n / best["wall_s"] / top, 3),
                "featurize_ratio_to_ceiling": round(n / min(rounds_seen["featurize_rounds_s"]) / top, 3)}  # fmt: skip
    return max(limits), {**best, "rounds": rounds_seen, "featurize_best_s": min(rounds_seen["featurize_rounds_s"]),
                         "ceiling": ceilings}  # fmt: skip


def job_benchmark(work: Path, args, log) -> dict:
    weights = work / "weights.weights.h5"
    save_weights(weights)
    log(f"making {args.n} images")
    images = work / "images"
    make_images(images, args.n)

    log("model limit: TensorFlow")
    limit = model_limit("tensorflow", args.batch_size, 20.0, weights)
    log(f"TensorFlow's limit {limit:.1f} img/s; ONNX Runtime's limit and the project cold on {args.n} images")
    limit_onnx, full = limit_and_job(images, work / "out", weights, args.batch_size, ROUNDS_5K, log)
    job_img_s = args.n / full["wall_s"]
    featurize_img_s = args.n / full["featurize_best_s"]
    log("the project with --engine tensorflow (the reference path)")
    tf_run = job(images, work / "out-tf", weights, "--engine", "tensorflow")
    log("the peer: binaryFile -> pandas_udf(model.predict) -> pyspark.ml PCA")
    usual = peer(images, work / "peer", weights, full["report"]["k"])
    shutil.rmtree(work / "peer", ignore_errors=True)

    log("re-run with nothing changed")
    cmd = [sys.executable, "-m", "emr_job", "--input", str(images), "--output", str(work / "out"), "--weights"]
    unchanged = run_measured([*cmd, str(weights)])
    log("incremental re-run with 1% new images")
    make_images(images, max(1, args.n // 100), seed=1, prefix="new-")
    rerun = job(images, work / "out", weights)

    result = {
        "n": args.n,
        "limit_img_s": round(limit, 1),
        "limit_onnx_img_s": round(limit_onnx, 1),
        "job_img_s": round(job_img_s, 1),
        "ratio": round(job_img_s / limit, 3),
        "ratio_to_onnx_limit": round(job_img_s / limit_onnx, 3),
        "featurize_img_s": round(featurize_img_s, 1),
        "featurize_ratio": round(featurize_img_s / limit, 3),
        "featurize_ratio_to_onnx_limit": round(featurize_img_s / limit_onnx, 3),
        "job_wall_s": full["wall_s"],
        **full["ceiling"],
        "stages_s": full["stages_s"],
        "rounds": full["rounds"],
        "peak_rss_mb": full["peak_rss_mb"],
        "peak_rss_total_mb": full["peak_rss_total_mb"],
        "job_tensorflow_wall_s": tf_run["wall_s"],
        "job_tensorflow_img_s": round(args.n / tf_run["wall_s"], 1),
        "job_tensorflow_stages_s": tf_run["stages_s"],
        "peer_wall_s": usual["wall_s"],
        "peer_img_s": round(args.n / usual["wall_s"], 1),
        "peer_ratio": round(args.n / usual["wall_s"] / limit, 3),
        "peer_peak_rss_total_mb": usual["peak_rss_total_mb"],
        "project_over_peer": round(usual["wall_s"] / full["wall_s"], 2),
        "unchanged_wall_s": unchanged["wall_s"],
        "rerun_1pct_wall_s": rerun["wall_s"],
        "rerun_featurized": rerun["report"]["images_featurized"],
        "rerun_fraction_of_full": round(rerun["wall_s"] / full["wall_s"], 3),
        "rerun_stages_s": rerun["stages_s"],
    }
    if args.predict_batch_udf:
        log("Spark's predict_batch_udf, decoding in a UDF (8 GB cap, 20 min at most)")
        try:
            pbu = peer(images, work / "peer-pbu", weights, full["report"]["k"], "--predict-batch-udf",
                       limit_mb=8192, timeout_s=1200)  # fmt: skip
            result["predict_batch_udf"] = {"wall_s": pbu["wall_s"], "img_s": round(args.n / pbu["wall_s"], 1),
                                           "peak_rss_total_mb": pbu["peak_rss_total_mb"]}  # fmt: skip
        except RuntimeError as exc:
            result["predict_batch_udf"] = {"failed": str(exc)[-300:]}
    if args.scale_n:
        big = work / "images-big"
        make_images(big, args.scale_n, seed=2)
        log(f"ONNX Runtime's limit and the project cold on {args.scale_n} images (memory scaling)")
        limit_big, scaled = limit_and_job(big, work / "out-big", weights, args.batch_size, ROUNDS_20K, log)
        log(f"the peer on {args.scale_n} images")
        usual_big = peer(big, work / "peer-big", weights, scaled["report"]["k"])
        shutil.rmtree(big)
        shutil.rmtree(work / "peer-big", ignore_errors=True)
        result["scale"] = {
            "n": args.scale_n,
            "job_wall_s": scaled["wall_s"],
            "job_img_s": round(args.scale_n / scaled["wall_s"], 1),
            "ratio": round(args.scale_n / scaled["wall_s"] / limit, 3),
            "limit_onnx_img_s": round(limit_big, 1),
            "ratio_to_onnx_limit": round(args.scale_n / scaled["wall_s"] / limit_big, 3),
            "featurize_ratio_to_onnx_limit": round(args.scale_n / scaled["featurize_best_s"] / limit_big, 3),
            **scaled["ceiling"],
            "rounds": scaled["rounds"],
            "stages_s": scaled["stages_s"],
            "peak_rss_mb": scaled["peak_rss_mb"],
            "peak_rss_total_mb": scaled["peak_rss_total_mb"],
            "peer_wall_s": usual_big["wall_s"],
            "peer_img_s": round(args.scale_n / usual_big["wall_s"], 1),
            "peer_peak_rss_total_mb": usual_big["peak_rss_total_mb"],
            "project_over_peer": round(usual_big["wall_s"] / scaled["wall_s"], 2),
        }
    log(side_by_side(result))
    return result


def side_by_side(r: dict) -> str:
    """The one line issue 12 asks for."""
    line = (
        f"{r['n']} images: model limit {r['limit_img_s']} img/s (TensorFlow), {r['limit_onnx_img_s']} (ONNX Runtime);"
        f" project {r['job_img_s']} img/s end to end = {r['ratio']}x the TensorFlow limit, {r['ratio_to_onnx_limit']}x"
        f" the ONNX one (featurize stage {r['featurize_ratio']}x / {r['featurize_ratio_to_onnx_limit']}x);"
        f" peer {r['peer_img_s']} img/s = {r['peer_ratio']}x; project / peer = {r['project_over_peer']}x;"
        f" no-change run {r['unchanged_wall_s']} s; 1% change {r['rerun_fraction_of_full']} of a full run"
    )
    if "scale" in r:
        big = r["scale"]
        line += (
            f" | {big['n']} images: project {big['job_img_s']} img/s = {big['ratio']}x / {big['ratio_to_onnx_limit']}x;"
            f" peer {big['peer_img_s']} img/s; project / peer = {big['project_over_peer']}x"
        )
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--scale-n", type=int, default=20000, help="0 skips the memory-scaling run")
    parser.add_argument("--out", default=str(ROOT / "bench-out"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--stored", type=int, default=1_000_000, help="stored images for the planning section")
    parser.add_argument("--photos", type=int, default=1000, help="camera photos for the photos section")
    sections = [
        "job",
        "photos",
        "decode",
        "model",
        "trickle",
        "pca",
        "trigger",
        "daily",
        "reconcile",
        "listing",
        "query",
    ]
    parser.add_argument("--only", choices=sections, help="run one section")
    parser.add_argument("--no-predict-batch-udf", dest="predict_batch_udf", action="store_false",
                        help="skip Spark's predict_batch_udf (the slowest part)")  # fmt: skip
    args = parser.parse_args(argv)
    work = Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    result: dict = {"machine": machine()}
    if args.only in (None, "job"):
        result.update(job_benchmark(work, args, log))
    if args.only in (None, "photos"):
        weights = work / "weights.weights.h5"
        if not weights.exists():
            save_weights(weights)
        result["photos"] = photo_benchmark(work, args.photos, weights, log)
    if args.only in (None, "job", "photos"):
        log(ratios(result))
    if args.only in (None, "decode"):
        log("decode: the choices for camera photos, time and features against a full decode")
        weights = work / "weights.weights.h5"
        if not weights.exists():
            save_weights(weights)
        result["decode"] = json_line(str(ROOT / "tests" / "bench" / "decode.py"), str(weights))
    if args.only in (None, "model"):
        log("model: a run's model.onnx, its cost and how close clients get")
        weights = work / "weights.weights.h5"
        if not weights.exists():
            save_weights(weights)
        result["model"] = json_line(str(ROOT / "tests" / "bench" / "model_file.py"), str(weights), str(work))
    if args.only in (None, "trickle"):
        log("trickle: runs that add 1% and erase one at 20,000 images; bytes read adding 100 at a million")
        weights = work / "weights.weights.h5"
        if not weights.exists():
            save_weights(weights)
        result["trickle"] = trickle_benchmark(work, weights, log)
    if args.only in (None, "pca"):
        log("pca: ours against pyspark.ml")
        result["pca"] = pca_benchmark(work)
    if args.only in (None, "trigger"):
        log("trigger: one batch of 10 records, and of 10,000 after a million changes")
        result["trigger"] = trigger_benchmark()
    if args.only in (None, "daily"):
        log("daily: the digest of 100,000 objects under images/")
        result["daily"] = daily_benchmark()
        d = result["daily"]
        log(f"daily: {d['digest_wall_s']} s wall in moto, {d['digest_cpu_s']} s CPU (about {d['lambda_s_estimate']} s"
            f" at 512 MB), {d['list_objects_v2_calls']} LIST calls, {d['peak_traced_mb']} MB peak; about"
            f" ${d['usd_per_day']['total']:.5f} a day (S3 ${d['usd_per_day']['s3_requests']:.5f},"
            f" Lambda ${d['usd_per_day']['lambda']:.5f})")  # fmt: skip
    if args.only in (None, "reconcile"):
        log(f"reconciliation at scale: {args.stored} stored images, 1% changed")
        result["reconcile"] = scale_benchmark(work, args.stored)
    if args.only in (None, "listing"):
        log("listing: 20,000 local files, the versions the job uses")
        result["listing"] = listing_benchmark(work)
    if args.only in (None, "query"):
        log("query: one and ten photos against 100,000 stored images")
        result["query"] = query_benchmark(work)
    line = json.dumps(result)
    (work / "bench.json").write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
