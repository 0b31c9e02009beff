"""Intel ISA-L, located and opened through ctypes: the one loader for every side.

The library is the copy the pyeclib wheel bundles (``pyeclib.libs/libisal*.so*``),
else the system ``libisal``; :data:`ENV_LIBRARY` names another or turns it off. Each
side declares the entry points it needs on what this module opens: CRC32C
(:mod:`shardguard.proto.crc32c`, used by the daemon and by the client's restore) and
the daemon's erasure codec (``daemon/coding/_isal.py``). ctypes calls into a ``CDLL``
drop the GIL.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fnmatch
import functools
import importlib.metadata
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from shardguard.proto.errors import CodecError

logger = logging.getLogger(__name__)

#: Environment override: a path to the ISA-L shared library to load, or
#: ``none`` to disable ISA-L (forces the fallbacks, e.g. in tests).
ENV_LIBRARY = "SHARDGUARD_ISAL_LIBRARY"

_LIB_GLOB = "libisal*.so*"

#: ISA-L takes lengths as C ``int``; callers split larger buffers.
MAX_CALL_BYTES = 1 << 30

_T = TypeVar("_T")


def open_cdll(path: str) -> ctypes.CDLL:
    """The shared library at ``path``.

    Raises:
        CodecError: it cannot be loaded.
    """
    try:
        return ctypes.CDLL(path)
    except OSError as exc:
        raise CodecError(f"cannot use ISA-L library {path}: {exc}") from exc


def _pyeclib_candidates() -> Iterator[str]:
    """ISA-L copies shipped inside the installed pyeclib distribution."""
    try:
        for f in importlib.metadata.files("pyeclib") or ():
            if fnmatch.fnmatch(f.name, _LIB_GLOB):
                yield str(f.locate())
    except importlib.metadata.PackageNotFoundError:
        return
    # Installs without a RECORD (some system packages) still keep the
    # auditwheel folder next to the package.
    spec = importlib.util.find_spec("pyeclib")
    if spec is not None and spec.origin is not None:
        libs = Path(spec.origin).resolve().parent.parent / "pyeclib.libs"
        if libs.is_dir():
            yield from (str(p) for p in sorted(libs.glob(_LIB_GLOB)))


def candidate_paths() -> Iterator[str]:
    """Where ISA-L may be, best first: pyeclib's bundled copy, then the system one.

    Lazily: the system library is looked up only when no bundled copy was taken
    (``ctypes.util.find_library`` runs ldconfig and gcc, about 0.3 s on the first
    checksum of every trainer and daemon when it ran unasked).
    """
    seen = set()
    for path in _pyeclib_candidates():
        if path not in seen:
            seen.add(path)
            yield path
    system = ctypes.util.find_library("isal")
    if system and system not in seen:
        yield system


def find(open_library: Callable[[str], _T], what: str) -> _T | None:
    """The first ISA-L that ``open_library`` accepts (it raises CodecError for one that
    lacks what it needs); ``None`` when none does or :data:`ENV_LIBRARY` turns ISA-L off.

    Raises:
        CodecError: :data:`ENV_LIBRARY` names a library that cannot be used.
    """
    forced = os.environ.get(ENV_LIBRARY)
    if forced is not None:
        if forced.strip().lower() in ("", "none", "0", "off"):
            logger.info("ISA-L disabled by %s (%s)", ENV_LIBRARY, what)
            return None
        return open_library(forced)
    for path in candidate_paths():
        try:
            lib = open_library(path)
        except CodecError as exc:
            logger.warning("skipping ISA-L candidate: %s", exc)
            continue
        logger.debug("using ISA-L from %s for %s", path, what)
        return lib
    logger.warning("no ISA-L library found; %s falls back to a slow path", what)
    return None


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (and has enabled), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()
