"""daemon/base/allocator.py: with the daemon's malloc settings, 4 MiB buffers freed and
allocated again (ZeroMQ's received frames) reuse pages already faulted in; with glibc's
defaults the freed memory is given back and every byte faults in again."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc's mallopt")

# Rounds of 16 frame buffers written then freed, as frames in flight are: the share of
# their bytes that page-faulted in the last 4 rounds.
_PROBE = textwrap.dedent("""
    import ctypes, resource, sys
    from shardguard.daemon.base.allocator import keep_frame_memory
    if sys.argv[1] == "keep":
        assert keep_frame_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    N = 4 << 20
    def rounds(n):
        for _ in range(n):
            bufs = [libc.malloc(N) for _ in range(16)]
            for b in bufs:
                ctypes.memset(b, 1, N)
            for b in bufs:
                libc.free(b)
    rounds(2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    rounds(4)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * 4096 / (4 * 16 * N))
""")


def _faulted_share(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         timeout=60, check=True)
    return float(out.stdout.strip())


def test_freed_frame_buffers_are_reused_without_faulting_again() -> None:
    assert _faulted_share("keep") < 0.05
    # The same rounds with glibc's defaults fault most bytes in again: the setting, not
    # the pattern, is what keeps them.
    assert _faulted_share("default") > 0.5


def test_it_is_set_once_and_says_so() -> None:
    out = subprocess.run([sys.executable, "-c", "from shardguard.daemon.base.allocator import "
                          "keep_frame_memory as k; print(k(), k())"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["True", "True"]
