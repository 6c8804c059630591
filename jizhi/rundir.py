"""The run directory: where jizhid's sockets, plan file and instance lock live, safe from other users.

Runs in the supervisor (``prepare``, ``InstanceLock``, ``write_file``) and
in whatever else writes a file jizhid later trusts (``open_new``: the
shedding policy, the hot tier's key lists, a model's pin file).

The default run directory is under /tmp (``/tmp/jizhi-<uid>-<instance>``),
where any local user can create it first. So ``prepare`` creates it mode
0700, or accepts an existing one only when this user owns it and neither
group nor others may write it, and when nobody but this user or root can
replace it or a directory above it (a directory others may write is
accepted above it only when it is sticky, as /tmp is). Otherwise it raises
RunDirError with the reason; jizhid refuses to start.

Files are never written through a symbolic link: ``open_new`` removes
whatever has the name (a leftover of a crash, or a link) and creates the
file exclusively (``O_CREAT | O_EXCL | O_NOFOLLOW``); ``write_file`` writes
a temporary that way and renames it over the target (``rename`` replaces a
link, never follows it).

The instance lock (one live supervisor per instance) is ``flock`` on
``instance.lock`` in the checked run directory: no other user can open that
file, and the kernel drops the lock when the process dies, however it dies,
so a crash never leaves a stale lock. A second supervisor of the same
instance in another run directory (it would sweep this one's /dev/shm
segments and end its children) is kept out by abstract unix sockets
``@jizhi.instance.<instance>.<pid>.<random>``, released the same way: each
supervisor binds its own, then refuses if a process of its user holds
another of the instance. Abstract names have no owner and anyone may bind
any of them, so names held by other users' processes are never obeyed.
"""
import errno
import fcntl
import os
import secrets
import socket
import stat
from pathlib import Path

import msgpack

from jizhi.errors import RunDirError

LOCK_NAME = "instance.lock"


def _who(uid):
    try:
        import pwd
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def _writable_by_others(st):
    return st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _unsafe_above(path, euid):
    """Why a user other than ``euid`` or root could replace ``path`` (by a directory above it), or None."""
    p = Path(os.path.abspath(path))
    for q in reversed(p.parents):
        if q == p:
            continue
        st = os.stat(q)
        if st.st_uid not in (0, euid):
            return f"{q} above it belongs to {_who(st.st_uid)}"
        if _writable_by_others(st) and not st.st_mode & stat.S_ISVTX:
            return f"{q} above it is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}, not sticky)"
    for q in [*reversed(p.parents), p][1:]:
        st = os.lstat(q)
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (0, euid):
            return f"{q} is a symbolic link that belongs to {_who(st.st_uid)}"
    return None


def prepare(path):
    """Create the run directory (mode 0700), or check an existing one; raises RunDirError with the reason."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    except OSError as e:
        raise RunDirError(f"run directory {path}: {e.strerror} ({e.filename or path})") from None
    return _accept(path)


# The unix sockets jizhid binds in the run directory (the longest name counts: a socket path holds 107 bytes).
SOCKET_NAMES = ("backend.ipc", "control.ipc")
SUN_PATH_MAX = 107


def check(path):
    """What ``prepare`` would refuse, creating nothing (``jizhid --check-config``): raises RunDirError with
    the reason; a directory that does not exist yet is judged by the nearest one above it that does."""
    path = Path(path)
    if os.path.lexists(path):
        _accept(path)
        return
    euid = os.geteuid()
    where = f"run directory {path}"
    above = Path(os.path.abspath(path)).parent
    while not os.path.lexists(above):
        above = above.parent
    try:
        why = _unsafe_above(above, euid)
        st = os.stat(above)
    except OSError as e:
        raise RunDirError(f"{where}: {e.strerror} ({e.filename or above})") from None
    if not why and st.st_uid not in (0, euid):
        why = f"{above} above it belongs to {_who(st.st_uid)}"
    if not why and _writable_by_others(st) and not st.st_mode & stat.S_ISVTX:
        why = f"{above} above it is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}, not sticky)"
    if why:
        raise RunDirError(f"{where}: {why} (another user could replace what jizhid writes there; "
                          "choose a run directory only this user and root can write, e.g. --run-dir)")
    if not os.path.isdir(above) or not os.access(above, os.W_OK | os.X_OK):
        raise RunDirError(f"{where}: cannot be created: {above} is not a directory this user may write")
    _socket_paths(path)


def _socket_paths(path):
    longest = len(os.fsencode(os.path.join(path, max(SOCKET_NAMES, key=len))))     # as the sockets name it
    if longest > SUN_PATH_MAX:
        raise RunDirError(f"run directory {path}: its socket paths would be {longest} bytes, over the "
                          f"{SUN_PATH_MAX} a unix socket allows; choose a shorter --run-dir")


def _accept(path):
    """The checks of an existing run directory; returns its real path."""
    euid = os.geteuid()
    where = f"run directory {path}"
    try:
        real = Path(os.path.realpath(path))
        why = _unsafe_above(path, euid) or _unsafe_above(real, euid)
        if why:
            raise RunDirError(f"{where}: {why} (another user could replace what jizhid writes there; "
                              "choose a run directory only this user and root can write, e.g. --run-dir)")
        st = os.stat(real)
    except OSError as e:
        raise RunDirError(f"{where}: {e.strerror} ({e.filename or path})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise RunDirError(f"{where}: not a directory")
    if st.st_uid != euid:
        raise RunDirError(f"{where}: it belongs to {_who(st.st_uid)}, not to this user ({_who(euid)}); "
                          "another user created it first: remove it, or choose another --run-dir")
    if _writable_by_others(st):
        raise RunDirError(f"{where}: group or others may write it (mode {stat.S_IMODE(st.st_mode):04o}); "
                          "another user could replace its files: chmod go-w it, or choose another --run-dir")
    _socket_paths(path)
    return real


def open_new(path, mode=0o600):
    """A new file at ``path``, opened for binary writing: whatever had the name is removed first, and
    the file is created exclusively, so nothing is written through a symbolic link."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    return os.fdopen(fd, "wb")


def write_file(path, data, mode=0o600):
    """Replace ``path`` with ``data`` atomically: a temporary ``.<name>.tmp`` beside it (``open_new``),
    then a rename over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open_new(tmp, mode) as f:
        f.write(data)
    os.replace(tmp, path)


def read_plan(path):
    """The run's plan file (msgpack, written by the supervisor with ``write_file``): what the broker and
    every worker are started with."""
    with open(path, "rb") as f:
        return msgpack.unpackb(f.read(), raw=False, strict_map_key=False)


class InstanceBusy(Exception):
    """Another live supervisor holds this instance name."""


class InstanceLock:
    """The supervisor's hold on its instance: ``flock`` in the run directory, and an abstract name.

    The abstract name is ``@jizhi.instance.<instance>.<pid>.<random>``: nobody can bind it first. A
    second supervisor of the instance (in another run directory) binds its own, then looks for any
    other name of the instance held by a process of this user; names held by other users' processes
    mean nothing (abstract names have no owner: anyone may bind any name).
    """

    def __init__(self, run_dir, instance):
        busy = (f"another jizhid is running instance {instance!r} on this host "
                "(stop it, or choose another --instance)")
        self.sock = None
        self.fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.close()
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise InstanceBusy(busy) from None
            raise
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.bind(f"\0{ABSTRACT_PREFIX}{instance}.{os.getpid()}.{secrets.token_hex(8)}")
        other = instance_holder(instance, exclude=os.fstat(self.sock.fileno()).st_ino)
        if other is not None:
            self.close()
            raise InstanceBusy(f"{busy}; pid {other} holds it") from None

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


ABSTRACT_PREFIX = "jizhi.instance."


def instance_holder(instance, exclude=None):
    """The pid of a process of this user that holds an abstract socket of ``instance`` (its name is
    ``@jizhi.instance.<instance>``, or that followed by ``.<pid>.<random>``), other than the socket
    inode ``exclude``; None when there is none. Processes this user may not look into are not this
    user's (the kernel lets a user read only its own processes' descriptors, root all of them)."""
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    inodes = set()
    for fields in (line.split() for line in lines):
        if len(fields) >= 8 and fields[7].startswith("@" + ABSTRACT_PREFIX) and \
                fields[7][1 + len(ABSTRACT_PREFIX):].split(".")[0] == instance and int(fields[6]) != exclude:
            inodes.add(f"socket:[{fields[6]}]")
    return socket_holder(inodes, same_user=True)


def socket_holder(inodes, same_user=False):
    """The pid of a process holding one of the sockets ``inodes`` ({"socket:[N]"}), or None: a scan of
    /proc/*/fd. The kernel lets a user read only its own processes' descriptors (root all of them);
    ``same_user`` also skips, as root, every process of another user."""
    if not inodes:
        return None
    euid = os.geteuid()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if same_user and os.stat(f"/proc/{d}").st_uid != euid:
                continue
            fds = os.listdir(f"/proc/{d}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{d}/fd/{fd}") in inodes:
                    return int(d)
            except OSError:
                continue
    return None
