"""ckptstore against tf.train.CheckpointManager on a slow link, side by side in one run.

Run: ``make bench-link`` or ``.venv/bin/python benchmarks/slow_link.py [--quick]``
(``--help`` lists the knobs: checkpoint size, saves, training interval, link
bandwidth and latency). Results go to ``benchmarks/results/slow_link.{md,json,png}``.

The link: moto's S3 server in its own process, behind the test suite's proxy in
another process, capped at ``--bandwidth-mb`` MB/s each way with
``--latency-ms`` added per request. Its rate is measured (one large PUT and GET
through it) and reported with the results.

Each system runs in a fresh worker process, one after the other, on the same
checkpoint: five variables of varied sizes plus Adam's slots (``--size-mb``,
256 MiB by default). A "training interval" is a fixed amount of real TensorFlow
work (matmuls), calibrated to ``--interval`` seconds when nothing else runs; by
default one interval lasts as long as one checkpoint takes to cross the link.
Each worker trains an interval, saves, and repeats ``--saves`` times:

  tf local          tf.train.CheckpointManager to local disk: the floor for a blocking save
  tf + upload       the same, then the new files put to S3 with s3fs and the retired
                    ones deleted, before training goes on (what users do today)
  tf + upload elsewhere
                    the same local save, and each new checkpoint put to S3 with s3fs by
                    another process, started after the save and not waited for: the
                    control for the slowdown the link's servers (and any uploader) cause
                    on this machine's cores, which no client can remove
  tf async local    tf.train.CheckpointManager.save(options=CheckpointOptions(
                    enable_async=True)) to local disk: TensorFlow's own async write
  ckptstore         ckptstore.CheckpointManager("s3://...") with default settings
  ckptstore async   the same, saving with CheckpointOptions(enable_async=True)

and, for back-pressure, ckptstore with saves four times faster than the link
carries them, under ``when_behind="skip"`` and ``"block"``.

Per system: median blocking time of save(); the real foreground cost (blocking
time plus how much slower the training interval after a save ran); wall time
until the last checkpoint is durable on the remote; bytes sent; link utilisation
while uploads were pending; restore time from the remote onto an empty staging
directory (and the restored values are checked against the last step's);
peak RSS growth; staging disk. Every ratio is against a baseline from this run.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from link import (
    BUCKET,
    MB,
    MiB,
    add_link_arguments,
    add_run_arguments,
    open_link,
    run_worker,
    write_results,
)

SYSTEMS = (
    "tf local",
    "tf + upload",
    "tf + upload elsewhere",
    "tf async local",
    "ckptstore",
    "ckptstore async",
)
#: the row every other's next-interval slowdown is compared with (see the docstring)
CONTROL = "tf + upload elsewhere"
REMOTE_SYSTEMS = ("tf + upload", "ckptstore", "ckptstore async")


# --------------------------------------------------------------------------- a worker

#: the control's uploader: ``python -c PUT_ELSEWHERE <storage options> <prefix> <dir>``
#: puts every file of ``dir`` under ``prefix`` with s3fs, then removes ``dir``.
PUT_ELSEWHERE = """
import json, os, shutil, sys
import fsspec
options, prefix, directory = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
for name in sorted(os.listdir(directory)):
    fs.put_file(os.path.join(directory, name), prefix + "/" + name)
shutil.rmtree(directory)
"""


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak_rss() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    return rss_kb("VmRSS")


def dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # a file may go while we look
                total += os.path.getsize(os.path.join(root, name))
    return total


class Sampler(threading.Thread):
    """Every 50 ms: (time, bytes sent, uploads pending?, staging bytes)."""

    def __init__(self, probe, staging: str | None):
        super().__init__(daemon=True)
        self.probe, self.staging = probe, staging
        self.samples: list[tuple[float, int, bool, int]] = []
        self.stop = threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        while not self.stop.is_set():
            sent, pending = self.probe()
            staged = dir_bytes(self.staging) if self.staging else 0
            self.samples.append((time.perf_counter() - self.t0, sent, pending, staged))
            self.stop.wait(0.05)


def make_checkpoint(size_mb: int):
    """Five weights of varied sizes plus Adam-style slots (m, v) and a step, ``size_mb`` MiB.

    The slots live in a ``tf.Module``, not a Keras optimizer: with a Keras 3
    optimizer, TensorFlow 2.21's async checkpoint raises on the second save
    (``tf.function only supports singleton tf.Variables``, from Keras's
    ``_copy_trackable_to_cpu``), and the async rows are the point of comparing.
    Same bytes, same number of variables, same write path otherwise.
    """
    import numpy as np
    import tensorflow as tf

    total = size_mb * MiB // 4  # float32 elements: weights a third, m and v a third each
    rng = np.random.default_rng(0)
    weights = [
        tf.Variable(
            rng.standard_normal(max(1, int(total // 3 * f)), dtype=np.float32), name=f"w{i}"
        )
        for i, f in enumerate((0.5, 0.25, 0.15, 0.07, 0.03))
    ]
    slots = tf.Module()
    slots.m = [tf.Variable(tf.zeros_like(w)) for w in weights]
    slots.v = [tf.Variable(tf.zeros_like(w)) for w in weights]
    slots.iterations = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(weights=weights, optimizer=slots)
    return ckpt, [*weights, *slots.m, *slots.v]


def worker(cfg: dict) -> dict:
    import fsspec
    import tensorflow as tf
    from fsspec.callbacks import Callback

    import ckptstore
    from save_blocking import checkpoint_bytes, touch

    system, work = cfg["system"], cfg["work"]
    if cfg.get("intra_op_threads"):  # e.g. cores - 1: a core left to the uploads
        tf.config.threading.set_intra_op_parallelism_threads(cfg["intra_op_threads"])
    ckpt, variables = make_checkpoint(cfg["size_mb"])

    # A training interval: a fixed number of matmuls, calibrated with nothing else running.
    a = tf.random.normal((768, 768))

    @tf.function
    def train(n):
        x = a
        for _ in tf.range(n):
            x = tf.tanh(tf.matmul(x, a) * 1e-3)
        return tf.reduce_sum(x)

    train(tf.constant(5)).numpy()
    t0 = time.perf_counter()
    train(tf.constant(200)).numpy()
    per_iter = (time.perf_counter() - t0) / 200
    iters = tf.constant(max(1, int(cfg["interval"] / per_iter)))
    idle = []
    for _ in range(3):
        t0 = time.perf_counter()
        train(iters).numpy()
        idle.append(time.perf_counter() - t0)
    idle_step = statistics.median(idle)

    # Warm-up: the first save traces TensorFlow's save functions; no system pays that here.
    scratch = os.path.join(work, "warmup")
    tf.train.CheckpointManager(ckpt, scratch, max_to_keep=1).save()
    tf.train.CheckpointManager(ckpt, scratch + "-async", max_to_keep=1).save(
        options=tf.train.CheckpointOptions(enable_async=True)
    )
    ckpt.sync()
    shutil.rmtree(scratch), shutil.rmtree(scratch + "-async")

    prefix = f"{BUCKET}/{system.replace(' ', '-').replace('+', 'plus')}-{uuid.uuid4().hex[:6]}"
    url = f"s3://{prefix}"
    remote_fs = fsspec.filesystem("s3", skip_instance_cache=True, **cfg["slow"])
    local_dir = os.path.join(work, "local")
    staging = os.path.join(work, "staging")
    async_opts = tf.train.CheckpointOptions(enable_async=True)
    sent = [0]
    uploading = [False]

    class Counted(Callback):
        def relative_update(self, inc=1):
            sent[0] += inc
            super().relative_update(inc)

    def open_ckptstore(staging_dir: str) -> ckptstore.CheckpointManager:
        return ckptstore.CheckpointManager(
            ckpt,
            url,
            max_to_keep=cfg["max_to_keep"],
            staging_dir=staging_dir,
            storage_options=cfg["slow"],
            when_behind=cfg.get("when_behind", "skip"),
            upload_part_size=cfg.get("upload_part_size"),
        )

    if system.startswith("tf"):
        manager = tf.train.CheckpointManager(ckpt, local_dir, max_to_keep=cfg["max_to_keep"])

        def probe():
            return sent[0], uploading[0]

        sampler = Sampler(probe, None)
    else:
        manager = open_ckptstore(staging)

        def probe():
            s = manager.upload_status()
            return s.bytes_sent, bool(s.pending or s.in_flight)

        sampler = Sampler(probe, staging)

    uploaded: dict[str, list[str]] = {}  # tf + upload: checkpoint -> remote files

    def upload_synchronously(saved: str) -> None:
        uploading[0] = True
        base = os.path.basename(saved)
        files = [n for n in os.listdir(local_dir) if n.startswith(base + ".")]
        for name in [*files, "checkpoint"]:
            remote_fs.put_file(
                os.path.join(local_dir, name), f"{prefix}/{name}", callback=Counted()
            )
        uploaded[base] = files
        keep = {os.path.basename(p) for p in manager.checkpoints}
        for old in [c for c in uploaded if c not in keep]:
            remote_fs.rm([f"{prefix}/{n}" for n in uploaded.pop(old)])
        uploading[0] = False

    elsewhere: list[subprocess.Popen] = []  # the control's uploading processes

    def upload_elsewhere(saved: str) -> None:
        """Hard links of the new checkpoint's files (TF's retention may delete them while
        they go up), put by another process at the default priority, not waited for."""
        base = os.path.basename(saved)
        copy = os.path.join(work, "elsewhere", base)
        os.makedirs(copy)
        for name in os.listdir(local_dir):
            if name.startswith(base + "."):
                os.link(os.path.join(local_dir, name), os.path.join(copy, name))
                # counted when handed over: the other process's progress is not seen here,
                # and the run waits for all of it before it ends
                sent[0] += os.path.getsize(os.path.join(copy, name))
        elsewhere.append(
            subprocess.Popen(
                [sys.executable, "-c", PUT_ELSEWHERE, json.dumps(cfg["slow"]), prefix, copy]
            )
        )

    rss0 = reset_peak_rss()
    cpu0 = os.times()
    sampler.start()
    steps, blocking, saved_at = [], [], []
    start = time.perf_counter()
    for _ in range(cfg["saves"]):
        t0 = time.perf_counter()
        train(iters).numpy()
        steps.append(time.perf_counter() - t0)
        touch(variables)
        t0 = time.perf_counter()
        if system in ("tf async local", "ckptstore async"):
            saved = manager.save(options=async_opts)
        else:
            saved = manager.save()
        blocking.append(time.perf_counter() - t0)
        saved_at.append(t0 - start)
        if system == "tf + upload":
            upload_synchronously(saved)
        elif system == CONTROL:
            upload_elsewhere(saved)
    # One more interval: the slowdown after the last save counts too.
    t0 = time.perf_counter()
    train(iters).numpy()
    steps.append(time.perf_counter() - t0)
    train_done = time.perf_counter() - start
    cpu1 = os.times()
    if system == "tf async local":
        ckpt.sync()
    elif system.startswith("ckptstore"):
        manager.sync()
    for proc in elsewhere:
        if proc.wait() != 0:
            raise RuntimeError(f"the control's upload failed (exit {proc.returncode})")
    durable = time.perf_counter() - start
    cpu2 = os.times()
    sampler.stop.set()
    sampler.join()
    peak_growth = (rss_kb("VmHWM") - rss0) * 1024
    size = checkpoint_bytes(
        os.path.join(local_dir if system.startswith("tf") else staging, os.path.basename(saved))
    )
    expected = [float(tf.reduce_sum(tf.cast(v, tf.float64))) for v in variables]
    status = manager.upload_status() if system.startswith("ckptstore") else None
    if status is not None:
        manager.close()

    result = {
        "system": system,
        "size": size,
        "idle_step": idle_step,
        "steps": steps,
        "blocking": blocking,
        "saved_at": saved_at,
        "train_done": train_done,
        # CPU seconds this process used while training ran (TensorFlow plus any background work).
        "cpu_training": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
        "durable": durable,
        # CPU of the control's uploading processes (waited for above; 0 for the others)
        "elsewhere_cpu": (cpu2.children_user + cpu2.children_system)
        - (cpu0.children_user + cpu0.children_system),
        "peak_rss_growth": peak_growth,
        "samples": sampler.samples,
        "bytes_sent": sampler.samples[-1][1] if sampler.samples else 0,
        "skipped": list(status.skipped) if status else [],
        "committed": list(status.committed) if status else [],
        "staging_peak": max((s[3] for s in sampler.samples), default=0),
    }

    if system in REMOTE_SYSTEMS:
        for v in variables:  # so the restore has to put every value back
            v.assign(tf.zeros_like(v))
        fresh = os.path.join(work, "fresh")
        t0 = time.perf_counter()
        if system == "tf + upload":
            os.makedirs(fresh)
            last = os.path.basename(saved)
            for name in uploaded[last]:
                remote_fs.get_file(f"{prefix}/{name}", os.path.join(fresh, name))
            local = os.path.join(fresh, last)
        else:
            restorer = open_ckptstore(fresh)
            local = restorer.latest_checkpoint
        fetched = time.perf_counter() - t0
        ckpt.restore(local).assert_existing_objects_matched()
        result["restore_fetch"] = fetched
        result["restore_total"] = time.perf_counter() - t0
        result["restored_step_ok"] = expected == [
            float(tf.reduce_sum(tf.cast(v, tf.float64))) for v in variables
        ]
        if system != "tf + upload":
            restorer.close()
    if system in REMOTE_SYSTEMS or system == CONTROL:
        remote_fs.rm(prefix, recursive=True)  # moto keeps objects in memory
    return result


def cpu_seconds(procs: list[subprocess.Popen]) -> float:
    import psutil

    return sum(sum(psutil.Process(p.pid).cpu_times()[:4]) for p in procs)


def run_system(cfg: dict, servers: list[subprocess.Popen]) -> dict:
    """One system in a fresh process; also the CPU the link's servers used meanwhile."""
    before = cpu_seconds(servers)
    result = run_worker(__file__, cfg, "ckptstore-link-")
    return {**result, "server_cpu": cpu_seconds(servers) - before}


# --------------------------------------------------------------------------- figures


def utilisation(result: dict, link_up: float) -> float | None:
    """Bytes sent while uploads were pending / (time pending x the measured link rate)."""
    s = result["samples"]
    moved = spent = 0.0
    for (t0, b0, pending, _), (t1, b1, _, _) in itertools.pairwise(s):
        if pending:
            moved += b1 - b0
            spent += t1 - t0
    return moved / (spent * link_up) if spent > 0 else None


def foreground(result: dict) -> tuple[float, float]:
    """Median slowdown of the interval after a save (s), and blocking + slowdown (s)."""
    after = result["steps"][1:]
    slow = statistics.median(max(0.0, s - result["idle_step"]) for s in after)
    return slow, statistics.median(result["blocking"]) + slow


def interval_ratio(result: dict) -> float:
    """The median interval after a save over the idle interval (the slowdown as a ratio)."""
    slow, _ = foreground(result)
    return (result["idle_step"] + slow) / result["idle_step"]


def checksum_rates(size: int = 256 * MiB) -> dict[str, float]:
    import hashlib

    import crc32c

    from ckptstore.manifest import hash_file

    blob = os.urandom(size)
    rates = {}
    t0 = time.perf_counter()
    crc32c.crc32c(blob)
    rates["crc32c in memory"] = size / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    hashlib.md5(blob).digest()
    rates["md5 in memory (Drive only)"] = size / (time.perf_counter() - t0)
    with tempfile.NamedTemporaryFile() as f:
        f.write(blob)
        f.flush()
        t0 = time.perf_counter()
        hash_file(f.name, "x")
        rates["manifest hashing of a staged file"] = size / (time.perf_counter() - t0)
    rates["crc32c hardware"] = float(crc32c.hardware_based)
    return rates


def report(results: dict, pressure: dict, link: dict, rates: dict, cfg: dict) -> str:
    tf_local = results["tf local"]
    tf_up = results.get("tf + upload")
    size = tf_local["size"]
    k = cfg["saves"]
    base_block = statistics.median(tf_local["blocking"])
    base_peak = tf_local["peak_rss_growth"]
    lines = [
        f"Checkpoint {size / MB:.0f} MB, {k} saves, training interval {cfg['interval']:.2f} s "
        f"(idle), link capped at {cfg['bandwidth_mb']:.0f} MB/s + {cfg['latency_ms']:.0f} ms "
        f"per request; measured {link['up'] / MB:.1f} MB/s up, {link['down'] / MB:.1f} MB/s down.",
        "",
        "| system | save() median | / TF local | foreground cost | durable after | / (TF + upload) "
        "| sent | link use while pending | restore fetch | of link | peak RSS growth "
        "| above TF local / ckpt | restored last step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        block = statistics.median(r["blocking"])
        slow, cost = foreground(r)
        util = utilisation(r, link["up"]) if name in REMOTE_SYSTEMS else None
        remote = name in REMOTE_SYSTEMS or name.startswith("ckptstore") or name == CONTROL
        fetch = r.get("restore_fetch")
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    f"{block:.3f} s",
                    f"{block / base_block:.2f}",
                    f"{cost:.3f} s (+{slow:.3f} s on the next interval)",
                    f"{r['durable']:.1f} s" if remote else "local only",
                    f"{r['durable'] / tf_up['durable']:.2f}" if remote and tf_up else "",
                    f"{r['bytes_sent'] / MB:.0f} MB" if remote else "",
                    f"{util:.0%}" if util is not None else "",
                    f"{fetch:.1f} s" if fetch else "",
                    f"{size / fetch / link['down']:.0%}" if fetch else "",
                    f"{r['peak_rss_growth'] / MB:.0f} MB",
                    f"{(r['peak_rss_growth'] - base_peak) / size:+.1%}",
                    {True: "yes", False: "NO"}.get(r.get("restored_step_ok"), ""),
                ]
            )
            + " |"
        )
    base_cpu = tf_local["cpu_training"]
    lines += [
        "",
        "Where the slowdown of the next interval comes from: CPU used while training ran, per save "
        f"({os.cpu_count()} cores shared by training, the uploads, and the link's servers at nice "
        f"{cfg.get('server_nice', 0)}; TensorFlow intra-op threads: "
        f"{cfg.get('intra_op_threads') or 'all cores'}).",
        "",
        "| system | next interval slower by | next interval / idle | / the control's "
        "| this process's CPU above TF local | other uploading processes' CPU "
        "| S3 server + proxy CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    control = results.get(CONTROL)
    control_interval = interval_ratio(control) if control else None
    for name, r in results.items():
        slow, _ = foreground(r)
        ratio = interval_ratio(r)
        lines.append(
            f"| {name} | {slow:.2f} s | {ratio:.3f} | "
            + (f"{ratio / control_interval:.3f}" if control_interval else "")
            + f" | {(r['cpu_training'] - base_cpu) / k:+.2f} s "
            f"| {r.get('elsewhere_cpu', 0.0) / k:.2f} s | {r['server_cpu'] / k:.2f} s |"
        )
    if control:
        lines += [
            "",
            f"The control ({CONTROL}: TensorFlow's local save, and the same bytes put by "
            "another process while training goes on) measures what the link's servers and an "
            "uploader cost training on these 2 shared cores, whoever uploads: its next interval "
            f"is {control_interval:.3f}x an idle one. On a real link the store's CPU is on "
            "another machine; here it is not, so the interval / idle ratio of any system that "
            "uploads while training runs includes it, and '/ the control's' is the share a "
            "system adds beyond it.",
        ]
    bound = (k + 1) / (2 * k)
    lines += [
        "",
        f"Perfect overlap bound for the end-to-end ratio: (K+1)/(2K) = {bound:.2f} for K = {k}.",
        "",
        "Back-pressure: saves every "
        f"{cfg['interval'] / 4:.2f} s, four times faster than the link carries a checkpoint. "
        "Staging bound: max_to_keep + max_pending_uploads (2) + the one in flight, checkpoints.",
        "",
        "| policy | save() median | save() max | durable after | uploaded | skipped | sent "
        "| staging peak | staging bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for policy, r in pressure.items():
        bound_bytes = (cfg["max_to_keep"] + 2 + 1) * size
        n = len(r["blocking"])
        lines.append(
            f"| {policy} | {statistics.median(r['blocking']):.3f} s | {max(r['blocking']):.3f} s "
            f"| {r['durable']:.1f} s | {n - len(r['skipped'])} of {n} | {len(r['skipped'])} "
            f"| {r['bytes_sent'] / MB:.0f} MB "
            f"| {r['staging_peak'] / MB:.0f} MB | {bound_bytes / MB:.0f} MB |"
        )
    lines += [
        "",
        "Checksums (off the blocking path, in the upload thread): "
        + ", ".join(
            f"{k_} {v / 1e9:.2f} GB/s" for k_, v in rates.items() if k_ != "crc32c hardware"
        )
        + f"; hardware crc32c: {'yes' if rates['crc32c hardware'] else 'no'}.",
    ]
    return "\n".join(lines)


def plot(results: dict, pressure: dict, link: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.8))
    for name, r in results.items():
        ax1.plot(range(1, len(r["blocking"]) + 1), r["blocking"], marker="o", label=name)
    ax1.set_yscale("log")
    ax1.set_xlabel("save #")
    ax1.set_ylabel("save() blocking time (s)")
    ax1.set_title("Blocking time per save")
    ax1.legend(fontsize=8)

    for name in [n for n in REMOTE_SYSTEMS if n in results]:
        r = results[name]
        ax2.plot([s[0] for s in r["samples"]], [s[1] / MB for s in r["samples"]], label=name)
        for t in r["saved_at"]:
            ax2.axvline(t, color="grey", alpha=0.08)
    # The link's measured rate, from the first save until one run's bytes could be through.
    if "ckptstore" in results:
        first = results["ckptstore"]["saved_at"][0]
        total = results["ckptstore"]["bytes_sent"]
        ax2.plot(
            [first, first + total / link["up"]], [0, total / MB], "k--", lw=0.8, label="link rate"
        )
    ax2.set_xlabel("time (s)")
    ax2.set_ylabel("MB sent")
    ax2.set_title("Upload progress (grey: saves)")
    ax2.legend(fontsize=8)

    for policy, r in pressure.items():
        ax3.plot([s[0] for s in r["samples"]], [s[3] / MB for s in r["samples"]], label=policy)
    ax3.set_xlabel("time (s)")
    ax3.set_ylabel("staging disk (MB)")
    ax3.set_title("Back-pressure: staging when saves outpace the link")
    ax3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=110)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256, help="checkpoint size (MiB)")
    parser.add_argument("--saves", type=int, default=10, help="K: saves per system")
    parser.add_argument(
        "--interval",
        type=float,
        default=None,
        help="seconds of training between saves (default: one checkpoint's upload time)",
    )
    add_link_arguments(parser)
    parser.add_argument("--max-to-keep", type=int, default=3)
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="TensorFlow's intra-op threads in the workers (0: TensorFlow's default, all cores)",
    )
    parser.add_argument(
        "--upload-part-size-mib",
        type=int,
        default=None,
        help="ckptstore's upload_part_size, MiB (default: ckptstore's own choice per file)",
    )
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="comma-separated, of: " + ", ".join(SYSTEMS) + " (tf local is always run: "
        "the ratios are against it); the back-pressure runs only with all of them",
    )
    add_run_arguments(parser, "slow_link", "64 MiB, 4 saves: a smoke run")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.size_mb, args.saves = 64, 4
    chosen = {name.strip() for name in args.systems.split(",") if name.strip()}
    if chosen - set(SYSTEMS):
        parser.error(f"unknown systems: {', '.join(sorted(chosen - set(SYSTEMS)))}")
    systems = [name for name in SYSTEMS if name in chosen or name == "tf local"]

    with open_link(args) as (servers, _, slow, link):
        interval = args.interval or args.size_mb * MiB * 1.05 / link["up"]
        cfg = {
            "size_mb": args.size_mb,
            "saves": args.saves,
            "interval": interval,
            "bandwidth_mb": args.bandwidth_mb,
            "latency_ms": args.latency_ms,
            "max_to_keep": args.max_to_keep,
            "server_nice": args.server_nice,
            "intra_op_threads": args.intra_op_threads,
            "upload_part_size": args.upload_part_size_mib and args.upload_part_size_mib * MiB,
            "slow": slow,
        }
        results = {}
        for system in systems:
            print(f"running {system} ...", flush=True)
            results[system] = run_system({**cfg, "system": system}, servers)
        pressure = {}
        for policy in ("skip", "block") if len(systems) == len(SYSTEMS) else ():
            print(f"running back-pressure ({policy}) ...", flush=True)
            pressure[f'when_behind="{policy}"'] = run_system(
                {
                    **cfg,
                    "system": "ckptstore",
                    "interval": interval / 4,
                    "when_behind": policy,
                    # Enough saves to fill the queue, also in a --quick run.
                    "saves": max(cfg["saves"], 10),
                },
                servers,
            )
    rates = checksum_rates()
    text = report(results, pressure, link, rates, cfg)
    write_results(args.out, text, cfg, link, results=results, pressure=pressure, checksums=rates)
    plot(results, pressure, link, args.out)
    print("\n" + text)
    print(f"\nwritten: {args.out}.md, .json, .png")


if __name__ == "__main__":
    main()
