"""Google Drive through pydrive2: URLs, options, and each of Drive's quirks.

pydrive2's real client talks HTTP to the fake Drive v2 server in
``servers/fake_drive.py``. The backend-independent scenarios (round trip,
retention, corruption, kill points, restore on an empty machine) run on
``gdrive://`` in test_remote_conformance.py and test_kill_points.py; this file
covers what is particular to Drive.
"""

from __future__ import annotations

import json
import logging
import os

import fsspec
import pytest

import ckptstore
from ckptstore.backends import resolve
from ckptstore.backends.gdrive import DriveBackend, split_drive_url
from conftest import gdrive_remote
from servers.fake_drive import make_gdrive_fs, make_google_auth
from training import TrainState

FAST = ckptstore.RetryPolicy(attempts=4, initial_delay=0.01, max_delay=0.05)
DATA = ".data-00000-of-00001"


def manager(state, remote, staging, **kwargs):
    kwargs.setdefault("max_to_keep", 3)
    kwargs.setdefault("retry", FAST)
    options = {**remote.storage_options, **kwargs.pop("storage_options", {})}
    return ckptstore.CheckpointManager(
        state.checkpoint, remote.url, staging_dir=str(staging), storage_options=options, **kwargs
    )


def save_steps(state, remote, staging, steps, **kwargs):
    """Save and sync each step (no upload is skipped as superseded)."""
    with manager(state, remote, staging, **kwargs) as m:
        for step in steps:
            state.advance_to(step)
            m.save()
            m.sync()
    return m


def fresh_restore(remote, staging) -> tuple[TrainState, str | None]:
    fresh = TrainState()
    with manager(fresh, remote, staging) as m:
        prefix = m.latest_checkpoint
        if prefix is not None:
            fresh.checkpoint.restore(prefix).assert_existing_objects_matched()
    return fresh, prefix


def folder_id(server, remote) -> str:
    """Id of the remote's folder on the fake server (walking the titles of its path)."""
    parent = "root"
    for title in remote.root.split("/")[1:]:
        [folder] = [f for f in server.find(title=title, parent=parent, trashed=False)]
        parent = folder["id"]
    return parent


def live(server, remote, title) -> list[dict]:
    return server.find(title=title, parent=folder_id(server, remote), trashed=False)


@pytest.fixture
def remote(drive_server):
    spec = gdrive_remote(drive_server)
    yield spec
    assert not drive_server.unsupported, drive_server.unsupported
    assert not drive_server.internal_errors, drive_server.internal_errors[-1]


# --- URLs and options ------------------------------------------------------------------


def test_gdrive_urls_use_pydrive2_and_leave_fsspecs_own_gdrive_alone(drive_server):
    from fsspec.registry import known_implementations, registry
    from pydrive2.fs import GDriveFileSystem

    known_before = dict(known_implementations["gdrive"])
    registered_before = dict(registry)
    backend, root = resolve(
        "gdrive://root/ckpts/run-7", {"google_auth": make_google_auth(drive_server)}
    )
    assert isinstance(backend, DriveBackend)
    assert type(backend.fs) is GDriveFileSystem
    assert root == "root/ckpts/run-7"
    assert backend.protocol == "gdrive" and "gdrive" in repr(backend)
    # Other libraries asking fsspec for "gdrive" get exactly what they got before.
    assert known_implementations["gdrive"] == known_before
    assert dict(registry) == registered_before
    with pytest.raises(ImportError, match="gdrive"):  # gdrive_fsspec, not pydrive2
        fsspec.get_filesystem_class("gdrive")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("gdrive://root/ckpts/run-7", ("root", "root/ckpts/run-7")),
        ("gdrive://root/ckpts/run-7/", ("root", "root/ckpts/run-7")),
        ("gdrive://1AbCdEfGh/run-7", ("1AbCdEfGh", "1AbCdEfGh/run-7")),
        ("gdrive://1AbCdEfGh", ("1AbCdEfGh", "1AbCdEfGh")),
        ("gdrive://appDataFolder//run", ("appDataFolder", "appDataFolder/run")),
    ],
)
def test_url_forms(url, expected):
    assert split_drive_url(url) == expected


def test_url_without_a_folder_is_rejected(state, tmp_path):
    with pytest.raises(ckptstore.ConfigurationError, match=r"gdrive://root/ckpts/run-7"):
        ckptstore.CheckpointManager(state.checkpoint, "gdrive://", 3, staging_dir=str(tmp_path))


def test_a_folder_id_may_stand_first(drive_server, state, tmp_path):
    shared = drive_server.create_folder("shared-with-the-trainer")
    url = f"gdrive://{shared}/run-7"
    options = {"google_auth": make_google_auth(drive_server)}
    with ckptstore.CheckpointManager(
        state.checkpoint, url, 3, staging_dir=str(tmp_path / "a"), storage_options=options
    ) as m:
        state.advance_to(1)
        m.save()
    [run] = drive_server.find(title="run-7", parent=shared)
    titles = {f["title"] for f in drive_server.find(parent=run["id"], trashed=False)}
    assert {"ckpt-1.index", "ckpt-1" + DATA, "ckpt-1.manifest.json", "checkpoint"} <= titles
    fresh = TrainState()
    with ckptstore.CheckpointManager(
        fresh.checkpoint, url, 3, staging_dir=str(tmp_path / "b"), storage_options=options
    ) as m:
        fresh.checkpoint.restore(m.latest_checkpoint)
    assert fresh.matches_step(1)


def test_an_unknown_folder_id_says_what_to_check(drive_server, state, tmp_path):
    options = {"google_auth": make_google_auth(drive_server)}
    with pytest.raises(ckptstore.ConfigurationError, match=r"'1NoSuchFolder'.*share the folder"):
        ckptstore.CheckpointManager(
            state.checkpoint,
            "gdrive://1NoSuchFolder/run",
            3,
            staging_dir=str(tmp_path),
            storage_options=options,
        )


def test_missing_credentials_name_every_way_to_give_them(state, tmp_path):
    with pytest.raises(ckptstore.ConfigurationError) as err:
        ckptstore.CheckpointManager(
            state.checkpoint, "gdrive://root/run", 3, staging_dir=str(tmp_path)
        )
    for way in ("google_auth", "client_id", "client_secret", "use_service_account"):
        assert way in str(err.value)


def test_a_bad_service_account_key_is_a_configuration_error_without_the_key(state, tmp_path):
    key = json.dumps({"type": "service_account", "private_key": "-----BEGIN not-a-real-key"})
    options = {"use_service_account": True, "client_json": key}
    with pytest.raises(ckptstore.ConfigurationError, match="authentication failed") as err:
        ckptstore.CheckpointManager(
            state.checkpoint,
            "gdrive://root/run",
            3,
            staging_dir=str(tmp_path),
            storage_options=options,
        )
    assert "not-a-real-key" not in str(err.value)


@pytest.mark.parametrize("case", ["unknown folder id", "no credentials", "bad key", "no folder"])
def test_every_drive_start_up_error_names_the_url_as_written(case, drive_server, state, tmp_path):
    auth = {"google_auth": make_google_auth(drive_server)}
    key = json.dumps({"type": "service_account", "private_key": "-----BEGIN not-a-real-key"})
    url, options = {
        "unknown folder id": ("gdrive://1NoSuchFolder/runs/run-7/", auth),
        "no credentials": ("gdrive://root/runs/run-7", {}),
        "bad key": ("gdrive://root/runs/run-7", {"use_service_account": True, "client_json": key}),
        "no folder": ("gdrive://", auth),
    }[case]
    with pytest.raises(ckptstore.ConfigurationError) as err:
        ckptstore.CheckpointManager(
            state.checkpoint, url, 3, staging_dir=str(tmp_path), storage_options=options
        )
    assert repr(url) in str(err.value)
    assert "not-a-real-key" not in str(err.value)


def test_storage_options_reach_gdrivefilesystem_unchanged(remote, drive_server, state, tmp_path):
    m = manager(state, remote, tmp_path, storage_options={"acknowledge_abuse": True})
    try:
        fs = m._remote.fs
        assert fs.client.auth is remote.storage_options["google_auth"]
        assert fs._acknowledge_abuse is True
    finally:
        m.close()


@pytest.mark.parametrize("trash_only", [True, False])
def test_retention_trashes_or_deletes_as_trash_only_says_and_reads_ignore_the_trash(
    drive_server, remote, state, tmp_path, trash_only
):
    save_steps(
        state,
        remote,
        tmp_path / "a",
        [1, 2, 3, 4],
        max_to_keep=2,
        storage_options={"trash_only": trash_only},
    )
    folder = folder_id(drive_server, remote)
    trashed = {f["title"] for f in drive_server.find(parent=folder, trashed=True)}
    retired = {f"ckpt-{i}{suffix}" for i in (1, 2) for suffix in (".index", DATA, ".manifest.json")}
    assert trashed == (retired if trash_only else set())
    assert remote.manifests() == ["ckpt-3", "ckpt-4"]
    fresh, prefix = fresh_restore(remote, tmp_path / "b")
    assert os.path.basename(prefix) == "ckpt-4" and fresh.matches_step(4)


# --- a title is not a key ------------------------------------------------------------------


def test_the_state_file_is_updated_in_place_never_duplicated(drive_server, remote, state, tmp_path):
    with manager(state, remote, tmp_path) as m:
        state.advance_to(1)
        m.save()
        m.sync()
        [first] = live(drive_server, remote, "checkpoint")
        for step in (2, 3, 4, 5):
            state.advance_to(step)
            m.save()
            m.sync()
    [last] = live(drive_server, remote, "checkpoint")
    assert last["id"] == first["id"]  # the same file, new content
    assert int(last["version"]) > int(first["version"])
    # In this run's folder: the server is shared by every test of the session.
    assert not drive_server.find(
        title="checkpoint", parent=folder_id(drive_server, remote), trashed=True
    )
    assert 'model_checkpoint_path: "ckpt-5"' in remote.read("checkpoint").decode()


def test_a_resaved_number_leaves_one_file_per_title(drive_server, remote, state, tmp_path):
    save_steps(state, remote, tmp_path / "a", [1, 2])
    state.checkpoint.save_counter.assign(1)  # the next save is ckpt-2 again
    save_steps(state, remote, tmp_path / "a", [7])
    for title in ("ckpt-2.index", "ckpt-2" + DATA, "ckpt-2.manifest.json"):
        assert len(live(drive_server, remote, title)) == 1, title
    fresh, prefix = fresh_restore(remote, tmp_path / "b")
    assert os.path.basename(prefix) == "ckpt-2" and fresh.matches_step(7)


def test_a_stale_file_with_the_same_title_is_removed_before_the_commit(
    drive_server, remote, state, tmp_path
):
    save_steps(state, remote, tmp_path / "a", [1])
    folder = folder_id(drive_server, remote)
    # Left by a crashed writer: a file with the title ckpt-2's data is about to take.
    drive_server.create_file("ckpt-2" + DATA, b"stale bytes", parent=folder)
    save_steps(state, remote, tmp_path / "a", [2])
    [data] = live(drive_server, remote, "ckpt-2" + DATA)
    assert drive_server.content(data["id"]) != b"stale bytes"
    fresh, _ = fresh_restore(remote, tmp_path / "b")
    assert fresh.matches_step(2)


def test_restore_reads_the_copy_the_manifest_describes_when_titles_repeat(
    drive_server, remote, state, tmp_path
):
    save_steps(state, remote, tmp_path / "a", [1])
    folder = folder_id(drive_server, remote)
    [good] = live(drive_server, remote, "ckpt-1" + DATA)
    # Plant same-titled copies until one sorts before the real one: pydrive2's own
    # path lookup takes the smallest id, so a plain read now returns the wrong bytes.
    for _ in range(64):
        bad = drive_server.create_file("ckpt-1" + DATA, b"x" * good_size(good), parent=folder)
        if bad < good["id"]:
            break
    else:
        pytest.fail("could not plant a copy that sorts first")
    remote.fs.invalidate_cache()
    assert remote.fs.cat_file(remote.path("ckpt-1" + DATA)).startswith(b"xxxx")
    fresh, prefix = fresh_restore(remote, tmp_path / "b")
    assert os.path.basename(prefix) == "ckpt-1" and fresh.matches_step(1)


def good_size(item) -> int:
    return int(item["fileSize"])


# --- md5Checksum is the service's checksum --------------------------------------------------


def test_uploads_are_verified_by_drives_md5_without_reading_back(
    drive_server, remote, state, tmp_path
):
    with manager(state, remote, tmp_path / "a") as m:
        state.advance_to(1)
        m.save()  # takes the writer lease (reading it once) and commits ckpt-1
        m.sync()
        drive_server.clear_log()
        state.advance_to(2)
        m.save()
        m.sync()
    downloads = [r for r in drive_server.requests("GET") if r.query.get("alt") == "media"]
    assert downloads == []
    doc = json.loads(remote.read("ckpt-2.manifest.json"))
    for entry in doc["files"]:
        [item] = live(drive_server, remote, entry["name"])
        assert entry["md5"] == item["md5Checksum"]


def test_a_stored_file_whose_md5_differs_is_never_committed(drive_server, remote, state, tmp_path):
    drive_server.damage_next_upload("ckpt-2" + DATA)
    m = manager(state, remote, tmp_path / "a")
    state.advance_to(1)
    m.save()
    state.advance_to(2)
    m.save()
    with pytest.raises(ckptstore.UploadError, match="md5Checksum"):
        m.sync()
    assert remote.manifests() == ["ckpt-1"]
    assert os.path.exists(tmp_path / "a" / ("ckpt-2" + DATA))  # kept staged for the next try
    state.advance_to(3)
    m.save()
    m.sync()
    m.close()
    assert remote.manifests() == ["ckpt-1", "ckpt-3"]
    fresh, prefix = fresh_restore(remote, tmp_path / "b")
    assert os.path.basename(prefix) == "ckpt-3" and fresh.matches_step(3)


# --- rate limits ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["429", "userRateLimitExceeded", "backendError"])
def test_rate_limits_and_server_errors_are_retried_with_backoff(
    drive_server, remote, state, tmp_path, kind
):
    with manager(state, remote, tmp_path / "a") as m:
        state.advance_to(1)
        m.save()  # the writer's lease is taken here, before the faults start
        m.sync()
        fault = drive_server.fail_next(3, kind, path=r"^/upload/")
        try:
            state.advance_to(2)
            m.save()
            m.sync()
            status = m.upload_status()
        finally:
            drive_server.clear_faults()
    assert fault.served == 3
    assert status.committed == ("ckpt-1", "ckpt-2")
    if kind == "429":
        # pydrive2 gives up on 429 at once: ckptstore's own backoff carried it.
        assert status.retries >= 1
    fresh, _ = fresh_restore(remote, tmp_path / "b")
    assert fresh.matches_step(2)


def test_restore_rides_out_429s(drive_server, remote, state, tmp_path):
    save_steps(state, remote, tmp_path / "a", [1, 2])
    fault = drive_server.fail_next(3, "429", method="GET")
    try:
        fresh, prefix = fresh_restore(remote, tmp_path / "b")
    finally:
        drive_server.clear_faults()
    assert fault.served == 3
    assert os.path.basename(prefix) == "ckpt-2" and fresh.matches_step(2)


# --- trash ---------------------------------------------------------------------------------


def test_a_trashed_manifest_means_the_checkpoint_is_gone(drive_server, remote, state, tmp_path):
    save_steps(state, remote, tmp_path / "a", [1, 2])
    [manifest] = live(drive_server, remote, "ckpt-2.manifest.json")
    drive_server.trash(manifest["id"])
    fresh, prefix = fresh_restore(remote, tmp_path / "b")
    assert os.path.basename(prefix) == "ckpt-1" and fresh.matches_step(1)


def test_trashed_data_is_never_read_restore_falls_back(drive_server, remote, state, tmp_path):
    save_steps(state, remote, tmp_path / "a", [1, 2])
    [data] = live(drive_server, remote, "ckpt-2" + DATA)
    drive_server.trash(data["id"])
    fresh, prefix = fresh_restore(remote, tmp_path / "b")
    assert os.path.basename(prefix) == "ckpt-1" and fresh.matches_step(1)


# --- credentials ---------------------------------------------------------------------------


def test_drive_credentials_stay_out_of_reprs_logs_and_errors(
    drive_server, remote, state, tmp_path, caplog
):
    secret = "client-secret-DO-NOT-PRINT"
    key = json.dumps({"type": "service_account", "private_key": "PRIVATE-KEY-DO-NOT-PRINT"})
    options = {"client_id": "id-123", "client_secret": secret, "client_json": key}
    drive_server.fail_next(2, "429", path=r"^/upload/")
    with caplog.at_level(logging.DEBUG, logger="ckptstore"):
        m = manager(state, remote, tmp_path / "a", storage_options=options)
        state.advance_to(1)
        m.save()
        m.sync()
        shown = repr(m) + repr(m._remote) + repr(m.upload_status())
        m.close()
    drive_server.clear_faults()
    text = shown + caplog.text + remote.read("ckpt-1.manifest.json").decode()
    assert "retry" in caplog.text  # the 429s were logged ...
    assert secret not in text and "PRIVATE-KEY" not in text  # ... without a secret


# --- a flaky link ----------------------------------------------------------------------------


def test_every_checkpoint_commits_with_a_fifth_of_requests_failing(drive_server, tmp_path):
    from servers.faultproxy import FaultProxy

    proxy = FaultProxy("127.0.0.1", drive_server.port, seed=7, stall_seconds=2)
    proxy.start()
    try:
        spec = gdrive_remote(drive_server, url=proxy.endpoint_url)
        state = TrainState()
        proxy.set_failure_rate(0.2, ("5xx", "reset", "stall"))
        with manager(
            state,
            spec,
            tmp_path / "a",
            max_to_keep=4,
            max_pending_uploads=10,
            when_behind="block",
            retry=ckptstore.RetryPolicy(attempts=8, initial_delay=0.05),
        ) as m:
            for step in range(1, 5):
                state.advance_to(step)
                m.save()
            m.sync()
            status = m.upload_status()
        proxy.set_failure_rate(0.0)
        logging.getLogger("ckptstore").info(
            "gdrive with 20%% faults: %d requests, %d faults %s, %d ckptstore retries",
            proxy.requests,
            proxy.total_faults,
            proxy.faults_injected,
            status.retries,
        )
    finally:
        proxy.stop()
    assert proxy.total_faults > 0, "no fault was injected: the test proves nothing"
    assert status.failed == {} and status.skipped == ()
    assert spec.manifests() == ["ckpt-1", "ckpt-2", "ckpt-3", "ckpt-4"]
    for n in range(1, 5):  # retried uploads left no second copy behind
        assert len(live(drive_server, spec, f"ckpt-{n}{DATA}")) == 1
    direct = gdrive_remote(drive_server)
    direct.url, direct.root = spec.url, spec.root
    fresh, prefix = fresh_restore(direct, tmp_path / "b")
    assert os.path.basename(prefix) == "ckpt-4" and fresh.matches_step(4)


def test_a_folder_left_empty_is_removed_and_its_path_can_be_used_again(drive_server):
    spec = gdrive_remote(drive_server)
    backend, root = resolve(spec.url, spec.storage_options)
    backend.make_dirs(f"{root}/7/variables")
    spec.fs.pipe_file(spec.path("7/variables/theirs.txt"), b"not ckptstore's")
    # Not empty: kept, with what is in it.
    assert backend.remove_empty_dir(f"{root}/7/variables") is False
    spec.fs.rm_file(spec.path("7/variables/theirs.txt"))
    assert backend.remove_empty_dir(f"{root}/7/variables") is True
    assert backend.remove_empty_dir(f"{root}/7") is True
    spec.fs.invalidate_cache()
    assert spec.fs.ls(spec.path(""), detail=False) == []
    # The same path again: made anew, not looked up in pydrive2's cache of the deleted folder.
    backend.make_dirs(f"{root}/7/variables")
    backend.write_atomic(f"{root}/7/variables/again.txt", b"again")
    fresh = make_gdrive_fs(drive_server)  # the inspector's own cache knows the deleted folders
    assert fresh.cat_file(spec.path("7/variables/again.txt")) == b"again"
    assert len(fresh.ls(spec.path(""), detail=False)) == 1
