"""Atomic file writes: a kill, a crash or a full disk leaves the old file or the new one, never
half of one.

Write:  bytes -> temporary file .{name}.{host}.{pid}.{token}.tmp in the same folder -> flush ->
        fsync -> os.replace onto the path -> fsync the folder.
os.replace is a rename, all or nothing within one file system; the fsyncs make the bytes, then
the rename, survive a power cut. A killed write leaves its temporary behind: the next write to
the same path removes it once its process is gone.
Source: the write-fsync-rename idiom of databases and editors. Used by minicnn/checkpoint.py
(checkpoints, snapshots, feature caches) and for reports and figures; docs/checkpoints.md
tells what a crash can cost, and what not.
"""
import os
import re
import secrets
import socket
from pathlib import Path

# this host's name without dots, so that a temporary file's name parses
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def atomic_write(path, data):
    """Write bytes (or str, as UTF-8) to `path` so that a kill or a full disk leaves the old file
    or the new one, never half of one (whatever was good before stays good) -> path."""
    path = Path(path)
    data = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in stale_temporaries(path.parent, re.escape(path.name)):  # killed writes' files
        leftover.unlink(missing_ok=True)
    # in the same folder: os.replace is atomic only within one file system (os.open, not
    # tempfile.mkstemp, whose mode 0600 would survive the rename: the umask applies, as for open)
    tmp = path.parent / f".{path.name}.{HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)  # a rename: all or nothing
    except BaseException as error:  # a full disk, a Ctrl-C: the old file stays, the temporary goes
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):  # named by the target, not by the temporary
            raise OSError(error.errno, f"{error.strerror}: {path} was not written") from error
        raise
    if os.name != "nt":  # fsync the folder: the rename survives a power cut (not on Windows)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def stale_temporaries(folder, names):
    """Temporary files that atomic_write left in `folder` for targets whose name matches the
    regex `names` when its process was killed (it is gone: nobody will finish or remove them)."""
    # .{name}.{host}.{pid}.{token}.tmp (no host: older versions)
    pattern = re.compile(r"\.(?:" + names + r")\.(?:(?P<host>[A-Za-z0-9-]+)\.)?(?P<pid>\d+)"
                         r"\.[0-9a-f]{8}\.tmp")
    found = []
    for entry in os.scandir(folder) if Path(folder).is_dir() else ():
        m = pattern.fullmatch(entry.name)
        if m and m.group("host") in (None, HOST) and _dead(int(m.group("pid"))):
            found.append(Path(folder) / entry.name)
    return found


def _dead(pid):
    """True if no process has this id (on this host); on Windows nobody can tell: False."""
    if os.name == "nt" or pid == os.getpid():  # Windows: os.kill(pid, 0) would end the process
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        pass
    return False
