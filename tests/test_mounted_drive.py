"""A plain path on a cloud-synced mount (Colab's Drive): detected, staged, copied, verified.

ckptstore decides from the kernel's mount table alone, so each test writes its
own table and points ``ckptstore.mounts.MOUNT_TABLE`` at it. That table is the
OS input, not ckptstore's logic. The "mount" is then a directory on the local
disk that the table declares to be ``fuse.drive``. Everything else runs
unchanged: mode selection, staging, upload, verification, commit, restore.

Storage-side behaviour (a copy the mount gets wrong, what the page cache holds
when the read-back starts) comes from :class:`MountFileSystem`, which stands in
for fsspec's ``file`` protocol the way ``faultfs.py`` does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import logging
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec
import pytest
import tensorflow as tf
from fsspec.implementations.local import LocalFileSystem

import ckptstore
from ckptstore import mounts, staging
from training import TrainState

FAST = ckptstore.RetryPolicy(attempts=3, initial_delay=0.01, max_delay=0.05)

ROOT_EXT4 = "/dev/vda / ext4 rw,relatime 0 0"
# What Colab's mount looks like. The fstype is confirmed (colabtools' drive.py looks
# for "type fuse.drive"); the source "drive" is a guess, and ckptstore does not use it.
DRIVE_OPTIONS = "rw,nosuid,nodev,relatime,user_id=0,group_id=0,default_permissions,allow_other"


def escape(path: str | Path) -> str:
    """Spell a path as the kernel does in a mount table."""
    text = str(path)
    for char, code in (("\\", "\\134"), (" ", "\\040"), ("\t", "\\011"), ("\n", "\\012")):
        text = text.replace(char, code)
    return text


def drive_line(mount_point: str | Path) -> str:
    return f"drive {escape(mount_point)} fuse.drive {DRIVE_OPTIONS} 0 0"


def use_table(tmp_path: Path, monkeypatch, *lines: str) -> Path:
    table = tmp_path / "mounts-table"
    table.write_text("".join(line + "\n" for line in lines))
    monkeypatch.setattr(mounts, "MOUNT_TABLE", str(table))
    return table


@pytest.fixture
def staging_base(tmp_path, monkeypatch) -> Path:
    """Where default staging directories go: under tmp_path, never the real ~/.cache."""
    base = tmp_path / "cache-1"
    monkeypatch.setenv("CKPTSTORE_STAGING_DIR", str(base))
    return base


@pytest.fixture
def drive(tmp_path, monkeypatch) -> Path:
    """``<tmp>/content/drive`` declared a Colab Drive mount; returns ``MyDrive/run`` in it."""
    mount_point = tmp_path / "content" / "drive"
    (mount_point / "MyDrive").mkdir(parents=True)
    use_table(tmp_path, monkeypatch, ROOT_EXT4, drive_line(mount_point))
    return mount_point / "MyDrive" / "run"


def manifests_in(directory: Path) -> list[str]:
    if not directory.exists():
        return []
    return sorted(
        n[: -len(".manifest.json")] for n in os.listdir(directory) if n.endswith(".manifest.json")
    )


def save_steps(manager: ckptstore.CheckpointManager, state: TrainState, steps) -> list[str]:
    saved = []
    for step in steps:
        state.advance_to(step)
        saved.append(manager.save())
    return saved


# --- the mount table -------------------------------------------------------------------


def test_colab_drive_line_is_found_and_cloud_synced(tmp_path, monkeypatch):
    use_table(tmp_path, monkeypatch, ROOT_EXT4, drive_line("/content/drive"))
    mount = mounts.find_mount("/content/drive/MyDrive/run")
    assert mount == mounts.Mount("/content/drive", "fuse.drive", "drive")
    assert mount.cloud_synced
    assert mounts.cloud_synced_mount("/content/drive/MyDrive/run") == mount


def test_gcsfuse_is_cloud_synced(tmp_path, monkeypatch):
    use_table(
        tmp_path,
        monkeypatch,
        ROOT_EXT4,
        "my-bucket /mnt/gcs fuse.gcsfuse rw,nosuid,nodev,relatime,user_id=0,group_id=0 0 0",
    )
    assert mounts.cloud_synced_mount("/mnt/gcs/runs/7") == mounts.Mount(
        "/mnt/gcs", "fuse.gcsfuse", "my-bucket"
    )


@pytest.mark.parametrize(
    "line",
    [
        "s3fs /mnt/x fuse.s3fs rw,nosuid,nodev 0 0",
        "mountpoint-s3 /mnt/x fuse.mountpoint-s3 rw 0 0",
        "mountpoint-s3 /mnt/x fuse rw,nosuid,nodev 0 0",  # mounted without fusermount
        "gdrive: /mnt/x fuse.rclone rw,nosuid,nodev 0 0",
        "blobfuse2 /mnt/x fuse.blobfuse2 rw,nosuid,nodev 0 0",
        "blobfuse /mnt/x fuse.blobfuse rw 0 0",
        "bucket /mnt/x fuse.goofys rw 0 0",
        "bucket: /mnt/x fuse.geesefs rw 0 0",
        "JuiceFS:jfs /mnt/x fuse.juicefs rw 0 0",
        "google-drive-ocamlfuse /mnt/x fuse.google-drive-ocamlfuse rw 0 0",
    ],
)
def test_object_store_mounts_are_cloud_synced(tmp_path, monkeypatch, line):
    use_table(tmp_path, monkeypatch, ROOT_EXT4, line)
    mount = mounts.find_mount("/mnt/x/run")
    assert mount is not None and mount.mount_point == "/mnt/x"
    assert mount.cloud_synced


@pytest.mark.parametrize(
    ("line", "fstype"),
    [
        (ROOT_EXT4, "ext4"),
        ("overlay / overlay rw,lowerdir=/l,upperdir=/u,workdir=/w 0 0", "overlay"),
        ("fuse-overlayfs / fuse.fuse-overlayfs rw,user_id=0,group_id=0 0 0", "fuse.fuse-overlayfs"),
        ("nas:/export/home / nfs4 rw,vers=4.2,hard,proto=tcp 0 0", "nfs4"),
        ("nas:/export/home / nfs rw,vers=3 0 0", "nfs"),
        ("lxcfs / fuse.lxcfs rw,nosuid,nodev 0 0", "fuse.lxcfs"),
        ("me@host:/data / fuse.sshfs rw 0 0", "fuse.sshfs"),
        ("somedaemon / fuse rw 0 0", "fuse"),
        ("tmpfs / tmpfs rw 0 0", "tmpfs"),
    ],
)
def test_local_nfs_and_generic_fuse_filesystems_are_not_cloud_synced(
    tmp_path, monkeypatch, line, fstype
):
    use_table(tmp_path, monkeypatch, line)
    mount = mounts.find_mount("/home/me/run")
    assert mount is not None and (mount.mount_point, mount.fstype) == ("/", fstype)
    assert not mount.cloud_synced
    assert mounts.cloud_synced_mount("/home/me/run") is None


def test_octal_escapes_are_decoded(tmp_path, monkeypatch):
    use_table(
        tmp_path,
        monkeypatch,
        ROOT_EXT4,
        r"my\040remote: /content/My\040Drive\011x\134y fuse.rclone rw 0 0",
    )
    mount = mounts.find_mount("/content/My Drive\tx\\y/run")
    assert mount == mounts.Mount("/content/My Drive\tx\\y", "fuse.rclone", "my remote:")
    # The escaped spelling is not a path on that mount.
    assert mounts.find_mount(r"/content/My\040Drive/run").mount_point == "/"


def test_nested_mounts_longest_prefix_wins_in_whole_components(tmp_path, monkeypatch):
    use_table(
        tmp_path,
        monkeypatch,
        ROOT_EXT4,
        "tmpfs /content/drive/MyDrive/cache tmpfs rw 0 0",  # listed before its parent
        drive_line("/content/drive"),
        "tmpfs /content tmpfs rw 0 0",
    )
    assert mounts.find_mount("/content/drive/MyDrive/run").fstype == "fuse.drive"
    assert mounts.find_mount("/content/drive").fstype == "fuse.drive"
    assert mounts.find_mount("/content/drive/MyDrive/cache/x").fstype == "tmpfs"
    assert mounts.find_mount("/content/drive2/run").mount_point == "/content"
    assert mounts.find_mount("/srv/run").mount_point == "/"


def test_a_later_mount_on_the_same_point_hides_the_earlier_one(tmp_path, monkeypatch):
    use_table(tmp_path, monkeypatch, ROOT_EXT4, drive_line("/mnt/d"), "tmpfs /mnt/d tmpfs rw 0 0")
    assert mounts.find_mount("/mnt/d/run").fstype == "tmpfs"
    use_table(tmp_path, monkeypatch, ROOT_EXT4, "tmpfs /mnt/d tmpfs rw 0 0", drive_line("/mnt/d"))
    assert mounts.find_mount("/mnt/d/run").fstype == "fuse.drive"


def test_a_symlink_into_a_mount_counts_as_on_it(tmp_path, monkeypatch):
    real = tmp_path / "content" / "drive"
    (real / "MyDrive").mkdir(parents=True)
    (tmp_path / "shortcut").symlink_to(real / "MyDrive")
    use_table(tmp_path, monkeypatch, ROOT_EXT4, drive_line(real))
    assert mounts.cloud_synced_mount(tmp_path / "shortcut" / "run").mount_point == str(real)


def test_missing_unreadable_or_garbled_table_never_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(mounts, "MOUNT_TABLE", str(tmp_path / "no-such-table"))
    assert mounts.find_mount("/content/drive/run") is None
    assert mounts.cloud_synced_mount("/content/drive/run") is None
    monkeypatch.setattr(mounts, "MOUNT_TABLE", str(tmp_path))  # a directory
    assert mounts.find_mount("/content/drive/run") is None
    table = use_table(tmp_path, monkeypatch, ROOT_EXT4, drive_line("/content/drive"))
    assert mounts.find_mount("/content/\0drive") is None
    table.write_bytes(b"\n garbage\n\xff\xfe\x00\n" + drive_line("/content/drive").encode())
    assert mounts.find_mount("/content/drive/run").fstype == "fuse.drive"


# --- the manager on a mount ---------------------------------------------------------------


def test_plain_path_on_a_drive_mount_runs_in_remote_mode(drive, staging_base, caplog):
    state = TrainState()
    with caplog.at_level(logging.INFO, logger="ckptstore"):
        manager = ckptstore.CheckpointManager(
            state.checkpoint, str(drive), 3, retry=FAST, when_behind="block"
        )
    expected_staging = staging.default_staging_dir(str(drive))
    assert manager.staging_dir == expected_staging
    assert expected_staging.startswith(str(staging_base))
    notices = [r for r in caplog.records if "staging_dir=" in r.getMessage()]
    assert len(notices) == 1 and notices[0].levelno == logging.INFO
    assert expected_staging in notices[0].getMessage()
    assert "in the background" in notices[0].getMessage()

    saved = save_steps(manager, state, [1, 2, 3, 4])
    # save() returned TensorFlow's local write, in staging; the mount gets its copy later.
    assert [os.path.dirname(p) for p in saved] == [expected_staging] * 4
    manager.sync()
    assert manager.upload_status().committed == ("ckpt-2", "ckpt-3", "ckpt-4")
    manager.close()

    assert manifests_in(drive) == ["ckpt-2", "ckpt-3", "ckpt-4"]
    for n in (2, 3, 4):
        assert (drive / f"ckpt-{n}.index").is_file()
        assert (drive / f"ckpt-{n}.data-00000-of-00001").is_file()
    assert not (drive / "ckpt-1.index").exists()
    # Plain TensorFlow reads the mount: its state file names the newest committed checkpoint.
    latest = tf.train.latest_checkpoint(str(drive))
    assert latest == str(drive / "ckpt-4")
    reader = TrainState()
    reader.checkpoint.restore(latest).assert_existing_objects_matched()
    assert reader.matches_step(4)


def test_a_fresh_runtime_restores_from_the_mount_bit_for_bit(drive, tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTSTORE_STAGING_DIR", str(tmp_path / "old-runtime"))
    state = TrainState()
    with ckptstore.CheckpointManager(state.checkpoint, str(drive), 3, retry=FAST) as manager:
        save_steps(manager, state, [1, 2, 3])

    # A recycled runtime: empty local disk, the mount alone.
    monkeypatch.setenv("CKPTSTORE_STAGING_DIR", str(tmp_path / "new-runtime"))
    fresh = TrainState()
    with ckptstore.CheckpointManager(fresh.checkpoint, str(drive), 3, retry=FAST) as manager:
        assert manager.staging_dir.startswith(str(tmp_path / "new-runtime"))
        prefix = manager.latest_checkpoint
        assert prefix == os.path.join(manager.staging_dir, "ckpt-3")
        fresh.checkpoint.restore(prefix).assert_existing_objects_matched()
    assert fresh.matches_step(3)


@pytest.mark.parametrize(
    "table_line",
    [
        ROOT_EXT4,
        "overlay / overlay rw,lowerdir=/l,upperdir=/u,workdir=/w 0 0",
        "fuse-overlayfs / fuse.fuse-overlayfs rw,user_id=0,group_id=0 0 0",
        "nas:/export / nfs4 rw,vers=4.2 0 0",
        None,  # no mount table at all (not Linux, no /proc)
    ],
)
def test_plain_path_on_an_ordinary_filesystem_stays_tensorflow_local_mode(
    tmp_path, monkeypatch, staging_base, table_line
):
    if table_line is None:
        monkeypatch.setattr(mounts, "MOUNT_TABLE", str(tmp_path / "no-such-table"))
    else:
        use_table(tmp_path, monkeypatch, table_line)
    directory = str(tmp_path / "run")
    state = TrainState()
    manager = ckptstore.CheckpointManager(state.checkpoint, directory, 2)
    assert manager.staging_dir == directory
    assert manager.upload_status() is None
    saved = save_steps(manager, state, [1, 2, 3])
    manager.close()
    assert saved == [os.path.join(directory, f"ckpt-{n}") for n in (1, 2, 3)]
    assert sorted(os.listdir(directory)) == [
        "checkpoint",
        "ckpt-2.data-00000-of-00001",
        "ckpt-2.index",
        "ckpt-3.data-00000-of-00001",
        "ckpt-3.index",
    ]
    assert tf.train.latest_checkpoint(directory) == os.path.join(directory, "ckpt-3")
    assert not staging_base.exists(), "local mode created a staging directory"


def test_an_explicit_staging_dir_wins_on_a_drive_mount(drive, tmp_path, staging_base, caplog):
    mine = tmp_path / "my-staging"
    state = TrainState()
    with caplog.at_level(logging.INFO, logger="ckptstore"):
        manager = ckptstore.CheckpointManager(
            state.checkpoint, str(drive), 3, staging_dir=str(mine), retry=FAST
        )
    assert manager.staging_dir == str(mine)
    assert not [r for r in caplog.records if "cloud-synced mount" in r.getMessage()]
    saved = save_steps(manager, state, [1, 2])
    manager.close()
    assert [os.path.dirname(p) for p in saved] == [str(mine)] * 2
    assert manifests_in(drive) == ["ckpt-1", "ckpt-2"]
    assert not staging_base.exists()

    # staging_dir=<the directory itself> is the way to TensorFlow's direct writes.
    direct = drive.parent / "direct"
    state = TrainState()
    manager = ckptstore.CheckpointManager(state.checkpoint, str(direct), 3, staging_dir=str(direct))
    assert manager.staging_dir == str(direct) and manager.upload_status() is None
    saved = save_steps(manager, state, [1])
    manager.close()
    assert saved == [str(direct / "ckpt-1")]
    assert manifests_in(direct) == []


# --- verification reads back through the mount -------------------------------------------


@dataclasses.dataclass
class MountBehaviour:
    #: stored files the mount gets wrong: one byte flipped after the copy (same size)
    damage: Callable[[str], bool] | None = None
    #: data file name -> (pages in the page cache, pages in the file) when a read-back began
    cached_at_read_back: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


BEHAVIOUR = MountBehaviour()


def _is_data_file(path: str) -> bool:
    name = os.path.basename(path)
    return name.endswith(".index") or ".data-" in name


class MountFileSystem(LocalFileSystem):
    """fsspec's local filesystem, plus what a mount may do to a copy, plus a cache probe."""

    def put_file(self, lpath, rpath, callback=None, **kwargs):
        result = super().put_file(lpath, rpath, callback=callback, **kwargs)
        path = self._strip_protocol(rpath)
        if BEHAVIOUR.damage is not None and BEHAVIOUR.damage(path):
            with open(path, "r+b") as f:
                f.seek(os.path.getsize(path) // 2)
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0xFF]))
        return result

    def open(self, path, mode="rb", **kwargs):
        stripped = self._strip_protocol(path)
        if mode == "rb" and _is_data_file(stripped):
            cached = resident_pages(stripped)
            with BEHAVIOUR.lock:
                BEHAVIOUR.cached_at_read_back[os.path.basename(stripped)] = cached
        return super().open(path, mode, **kwargs)


@pytest.fixture
def mount_behaviour() -> Iterator[MountBehaviour]:
    original = fsspec.get_filesystem_class("file")
    fsspec.register_implementation("file", MountFileSystem, clobber=True)
    BEHAVIOUR.damage = None
    BEHAVIOUR.cached_at_read_back.clear()
    try:
        yield BEHAVIOUR
    finally:
        BEHAVIOUR.damage = None
        BEHAVIOUR.cached_at_read_back.clear()
        fsspec.register_implementation("file", original, clobber=True)
        MountFileSystem.clear_instance_cache()


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_pages(path: str) -> tuple[int, int]:
    """``(pages of path in the page cache, pages in path)``, by mincore(2) on a mapping.

    Mapping a file does not read it, so the probe does not change what it measures.
    """
    size = os.path.getsize(path)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    if size == 0:
        return 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap failed", path)
        try:
            vector = (ctypes.c_ubyte * pages)()
            if _libc.mincore(ctypes.c_void_p(addr), size, vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed", path)
            return sum(v & 1 for v in vector), pages
        finally:
            _libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


def test_a_copy_damaged_on_the_mount_is_caught_by_reading_back(
    drive, staging_base, mount_behaviour
):
    mount_behaviour.damage = lambda path: path.endswith("ckpt-2.data-00000-of-00001")
    state = TrainState()
    manager = ckptstore.CheckpointManager(state.checkpoint, str(drive), 3, retry=FAST)
    save_steps(manager, state, [1, 2])
    with pytest.raises(ckptstore.UploadError) as raised:
        manager.sync()
    manager.close()
    # Same size, one byte off: only reading the bytes back finds it.
    assert "ckpt-2.data-00000-of-00001: read-back crc32c" in str(raised.value)
    assert manifests_in(drive) == ["ckpt-1"]
    assert tf.train.latest_checkpoint(str(drive)) == str(drive / "ckpt-1")

    # The next manager on the same staging directory uploads the failed one again.
    mount_behaviour.damage = None
    fresh = TrainState()
    with ckptstore.CheckpointManager(fresh.checkpoint, str(drive), 3, retry=FAST) as manager:
        manager.sync()
        fresh.checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    assert manifests_in(drive) == ["ckpt-1", "ckpt-2"]
    assert fresh.matches_step(2)


def test_read_back_on_a_cloud_mount_does_not_come_from_the_page_cache(
    drive, tmp_path, staging_base, mount_behaviour
):
    # Needs Linux on a disk filesystem (tmp_path on ext4/xfs, as here and in CI): there
    # DONTNEED empties the cache of a clean file, and mincore shows it.
    assert hasattr(os, "posix_fadvise"), "this test needs Linux's posix_fadvise"
    probe = tmp_path / "probe"
    with open(probe, "wb") as f:
        f.write(os.urandom(256 * 1024))
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(probe, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    assert resident_pages(str(probe))[0] == 0, "tmp_path keeps pages after DONTNEED (tmpfs?)"

    # Control: an ordinary local remote reads back what the kernel still caches.
    ordinary = tmp_path / "disk" / "run"
    state = TrainState()
    with ckptstore.CheckpointManager(
        state.checkpoint, str(ordinary), 3, staging_dir=str(tmp_path / "s"), retry=FAST
    ) as manager:
        save_steps(manager, state, [1])
    control = dict(mount_behaviour.cached_at_read_back)
    assert set(control) == {"ckpt-1.index", "ckpt-1.data-00000-of-00001"}
    assert any(cached for cached, _ in control.values()), "page cache not observable here"

    mount_behaviour.cached_at_read_back.clear()
    state = TrainState()
    with ckptstore.CheckpointManager(state.checkpoint, str(drive), 3, retry=FAST) as manager:
        save_steps(manager, state, [1, 2])
    seen = mount_behaviour.cached_at_read_back
    assert set(seen) == {
        f"ckpt-{n}.{suffix}" for n in (1, 2) for suffix in ("index", "data-00000-of-00001")
    }
    assert all(pages > 0 for _, pages in seen.values())
    assert {name: cached for name, (cached, _) in seen.items() if cached} == {}
