"""Codec throughput against its peers, measured in the same run.

For each code (k, m), on ``k * P`` bytes of data (GB/s are data bytes per
second, 1 GB = 1e9 bytes), encode and decode with ``m`` data pieces lost:

- shardguard ``Codec`` on one thread and on every core;
- pyeclib ``ECDriver.encode/decode`` with ``isa_l_rs_cauchy`` and
  ``liberasurecode_rs_vand``, on the whole buffer and in 1 MiB chunks
  (inputs prepared as ``bytes`` outside the timing; the faster is quoted);
- ISA-L's raw ``ec_encode_data``, one call over the whole pre-faulted pieces
  (the kernel's ceiling on one core), timed in rounds interleaved with ours on
  one thread, so that the ratio the issue asks for (ours >= 0.8x raw) is not
  decided by which of the two a noisy neighbour happened to hit;
- a plain memcpy (``numpy.copyto`` into a pre-faulted buffer) of the data.

Also CRC32C (ours, ISA-L ``crc32_iscsi``) over the same bytes.

Usage: ``python bench/bench_codec.py [--quick] [--size-mib N] [--repeat N]``
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from _common import (base_parser, gbps, interleaved_medians, load_average, median_time, print_table,
                     write_results)
from pyeclib.ec_iface import ECDriver

from shardguard.daemon.coding import _isal
from shardguard.daemon.coding.checksum import crc32c
from shardguard.daemon.coding.codec import Codec, _default_threads
from shardguard.daemon.coding.tables import tables as _tables

logger = logging.getLogger(__name__)

CODES = [(4, 1), (4, 2), (8, 2)]
PEER_CHUNK_BYTES = 1 << 20
BASELINE = "shardguard 1 thread"


def prefaulted(nbytes: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """A buffer whose pages are already mapped, so no timing pays the kernel's page faults."""
    if rng is None:
        return np.zeros(nbytes, dtype=np.uint8) + 0  # "+ 0" writes every page
    return rng.integers(0, 256, nbytes, dtype=np.uint8)


def pieces_of(buf: np.ndarray, count: int, size: int) -> list[np.ndarray]:
    return [buf[i * size : (i + 1) * size] for i in range(count)]


def ours(codec: Codec, data: list[np.ndarray]) -> tuple[Callable[[], None], Callable[[], None],
                                                      Callable[[], None]]:
    """Encode, decode with the first ``m`` data pieces lost, and a check of the decode."""
    m, size = codec.m, data[0].size
    parity = pieces_of(prefaulted(m * size), m, size)
    out = pieces_of(prefaulted(m * size), m, size)
    survivors = {i: p for i, p in enumerate(data + parity) if i >= m}

    def check() -> None:
        assert all(np.array_equal(a, b) for a, b in zip(out, data[:m])), "decode mismatch"

    return (lambda: codec.encode(data, parity),
            lambda: codec.decode(survivors, dict(enumerate(out))), check)


def bench_ours(k: int, m: int, threads: int, data: list[np.ndarray], repeat: int) -> tuple[float, float]:
    with Codec(k, m, threads=threads) as codec:
        enc, dec, check = ours(codec, data)
        times = median_time(enc, repeat), median_time(dec, repeat)
        check()
    return times


def _pyeclib_mode(driver: ECDriver, m: int, blobs: list[bytes], repeat: int) -> tuple[float, float]:
    frags = [driver.encode(b) for b in blobs]
    survivors = [f[m:] for f in frags]  # the first m fragments are data pieces
    assert driver.decode(survivors[0]) == blobs[0], "pyeclib decode mismatch"
    enc = median_time(lambda: [driver.encode(b) for b in blobs], repeat)
    dec = median_time(lambda: [driver.decode(s) for s in survivors], repeat)
    return enc, dec


def bench_pyeclib(k: int, m: int, ec_type: str, data: np.ndarray, repeat: int) -> dict[str, Any]:
    """Whole buffer and 1 MiB chunks; returns both timings and the faster mode."""
    driver = ECDriver(k=k, m=m, ec_type=ec_type)
    whole = data.tobytes()
    chunks = [whole[off : off + PEER_CHUNK_BYTES] for off in range(0, len(whole), PEER_CHUNK_BYTES)]
    modes = {"whole": _pyeclib_mode(driver, m, [whole], repeat), "1MiB": _pyeclib_mode(driver, m, chunks, repeat)}
    return {
        "encode_s": min(t[0] for t in modes.values()),
        "decode_s": min(t[1] for t in modes.values()),
        "encode_mode": min(modes, key=lambda x: modes[x][0]),
        "decode_mode": min(modes, key=lambda x: modes[x][1]),
        "modes": {name: {"encode": e, "decode": d} for name, (e, d) in modes.items()},
    }


def raw_isal(k: int, m: int, data: list[np.ndarray]) -> tuple[Callable[[], None],
                                                              Callable[[], None],
                                                              Callable[[], None]]:
    """One ``ec_encode_data`` call over the whole pieces, on this thread: encode, decode
    with the first ``m`` data pieces lost, and a check of the decode."""
    lib = _isal.load()
    assert lib is not None
    size = data[0].size
    parity = pieces_of(prefaulted(m * size), m, size)
    out = pieces_of(prefaulted(m * size), m, size)

    def call(
        sources: tuple[int, ...], outputs: tuple[int, ...], srcs: list[np.ndarray], dsts: list[np.ndarray]
    ) -> Callable[[], None]:
        tables = _tables(k, m, sources, outputs)
        src = (ctypes.c_void_p * k)(*[a.ctypes.data for a in srcs])
        dst = (ctypes.c_void_p * len(dsts))(*[a.ctypes.data for a in dsts])
        return lambda: lib.ec_encode_data(size, k, len(dsts), tables, src, dst)

    def check() -> None:
        assert all(np.array_equal(a, b) for a, b in zip(out, data[:m])), "raw decode mismatch"

    pieces = data + parity
    return (call(tuple(range(k)), tuple(range(k, k + m)), data, parity),
            call(tuple(range(m, k + m)), tuple(range(m)), pieces[m:], out), check)


def bench_one_core(k: int, m: int, data: list[np.ndarray], repeat: int) -> dict[str, float]:
    """Ours on one thread and the raw kernel, encode and decode, in interleaved rounds."""
    with Codec(k, m, threads=1) as codec:
        o_enc, o_dec, o_check = ours(codec, data)
        r_enc, r_dec, r_check = raw_isal(k, m, data)
        t = interleaved_medians({"ours_enc": o_enc, "raw_enc": r_enc,
                                 "ours_dec": o_dec, "raw_dec": r_dec}, rounds=2 * repeat + 1)
        o_check()
        r_check()
    return t


def bench_code(k: int, m: int, size_mib: int, cores: int, repeat: int, rng: np.random.Generator) -> dict[str, Any]:
    """Every implementation on one code; rows of GB/s."""
    # Pieces of whole pages, as placement makes them.
    piece = (size_mib << 20) // k // 4096 * 4096
    nbytes = k * piece
    buf = prefaulted(nbytes, rng)
    data = pieces_of(buf, k, piece)
    rows: list[dict[str, Any]] = []

    def add(name: str, enc_s: float, dec_s: float | None, **extra: Any) -> None:
        dec = None if dec_s is None else gbps(nbytes, dec_s)
        rows.append({"name": name, "encode": gbps(nbytes, enc_s), "decode": dec, **extra})

    one = bench_one_core(k, m, data, repeat)
    add(BASELINE, one["ours_enc"], one["ours_dec"])
    add(f"shardguard {cores} threads", *bench_ours(k, m, cores, data, repeat))
    for ec_type in ("isa_l_rs_cauchy", "liberasurecode_rs_vand"):
        r = bench_pyeclib(k, m, ec_type, buf, repeat)
        modes = {mode: {op: gbps(nbytes, t) for op, t in v.items()} for mode, v in r["modes"].items()}
        name = f"pyeclib {ec_type} (enc {r['encode_mode']}, dec {r['decode_mode']})"
        add(name, r["encode_s"], r["decode_s"], modes=modes)
    add("ISA-L raw ec_encode_data, 1 call", one["raw_enc"], one["raw_dec"])
    dst = prefaulted(nbytes)
    copy = median_time(lambda: np.copyto(dst, buf), repeat)
    add("memcpy (numpy copyto)", copy, copy)
    add("CRC32C (crc32_iscsi), ours", median_time(lambda: crc32c(buf), repeat), None)
    print_table(rows, BASELINE, columns=["encode", "decode"], title=f"k={k} m={m}, {nbytes / 2**20:.0f} MiB data, GB/s")
    return {"piece_bytes": piece, "data_bytes": nbytes, "gbps": rows}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=None, help="data bytes per code (default 256, quick 32)")
    args = parser.parse_args()
    size_mib = args.size_mib or (32 if args.quick else 256)
    repeat = args.repeat or (3 if args.quick else 5)
    cores = _default_threads()
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {"size_mib": size_mib, "repeat": repeat, "threads_all": cores, "codes": {}}
    # On a shared machine the load says how far to trust the thread scaling.
    results["load_average"] = {"start": load_average()}
    for k, m in CODES:
        results["codes"][f"{k}+{m}"] = bench_code(k, m, size_mib, cores, repeat, rng)
    results["load_average"]["end"] = load_average()
    print(f"\nload average: start {results['load_average']['start']}, end {results['load_average']['end']}")
    write_results("bench_codec" + ("_quick" if args.quick else ""), results)


if __name__ == "__main__":
    main()
