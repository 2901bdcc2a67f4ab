"""The examples' playground: the cloud and the platform each example plays around its user code.

An example is one script holding two parts. The *training script* is what a user writes (the
ckptstore calls); it stays in the example, inline. The *orchestrator* plays everything around
it: the cloud (a local S3 server), the machines (a new process on an empty staging directory
for each), the preemption (SIGKILL or SIGTERM at a line the training prints) and the verdict
(the last line, ``example OK: ...``, or ``example FAILED: ...`` and exit status 1). The
orchestrators' common parts are here.

Every example runs as is (``python examples/<name>.py``) against an S3 server on 127.0.0.1
(moto, as ``make demo`` uses), so no cloud account is needed. Pass
``--remote s3://your-bucket/some/prefix`` (and ``--storage-options '{...}'``, JSON) to run it
against a real bucket, or any other URL ckptstore takes.

An example starts its own script again for each training process (:func:`start_child`), with
its parameters as JSON in the environment variable ``CHILD_ENV``; the script's
``if __name__ == "__main__":`` block asks :func:`child_parameters` which of the two it is.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any, Callable, NoReturn

BUCKET = "examples"
CHILD_ENV = "CKPTSTORE_EXAMPLE_CHILD"  # a training process's parameters (JSON), kept out of argv


# --- the cloud ---------------------------------------------------------------------------------


def arguments(description: str) -> argparse.ArgumentParser:
    """The examples' common command line: ``--remote`` and ``--storage-options``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--remote", help="a URL to write under (default: a local S3 server)")
    parser.add_argument("--storage-options", default="{}", help="JSON: fsspec options for --remote")
    return parser


#: environment variables naming an AWS profile, which botocore loads even beside explicit keys
_PROFILE_VARIABLES = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE")


@contextlib.contextmanager
def local_s3(bucket: str = BUCKET, key: str = "example") -> Iterator[dict[str, Any]]:
    """A moto S3 server on 127.0.0.1 holding an empty ``bucket``: the fsspec options reaching it.

    Its endpoint is ``options["client_kwargs"]["endpoint_url"]``. The server stops on leaving.
    The user's ``AWS_PROFILE`` is set aside meanwhile (for the processes started here too):
    botocore loads the profile it names even beside explicit keys, and fails when this machine
    has no such profile, while the local server needs no account at all.
    """
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    set_aside = {v: os.environ.pop(v) for v in _PROFILE_VARIABLES if v in os.environ}
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request log lines
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {
            "key": key,
            "secret": key,
            "client_kwargs": {"endpoint_url": f"http://{host}:{port}"},
        }
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir(bucket)
        yield options
    finally:
        server.stop()
        os.environ.update(set_aside)


@contextlib.contextmanager
def remote_base(
    args: argparse.Namespace, name: str | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(base URL, storage_options)``: the user's remote, or a fresh prefix on a local S3.

    With ``--remote`` and a ``name``, the base is a fresh ``<remote>/<name>-<id>`` under it, so
    that runs of an example do not meet there (their checkpoints are left there).
    """
    if args.remote:
        base = args.remote.rstrip("/")
        if name is not None:
            base = f"{base}/{name}-{uuid.uuid4().hex[:6]}"
        yield base, json.loads(args.storage_options)
        return
    with local_s3() as options:
        yield f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}", options


def committed(url: str, options: dict) -> list[str]:
    """The checkpoints committed under ``url``, oldest first (ckptstore commits each by its
    manifest, ``<name>.manifest.json``; names end in their number). None yet: ``[]``."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **options)
    fs.invalidate_cache()
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    suffix = ".manifest.json"
    found = [p.rsplit("/", 1)[-1][: -len(suffix)] for p in names if p.endswith(suffix)]
    return sorted(found, key=lambda n: int(n.rsplit("-", 1)[-1]))


# --- the machines ------------------------------------------------------------------------------


def start_child(
    script: str,
    work: str,
    name: str,
    params: dict[str, Any],
    *,
    stdout: Any = subprocess.PIPE,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """Start ``script`` again as the training process ``name``, as on a new machine.

    Its staging base is ``<work>/machine-<name>``, fresh and empty at the first start, so it
    restores from the remote alone. ``params`` and ``name`` reach it as JSON in ``CHILD_ENV``
    (see :func:`child_parameters`). TensorFlow's C++ log and oneDNN are off unless the
    environment says otherwise; ``env`` is added to the environment (and overrides it). Its
    stdout is a text pipe, for :func:`relay`, unless ``stdout`` says otherwise.
    """
    child_env = dict(os.environ, **(env or {}))
    child_env["CKPTSTORE_STAGING_DIR"] = os.path.join(work, f"machine-{name.replace(' ', '-')}")
    child_env[CHILD_ENV] = json.dumps({**params, "name": name})
    child_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    child_env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    return subprocess.Popen([sys.executable, script], env=child_env, text=True, stdout=stdout)


def child_parameters() -> dict[str, Any] | None:
    """In a training process :func:`start_child` started: its parameters; else (the
    orchestrator) None."""
    if CHILD_ENV not in os.environ:
        return None
    return json.loads(os.environ[CHILD_ENV])


def relay(
    proc: subprocess.Popen,
    signal_when: Callable[[str], Any] | None = None,
    sig: signal.Signals = signal.SIGKILL,
) -> tuple[list[str], Any]:
    """Print a training process's lines as they come; send it ``sig`` when ``signal_when`` says.

    ``signal_when(line)`` is asked after each line until it returns something else than None
    (it may announce the signal: relay sends it right after). A SIGKILL ends the process there
    and then, as a preempted machine ends: no ``close()``, no exit handler, and what it had not
    printed yet is lost. After a SIGTERM the process goes on to exit in its own way: its lines
    are relayed to the end, and its exit status is the caller's to check. A process that was
    sent nothing must exit with 0 (``example FAILED`` otherwise).

    Returns its lines and what ``signal_when`` returned (None: it was sent nothing).
    """
    lines: list[str] = []
    verdict = None
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
        if signal_when is not None and verdict is None:
            verdict = signal_when(line)
            if verdict is not None:
                proc.send_signal(sig)
                if sig == signal.SIGKILL:
                    proc.wait()
                    return lines, verdict
    proc.wait()
    if verdict is None and proc.returncode != 0:
        fail(f"a training process exited with {proc.returncode}")
    return lines, verdict


class Beside:
    """A training process that runs beside the rest of the example: the uninterrupted reference.

    ``with Beside(start, log_path, what) as proc:`` starts it as ``start(stdout=log)``, its
    output going to the file ``log_path``. Leaving the block waits for it, and it must have
    exited with 0 (``example FAILED: <what> exited with ...`` otherwise); if the block fails,
    it is killed rather than left behind. After the block, ``last_line`` is its output's last
    line.
    """

    def __init__(self, start: Callable[..., subprocess.Popen], log_path: str, what: str):
        self.start, self.log_path, self.what = start, log_path, what
        self.last_line = ""

    def __enter__(self) -> subprocess.Popen:
        self.log = open(self.log_path, "w")  # closed in __exit__
        try:
            self.proc = self.start(stdout=self.log)
        except BaseException:
            self.log.close()
            raise
        return self.proc

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None and self.proc.wait() != 0:
                fail(f"{self.what} exited with {self.proc.returncode}")
        finally:
            if self.proc.poll() is None:  # this run failed: do not leave the reference behind
                self.proc.kill()
                self.proc.wait()
            self.log.close()
        if kind is None:
            with open(self.log_path) as f:
                self.last_line = f.read().splitlines()[-1]


# --- the verdict -------------------------------------------------------------------------------


def save_final_values(result: str, variables, **more) -> None:
    """Not user code: hand a run's final values to the orchestrator, in the ``.npz`` file
    ``result``, named by position and path; ``more`` are arrays to add."""
    import numpy as np

    arrays = {f"{i:02d}-{v.path.replace('/', '.')}": v.numpy() for i, v in enumerate(variables)}
    np.savez(result, **arrays, **more)


def compare(resumed: str, reference: str) -> list[str]:
    """What differs between two runs' final values (nothing, when the resume is exact)."""
    import numpy as np

    with np.load(resumed) as a, np.load(reference) as b:
        if sorted(a.files) != sorted(b.files):
            return [f"{sorted(a.files)} against {sorted(b.files)}"]
        return [
            f"{k}: max |difference| {np.max(np.abs(a[k] - b[k]))}"
            for k in sorted(a.files)
            if a[k].shape != b[k].shape or not np.array_equal(a[k], b[k])
        ]


def digest(variables) -> str:
    """Not user code: a fingerprint of the values (sha256, 16 hex digits): equal, equal bits."""
    h = hashlib.sha256()
    for v in variables:
        h.update(v.numpy().tobytes())
    return h.hexdigest()[:16]


def check(what: str, ok: bool, indent: str = "  ") -> None:
    """Print ``<indent><what>: YES`` or ``NO``; on NO, the example fails."""
    print(f"{indent}{what}: {'YES' if ok else 'NO'}", flush=True)
    if not ok:
        fail(what)


def fail(why: str) -> NoReturn:
    """End the example: ``example FAILED: <why>`` on stderr, exit status 1."""
    raise SystemExit(f"example FAILED: {why}")
