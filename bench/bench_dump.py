"""Benchmark of reading handovers out of memory dumps (issue 13): open + find + decode.

Cases, each measured in a fresh subprocess (wall time of ``open_dump`` + ``handover()`` +
reading every sub-node blob, and the child's peak RSS, ``VmHWM``):

- ``zstd``: the shared 512 MiB Linux 7.3 dump, ``mem-stage1.raw.zst`` as it is;
- ``raw``: the same, decompressed to a temporary (non-sparse) raw file first (page cache
  warm: the file was just written);
- ``sparse-64g``: a 64 GiB sparse raw file holding a handover kho wrote on a 64 GiB machine
  (``--units`` random order-0 pages preserved, a blob sub-node), planted at its addresses;
- ``zstd-64g`` (with ``--zstd-64g``; minutes): that file zstd-compressed (level 1), opened:
  the one decompression pass over 64 GiB bounds it;
- ``kdump-zlib``, ``kdump-lzo``: the shared dump's non-zero pages as kdump-compressed vmcores
  (kho's writer, as ``makedumpfile -c -d 1`` / ``-l -d 1`` lay them out: every page dumped,
  the zero pages sharing one stored page);
- ``kdump-64g``: the 64 GiB machine as a kdump-compressed vmcore (zlib): 16,777,216 page
  descriptors, the scan reading every one.

The shared cases are skipped when ``../shared`` is absent.  ``--json`` prints the results
as JSON; ``--out DIR`` also writes ``DIR/dump.json`` and ``DIR/dump.md``.

Run: ``python bench/bench_dump.py [--units N] [--tmp DIR] [--json] [--out bench/results]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zstandard

from kho.currentkernel.machine import Machine
from kho.benchmark.scale import peak_rss
from kho.dumps import open_dump
from kho.dumps.writers import write_kdump, write_raw
from kho.memory.physical import PhysicalMemory
from kho.files import write_atomic
from kho.handover.outgoing import KHO

SHARED_DUMP = Path(__file__).resolve().parents[2] / "shared" / "realkernel" / "linux-7.3-x86_64" / "mem-stage1.raw.zst"
GIB = 1 << 30


def measure(path: str) -> dict:
    """Open, find, decode (in this process); the figures of that."""
    start = time.perf_counter()
    with open_dump(path) as dump:
        found = dump.handover()
        blob_bytes = sum(len(n.data or b"") for n in found.subnodes)
        elapsed = time.perf_counter() - start
        return {"format": dump.format, "description": dump.description, "seconds": round(elapsed, 3),
                "peak_rss_mib": round(peak_rss() / 2**20, 1),
                "ram_bytes": dump.memory.ram_size, "scanned_bytes": dump.scan().scanned_bytes,
                "fdt_phys": found.fdt_phys, "compatible": found.compatible, "units": len(found.decoded),
                "radix_pages": int(found.decoded.metadata_pages.size), "subnodes": len(found.subnodes),
                "blob_bytes": blob_bytes}


def run_child(case: str, path: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", path], capture_output=True, text=True, check=True)
    return {"case": case, **json.loads(out.stdout)}


def decompress(src: Path, dst: str) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        zstandard.ZstdDecompressor().copy_stream(fin, fout, write_size=8 << 20)


def plant_64g(units: int) -> PhysicalMemory:
    """A 64 GiB machine's memory holding a finalized handover: ``units`` random order-0 pages and a blob."""
    m = Machine.boot(64 * GIB, seed=7)
    kho = KHO(m.memory, m.allocator, "kho-v2")
    kho.tracker.preserve_many(np.sort(m.allocator.alloc_many(units, 0)), 0)
    kho.add_blob("bench", b"kho dump benchmark" * 100)
    kho.finalize()
    return m.memory


def nonzero_pages(path: Path) -> PhysicalMemory:
    """A dump's non-zero pages copied into a :class:`PhysicalMemory` with its RAM."""
    with open_dump(path) as dump:
        out = PhysicalMemory(dump.memory.banks, dump.page_size)
        for bank in dump.memory.banks:
            for phys in range(bank.start, bank.end, 64 * dump.page_size):
                data = dump.memory.read(phys, min(64 * dump.page_size, bank.end - phys))
                pages = np.frombuffer(data, np.uint8).reshape(-1, dump.page_size)
                for k in np.flatnonzero(pages.any(axis=1)).tolist():
                    out.write(phys + k * dump.page_size, pages[k].tobytes())
    return out


def markdown(results: list[dict]) -> str:
    lines = ["# Reading handovers from memory dumps (bench/bench_dump.py)", "",
             "Open + find + decode, each in a fresh process; peak RSS is the process's `VmHWM`.", "",
             "| case | dump | seconds | peak RSS (MiB) | scanned | units | radix pages |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['case']} | {r['description']} | {r['seconds']} | {r['peak_rss_mib']} | "
                     f"{r['scanned_bytes'] / 2**20:.0f} MiB | {r['units']} | {r['radix_pages']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--units", type=int, default=1 << 20, help="order-0 pages preserved in the 64 GiB dump")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the temporary dumps go")
    parser.add_argument("--zstd-64g", action="store_true", help="also the 64 GiB dump zstd-compressed (minutes)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    results = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        if SHARED_DUMP.is_file():
            results.append(run_child("zstd", str(SHARED_DUMP)))
            raw = os.path.join(tmp, "mem-stage1.raw")
            decompress(SHARED_DUMP, raw)
            results.append(run_child("raw", raw))
            os.unlink(raw)
            shared = nonzero_pages(SHARED_DUMP)
            for kind in ("zlib", "lzo"):
                vmcore = os.path.join(tmp, f"mem-stage1.kdump-{kind}")
                write_kdump(shared, vmcore, compression=kind)
                results.append(run_child(f"kdump-{kind}", vmcore))
                os.unlink(vmcore)
            del shared
        sparse = os.path.join(tmp, "sparse-64g.raw")
        memory = plant_64g(args.units)
        write_raw(memory, sparse)
        results.append(run_child("sparse-64g", sparse))
        vmcore = os.path.join(tmp, "sparse-64g.kdump")
        write_kdump(memory, vmcore, compression="zlib")
        del memory
        results.append(run_child("kdump-64g", vmcore))
        os.unlink(vmcore)
        if args.zstd_64g:
            compressed = sparse + ".zst"
            with open(sparse, "rb") as fin, open(compressed, "wb") as fout:
                zstandard.ZstdCompressor(level=1).copy_stream(fin, fout, size=os.path.getsize(sparse), read_size=16 << 20)
            os.unlink(sparse)
            results.append(run_child("zstd-64g", compressed))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out / "dump.json", json.dumps(results, indent=1) + "\n")
        write_atomic(args.out / "dump.md", markdown(results))
    print(json.dumps(results, indent=1) if args.json else markdown(results))


if __name__ == "__main__":
    main()
