"""Every example in ``examples/`` runs as a user runs it, and shows what it claims.

Each example plays its own platform (a local S3 server, the kill, the new machine), checks
its result, prints ``example OK: ...`` last and exits non-zero when a check fails. These
tests run each one as a subprocess and look for the evidence that the interesting part
happened (a kill, a restore from the remote, each check passing).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from servers.faultproxy import FaultProxy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(
    name: str,
    tmp_path,
    timeout: float = 240,
    args: tuple[str, ...] = (),
    profile: bool = True,
    success: str = "example OK: ",
) -> tuple[list[str], str, str]:
    """Run ``examples/<name> [args]``; return its stdout lines, its stderr, and both for
    messages. ``profile``: ``AWS_PROFILE`` names a profile this machine lacks. ``success``: how
    the last line starts."""
    env = dict(os.environ)
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(var, None)  # nothing may point the example's local S3 elsewhere
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        env.pop(var, None)
    if profile:  # a user's shell may name a profile this machine lacks: the local S3 needs none
        env["AWS_PROFILE"] = "ckptstore-tests-no-such-profile"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["CKPTSTORE_STAGING_DIR"] = str(tmp_path / "staging")
    proc = subprocess.run(
        [sys.executable, os.path.join("examples", name), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, output
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith(success), output
    return lines, proc.stderr, output


def test_make_demo_kills_a_run_and_resumes_it_from_the_local_s3_alone(tmp_path):
    lines, _, output = run_example("demo.py", tmp_path, success="demo OK: ")
    assert any(line.startswith("*** SIGKILL") for line in lines), output
    restored = [line for line in lines if line.startswith("[run 2] restored ckpt-")]
    assert len(restored) == 1 and ": YES (" in restored[0], output
    assert lines[-2].startswith("committed on the remote at the end: "), output
    assert lines[-2].endswith("ckpt-12"), output


def test_custom_loop_example_resumes_after_a_kill_exactly(tmp_path):
    lines, _, output = run_example("custom_loop_resume.py", tmp_path)
    assert "bit for bit" in lines[-1], output
    # It really was killed, and the second process really restored from the remote.
    assert any(line.startswith("*** SIGKILL") for line in lines), output
    assert any(line.startswith("[run 2] restored ckpt-") for line in lines), output
    # ... the newest checkpoint committed when run 1 died (run 1 may commit one more after the
    # line the kill was decided on: the signal lands later).
    after_kill = [x for x in lines if x.startswith("committed on the remote after the kill: ")]
    newest = after_kill[0].rsplit(", ", 1)[-1].rsplit(" ", 1)[-1]
    assert any(line.startswith(f"[run 2] restored {newest} from ") for line in lines), output
    # manager.status() in the training log: one line, the run's URL and its last commit.
    status = [line for line in lines if line.startswith("[run 2] ckptstore s3://")]
    assert status and "last commit ckpt-" in status[-1], output


def test_keras_fit_example_resumes_mid_epoch_after_a_kill_exactly(tmp_path):
    lines, _, output = run_example("keras_fit_resume.py", tmp_path)
    assert "bit for bit" in lines[-1] and "backup was deleted" in lines[-1], output
    # It really was killed, and the second process really resumed mid-epoch from the remote.
    assert any(line.startswith("*** SIGKILL") for line in lines), output
    resumed = [line for line in lines if line.startswith("[run 2] fit() starts at epoch")]
    assert resumed and "batch 0 " not in resumed[0], output


def test_separate_managers_example_restores_each_checkpoint_from_its_last_save(tmp_path):
    lines, _, output = run_example("separate_managers.py", tmp_path)
    # Run 2 restored from the remote, and every check it made passed.
    assert any(line.startswith("[run 2] restored s3://") for line in lines), output
    checks = [line for line in lines if line.startswith("[run 2]   ")]
    assert len(checks) >= 5, output
    assert all(line.endswith(": YES") for line in checks), output


def test_separate_managers_example_commits_every_save_when_uploads_fall_behind(s3_server, tmp_path):
    # Saves come every few milliseconds; each upload waits 0.1 s per request here. With
    # "skip", uploads falling behind dropped saves the example's resume needs (ckpt-28 and
    # ckpt-32 once, in CI), and its end check failed.
    with FaultProxy("127.0.0.1", s3_server.port, latency_s=0.1) as proxy:
        options = s3_server.storage_options(proxy.endpoint_url)
        lines, _, output = run_example(
            "separate_managers.py",
            tmp_path,
            args=(
                "--remote",
                "s3://ckptstore-tests/examples",
                "--storage-options",
                json.dumps(options),
            ),
            profile=False,  # with --remote the user's AWS_PROFILE applies, as it should
        )
    checks = [line for line in lines if line.startswith("[run 2]   ")]
    assert len(checks) >= 5 and all(line.endswith(": YES") for line in checks), output
    held = [line.strip() for line in lines if line.startswith("  s3://")]
    assert held[-2].endswith("/model: ckpt-44, ckpt-48, ckpt-52, ckpt-56, ckpt-60"), output
    assert held[-1].endswith("/train_state: ckpt-50, ckpt-60"), output


def test_saved_model_exports_example_loads_the_newest_committed_version(tmp_path):
    lines, _, output = run_example("saved_model_exports.py", tmp_path, timeout=120)
    assert lines[-1] == (
        "example OK: 5 epochs exported as versions 1..5 (newest 3 kept), "
        "load() of the base served version 5"
    ), output
    committed = [line.rsplit("/", 1)[-1] for line in lines if line.startswith("committed ")]
    assert committed == ["1", "2", "3", "4", "5"], output
    assert any(
        line.startswith("retired: ") and "/exports/2 no longer loads" in line for line in lines
    ), output


def test_keras_best_checkpoints_example_keeps_the_best_model(tmp_path):
    lines, _, output = run_example("keras_best_checkpoints.py", tmp_path, timeout=120)
    assert lines[-1].startswith("example OK: best.keras is epoch "), output
    assert "kept by a restarted fit()" in lines[-1], output
    assert any(line.startswith("restarted fit(): val_loss ") for line in lines), output


def test_spot_vm_example_resumes_exactly_where_the_preemption_handler_saved(tmp_path):
    lines, stderr, output = run_example("spot_vm_training.py", tmp_path, timeout=120)
    assert "bit for bit" in lines[-1], output
    # The platform really sent SIGTERM, VM 1 exited with TensorFlow's status after ckptstore
    # committed the handler's checkpoint, and VM 2 started from that step.
    stdout = "\n".join(lines)
    assert any(line.startswith("*** SIGTERM") for line in lines), output
    assert "VM 1 exited with status 42" in stdout, output
    name = re.search(r"preempted; committing (ckpt-\d+)", stderr)
    assert name, output
    assert f"{name[1]} committed to" in stderr, output
    saved = re.search(r"\[vm 1\] exiting at step (\d+)", stdout)
    assert saved and f"[vm 2] starting at step {saved[1]} " in stdout, output


def test_two_workers_example_uploads_from_the_chief_only_and_both_restore_the_same_commit(
    tmp_path,
):
    lines, _, output = run_example("two_workers.py", tmp_path)
    # Both were killed, and both workers of run 2 restored the same checkpoint and weights.
    assert any(line.startswith("*** SIGKILL") for line in lines), output
    restored = {
        m.group(2)
        for m in (re.match(r"\[run 2 worker (\d)\] (restored .*)", line) for line in lines)
        if m
    }
    assert len(restored) == 1 and sum("] restored ckpt-" in x for x in lines) == 2, output
    checks = [line for line in lines if line.startswith("  ") and line.endswith((": YES", ": NO"))]
    assert len(checks) >= 7 and all(line.endswith(": YES") for line in checks), output
