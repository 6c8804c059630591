"""Publishing a model version into a watched model directory (``jizhictl publish``), paced.

Runs offline, beside a serving jizhid, never in a serving process. What the
README's recipe does with ``cp -r`` and ``mv`` (docs/formats.md, "Publishing a
version"), done so that it can be paced (jizhi/priority.py): the version
directory is copied into ``<models>/.incoming/`` by ``copy_file_range`` in
chunks of ``CHUNK`` bytes, so that every system call is short and a paced
process is stopped between two of them, then renamed into place. ``cp`` and
``shutil.copyfile`` copy a whole file in one ``copy_file_range`` or
``sendfile``: a stop waits for its end. Every file is flushed to disk before
the rename: a crash leaves the old state or the whole version, never a part.
"""
import errno
import os
import shutil

from jizhi.bundle import Bundle
from jizhi.errors import BundleError

CHUNK = 1 << 20     # bytes per system call


def copy_file(src, dst, chunk_done=None):
    """Copy ``src`` to the new file ``dst``, ``CHUNK`` bytes per system call (``chunk_done()`` after
    each); flushed to disk. Returns the bytes copied.

    ``os.copy_file_range`` copies inside the kernel (what ``cp`` does, a whole file per call); bounded
    to a chunk, every call is short and a stop lands between two. Where the kernel cannot
    (another filesystem on an old kernel, a filesystem without it), one read into a buffer and one
    write per chunk."""
    done = 0
    with open(src, "rb", buffering=0) as fi, open(dst, "xb", buffering=0) as fo:
        fin, fout = fi.fileno(), fo.fileno()
        size = os.fstat(fin).st_size
        try:
            while done < size:
                n = os.copy_file_range(fin, fout, min(CHUNK, size - done), done, done)
                if not n:
                    break
                done += n
                if chunk_done is not None:
                    chunk_done()
        except OSError as e:
            if done or e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while True:
                n = fi.readinto(buf)
                if not n:
                    break
                w = 0
                while w < n:        # (a raw write may write less than asked)
                    w += fo.write(view[w:n])
                done += n
                if chunk_done is not None:
                    chunk_done()
        os.fsync(fout)
    return done


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_abandoned(incoming, prefix):
    """Remove the staged copies ``<prefix><pid>`` of publishers that died (SIGKILL, a crash) before
    their rename."""
    for name in os.listdir(incoming):
        pid = name[len(prefix):]
        if name.startswith(prefix) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(incoming, name), ignore_errors=True)


def publish_version(src, models_dir, progress=None):
    """Copy the version directory ``src`` into ``<models_dir>/.incoming/`` and rename it to
    ``<models_dir>/<name>/<version>`` (name and version from its manifest); return that path.

    Before anything is copied, the manifest must parse (``Bundle``) and every file it lists must exist
    with its listed size (BundleError names the first that does not; the sha256 is the server's
    validation's to check). Every file under ``src`` is copied, as ``cp -r`` would (a symbolic link
    as the file it points to). ``progress(label, total)``: a progress bar
    (``jizhi.ctl.progress.ProgressBar``-like) advanced once per chunk (MiB), or None. Raises
    FileExistsError when the version exists already; a failed copy leaves nothing behind.
    """
    bundle = Bundle(src)
    src = os.fspath(src)
    for entry in bundle.files:
        path = os.path.join(src, entry["path"])
        try:
            size = os.path.getsize(path)
        except OSError:
            raise BundleError(f"{path}: listed in the manifest, missing")
        if size != entry["size"]:
            raise BundleError(f"{path}: {size} bytes, the manifest lists {entry['size']}")
    models_dir = os.fspath(models_dir)
    model_dir = os.path.join(models_dir, bundle.name)
    final = os.path.join(model_dir, str(bundle.version))
    if os.path.lexists(final):
        raise FileExistsError(final)
    files = []
    for root, _, names in os.walk(src):
        for name in sorted(names):
            full = os.path.join(root, name)
            files.append((os.path.relpath(full, src), os.path.getsize(full)))
    # The manifest last: a version directory is one once its manifest is there (docs/formats.md).
    files.sort(key=lambda f: f[0] == "manifest.toml")
    bar = None if progress is None else progress(
        f"{bundle.name}/{bundle.version}, MiB", sum(-(-size // CHUNK) for _, size in files))
    incoming = os.path.join(models_dir, ".incoming")
    os.makedirs(incoming, exist_ok=True)
    _remove_abandoned(incoming, f"{bundle.name}.{bundle.version}.")
    staged = os.path.join(incoming, f"{bundle.name}.{bundle.version}.{os.getpid()}")
    os.mkdir(staged)
    try:
        for rel, _ in files:
            target = os.path.join(staged, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            copy_file(os.path.join(src, rel), target, None if bar is None else bar.advance)
        for root, dirs, _ in os.walk(staged, topdown=False):
            _fsync_dir(root)
        os.makedirs(model_dir, exist_ok=True)
        if os.path.lexists(final):
            raise FileExistsError(final)
        os.rename(staged, final)
        _fsync_dir(model_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return final
