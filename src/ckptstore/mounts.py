"""Which mount a local path lives on, and whether that mount syncs to a cloud later.

A notebook that saves into ``/content/drive/MyDrive/run`` on Colab writes into
a FUSE filesystem. Its daemon keeps the bytes on the VM's disk and uploads them
to Google Drive on its own schedule. Writing checkpoints there directly stalls
training on the mount, and a file the mount shows is not yet in Drive. So the
manager treats such a path like a remote: stage locally, copy in the
background, verify by reading back through the mount (see ``manager.py`` and
``backends/local.py``).

Only the kernel's mount table is read; nothing is probed or written. Mounts
are classified by an explicit allowlist of filesystem types, never by "is it
FUSE": container roots (``fuse-overlayfs``), ``lxcfs`` and ``sshfs`` are FUSE
too and write through. NFS homes on clusters are not cloud-synced either:
TensorFlow writes to them directly, as it always has.
"""

from __future__ import annotations

import dataclasses
import os
import re

#: The mount table read by :func:`find_mount`, in ``fstab`` format
#: (``source mount_point fstype options dump pass``). Module-level so that tests
#: can point it at a table they write.
MOUNT_TABLE = "/proc/self/mounts"

#: Filesystem types of FUSE daemons that upload to an object store or cloud
#: drive on their own schedule, after the write has returned.
CLOUD_SYNCED_FSTYPES = frozenset(
    {
        # Colab's Google Drive (DriveFS). Confirmed: colabtools' drive.py checks
        # for "type fuse.drive" in /bin/mount's output before flush_and_unmount().
        "fuse.drive",
        # DriveFS under another name: listed by other tools, not confirmed on Colab.
        "fuse.drivefs",
        # google-drive-ocamlfuse, the community way to mount Drive in notebooks.
        "fuse.google-drive-ocamlfuse",
        "fuse.gcsfuse",  # Cloud Storage FUSE
        "fuse.s3fs",  # s3fs-fuse
        "fuse.mountpoint-s3",  # Mountpoint for Amazon S3
        "fuse.rclone",  # rclone mount (any rclone remote)
        "fuse.blobfuse",  # Azure Blob Storage, v1
        "fuse.blobfuse2",  # Azure Blob Storage, v2
        "fuse.goofys",
        "fuse.geesefs",
        "fuse.juicefs",
    }
)

#: A few daemons may show up as plain ``fuse`` (no subtype) when mounted
#: without fusermount. Then only the source names the daemon. A plain ``fuse``
#: mount with any other source stays unclassified.
CLOUD_SYNCED_SOURCES_OF_PLAIN_FUSE = frozenset({"mountpoint-s3"})

# The kernel writes space, tab, newline and backslash in mount table fields as
# three-digit octal escapes (\040, \011, \012, \134).
_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


@dataclasses.dataclass(frozen=True)
class Mount:
    """One line of the mount table: the mount that holds a path."""

    mount_point: str
    fstype: str
    source: str

    @property
    def cloud_synced(self) -> bool:
        """Whether this mount's daemon uploads to a cloud after the write has returned."""
        fstype = self.fstype.lower()
        if fstype in CLOUD_SYNCED_FSTYPES:
            return True
        return fstype == "fuse" and self.source in CLOUD_SYNCED_SOURCES_OF_PLAIN_FUSE


def find_mount(path: str | os.PathLike[str]) -> Mount | None:
    """The mount ``path`` lives on, or ``None`` if the mount table cannot tell.

    The path is resolved with ``os.path.realpath`` first, so a symlink into a
    mount counts as being on it. It need not exist yet. The mount whose mount
    point is the longest prefix of the resolved path, in whole path
    components, wins. If two mounts have the same point, the later line wins
    because it was mounted on top. A missing or unreadable table (not Linux, a
    sandbox without ``/proc``) gives ``None``; this function never raises.
    """
    try:
        with open(MOUNT_TABLE, "rb") as table:
            lines = table.read().splitlines()
        target = os.path.realpath(os.fspath(path))
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return None
    best: Mount | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue  # not a mount line; a damaged table must not stop the lookup
        mount_point = _unescape(fields[1])
        if not _contains(mount_point, target):
            continue
        if best is None or len(mount_point) >= len(best.mount_point):
            best = Mount(mount_point, _unescape(fields[2]), _unescape(fields[0]))
    return best


def cloud_synced_mount(path: str | os.PathLike[str]) -> Mount | None:
    """The mount holding ``path`` if that mount syncs to a cloud later, else ``None``."""
    mount = find_mount(path)
    return mount if mount is not None and mount.cloud_synced else None


def _unescape(field: bytes) -> str:
    def byte(match: re.Match[bytes]) -> bytes:
        value = int(match.group(1), 8)
        return bytes([value]) if value < 256 else match.group(0)

    # Bytes first, then the filesystem encoding: a mount point that is not
    # UTF-8 comes out exactly as os.path.realpath spells the same path.
    return os.fsdecode(_OCTAL_ESCAPE.sub(byte, field))


def _contains(mount_point: str, path: str) -> bool:
    """Whether ``path`` is ``mount_point`` or below it, in whole path components."""
    if mount_point == "/":
        return path.startswith("/")
    return path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
