"""Files and directories where other users can reach: create, replace, open and check them
without following a planted symlink and without trusting another user's file.

/dev/shm and /tmp are writable by everyone (sticky), a tier directory may be shared: a name
there is predictable, so another user can plant a symlink or a file of their own at it.
Hence every file the daemon writes there is made here, one way: a fresh name opened with
``O_CREAT | O_EXCL | O_NOFOLLOW`` (random suffix for a temporary), ``fchmod`` on the
descriptor, then ``rename`` over the final name. ``rename`` replaces the directory entry
and never follows a link, so what was planted at either name is replaced, never written
through. A file is read back (adopted) only when it is a regular file of this user, opened
with ``O_NOFOLLOW``. Directories are trusted only when this user or root owns them and no
one else can write to them (a root-owned sticky directory such as /tmp or /dev/shm aside,
where no one can remove or rename another's entries). Both the daemon and the client use
this module, which is why it lives in ``proto``.
"""

from __future__ import annotations

import errno
import os
import pwd
import re
import secrets
import stat

from shardguard.proto.errors import UnsafePathError

TMP_SUFFIX = ".tmp"
#: A temporary name made by :func:`temp_path`: ``<final name>.<16 hex digits>.tmp``.
_TMP_RE = re.compile(r"\.[0-9a-f]{16}\.tmp$")
_TRUSTED_UIDS = frozenset({0})


def owner(uid: int) -> str:
    """``"alice (uid 1001)"``, or ``"uid 1001"`` for an unknown uid."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _trusted(uid: int) -> bool:
    return uid == os.geteuid() or uid in _TRUSTED_UIDS


def check_dir(path: str) -> None:
    """Refuse a directory this user cannot trust to hold its sockets and files.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafePathError: it is not a directory, another user (not root) owns it or the
            symlink leading to it, or others can write to it (unless it is a root-owned
            sticky directory).
    """
    link = os.lstat(path)
    if stat.S_ISLNK(link.st_mode) and not _trusted(link.st_uid):
        raise UnsafePathError(f"{path} is a symlink made by {owner(link.st_uid)}: not followed")
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{path} is not a directory")
    if not _trusted(st.st_uid):
        raise UnsafePathError(
            f"directory {path} belongs to {owner(st.st_uid)}, not to {owner(os.geteuid())} "
            "or root: what it holds may have been planted; not trusted")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022 and not (mode & stat.S_ISVTX and st.st_uid == 0):
        raise UnsafePathError(
            f"directory {path} is writable by other users (mode {mode:04o}): anyone could "
            f"replace what it holds; not trusted (chmod go-w {path})")


def ensure_dir(path: str, mode: int = 0o700) -> None:
    """Create directory ``path`` (and missing parents) with ``mode`` unless it exists, then
    :func:`check_dir` it: made by another user meanwhile, it is refused all the same."""
    try:
        os.makedirs(path, mode=mode, exist_ok=True)
    except FileExistsError:
        pass  # not a directory (or a dangling link): check_dir says which
    check_dir(path)


def check_socket(path: str) -> None:
    """Refuse a Unix socket another user (not root) owns, or one in an untrusted directory.

    A missing socket or directory passes: connecting to it fails on its own.

    Raises:
        UnsafePathError: the socket would reach a process of another user.
    """
    try:
        check_dir(os.path.dirname(os.path.abspath(path)))
        link = os.lstat(path)
        st = os.stat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(link.st_mode) and not _trusted(link.st_uid):
        raise UnsafePathError(f"socket {path} is a symlink made by {owner(link.st_uid)}: "
                              "not followed")
    if not _trusted(st.st_uid):
        raise UnsafePathError(
            f"socket {path} belongs to {owner(st.st_uid)}, not to {owner(os.geteuid())} or "
            "root: it is not your daemon; refusing to send it anything")


def temp_path(path: str) -> str:
    """A fresh temporary name beside ``path`` (``<path>.<random>.tmp``)."""
    return f"{path}.{secrets.token_hex(8)}{TMP_SUFFIX}"


def is_temp(name: str) -> bool:
    return _TMP_RE.search(name) is not None


def open_new(path: str, flags: int = os.O_RDWR, mode: int = 0o600) -> int:
    """Create ``path``, which must not exist, and return its descriptor (mode set by fchmod,
    whatever the umask). Nothing planted at ``path`` is opened or followed.

    Raises:
        UnsafePathError: something (a file, a symlink) is already there.
    """
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise UnsafePathError(f"{path} already exists ({_describe(path)}); not reused") from None
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_owned(path: str, flags: int = os.O_RDONLY, *, create: bool = False) -> int:
    """Open a regular file of this user (``create``: made 0600 if missing); a symlink is
    not followed.

    Raises:
        FileNotFoundError: nothing is there (and not ``create``).
        UnsafePathError: a symlink, not a regular file, or another user's file.
    """
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # a planted FIFO must not hang us
    try:
        fd = os.open(path, (flags | os.O_CREAT) if create else flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(f"{path} is a symlink ({_describe(path)}): not followed") \
                from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise UnsafePathError(f"{path} cannot be opened ({_describe(path)}): "
                                  f"{exc.strerror}") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{path} is not a regular file ({_describe(path)})")
        if st.st_uid != os.geteuid():
            raise UnsafePathError(f"{path} belongs to {owner(st.st_uid)}, not to "
                                  f"{owner(os.geteuid())}: not trusted")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_owned(path: str) -> bytes:
    """The bytes of a regular file of this user (see :func:`open_owned`)."""
    fd = open_owned(path)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def replace(src: str, dst: str) -> None:
    """``rename(src, dst)``: whatever is at ``dst`` is replaced, never followed.

    Raises:
        UnsafePathError: ``dst`` is another user's entry this user may not replace (a
            sticky directory), or a directory.
    """
    try:
        os.rename(src, dst)
    except (PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        raise UnsafePathError(f"{dst} cannot be replaced ({_describe(dst)}): {exc.strerror}; "
                              "remove it as root, or use another name or prefix") from None


def remove(path: str) -> None:
    """Remove the entry at ``path`` if there is one (a symlink itself, not its target).

    Raises:
        UnsafePathError: another user's entry this user may not remove, or a directory.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except (PermissionError, IsADirectoryError) as exc:
        raise UnsafePathError(f"{path} cannot be removed ({_describe(path)}): {exc.strerror}; "
                              "remove it as root, or use another name or prefix") from None


def write_atomic(path: str, data: bytes, mode: int = 0o600, *, durable: bool = False) -> None:
    """Replace ``path`` by a file holding ``data``, all or nothing (see the module docstring).

    With ``durable`` the file and then its directory are fsynced, so the new content survives
    a crash of the machine. On any failure the temporary file is removed.

    Raises:
        UnsafePathError: see :func:`open_new` and :func:`replace`.
        OSError: the write failed (ENOSPC, ...).
    """
    tmp = temp_path(path)
    fd = open_new(tmp, os.O_WRONLY, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    if durable:
        fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_temps(directory: str, prefix: str) -> list[str]:
    """Remove this user's temporaries (see :func:`temp_path`) whose names start with
    ``prefix``: what a write cut short by a crash left. Returns the paths removed."""
    removed = []
    for name in os.listdir(directory):
        if not name.startswith(prefix) or not is_temp(name):
            continue
        path = os.path.join(directory, name)
        try:
            if os.lstat(path).st_uid != os.geteuid():
                continue
            os.unlink(path)
            removed.append(path)
        except OSError:
            continue  # gone meanwhile, or not ours to remove
    return removed


def _describe(path: str) -> str:
    """What is at ``path``, and whose it is, for an error message."""
    try:
        st = os.lstat(path)
    except OSError:
        return "gone"
    kind = ("a symlink" if stat.S_ISLNK(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode)
            else "a regular file" if stat.S_ISREG(st.st_mode) else "a special file")
    return f"{kind} of {owner(st.st_uid)}"
