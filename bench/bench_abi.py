"""Benchmark of the kernel ABIs: serialize (encode) and decode 4,194,304 random order-0 units
(16 GiB preserved in a 64 GiB machine) with kho-v1 (page and 512-byte bitmaps) and kho-v2.

As bench/bench_tracker.py, the machine has no scratch area by default, so the set spans all
of RAM as in the design discussion; ``--scratch`` boots it with ``kho_scratch=200%`` instead.

Targets (issue 3): at most 0.5 s to encode and 0.5 s to decode, for each ABI.  Prints the
best of ``--repeat`` runs and the metadata written (kho-v1 with page bitmaps: 512 bitmaps
plus 3 chunk pages).

    python bench/bench_abi.py [--ram 64G] [--preserve 16G] [--repeat 3] [--scratch] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

from kho.currentkernel.machine import Machine
from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.tracker import Tracker
from kho.encodings import get_encoding
from kho.memory.physical import PhysicalMemory
from kho.sizes import parse_size

CASES = [
    ("kho-v1", {"bitmap_bytes": "page"}, "page"),
    ("kho-v1", {"bitmap_bytes": 512}, 4096),
    ("kho-v2", {}, "page"),
]


def run_case(name: str, options: dict, preserve_bits, ram: int, preserve: int, repeat: int, seed: int, scratch: bool) -> dict:
    if scratch:
        machine = Machine.boot(ram, seed=seed)
        memory, allocator = machine.memory, machine.allocator
    else:
        memory = PhysicalMemory.single_bank(ram)
        allocator = PageAllocator(memory, seed=seed)
    tracker = Tracker(memory, preserve_bits)
    tracker.preserve_many(allocator.alloc_many(preserve // memory.page_size, 0), 0)
    encoding = get_encoding(name, memory.page_size, **options)
    encode_s, decode_s = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        encoded = encoding.encode(tracker, allocator)
        encode_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        decoded = encoding.decode(memory, encoded.props)
        decode_s.append(time.perf_counter() - start)
        assert len(decoded) == len(tracker)
        for phys in encoded.metadata_pages.tolist():  # give the pages back for the next round
            allocator.free_pages(phys, 0)
            memory.discard(phys, memory.page_size)
    return {
        "encoding": name, "options": options, "units": len(tracker),
        "metadata_pages": int(encoded.metadata_pages.size), "metadata_bytes": encoded.metadata_bytes,
        "encode_s": min(encode_s), "decode_s": min(decode_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ram", type=parse_size, default=parse_size("64G"))
    parser.add_argument("--preserve", type=parse_size, default=parse_size("16G"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scratch", action="store_true", help="boot the machine with kho_scratch=200%%")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = [run_case(n, o, pb, args.ram, args.preserve, args.repeat, args.seed, args.scratch) for n, o, pb in CASES]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{args.preserve >> 30} GiB of random order-0 pages in {args.ram >> 30} GiB ({results[0]['units']:,} units), best of {args.repeat}")
    print(f"{'encoding':<26}{'metadata pages':>16}{'metadata bytes':>16}{'encode s':>10}{'decode s':>10}")
    for r in results:
        label = r["encoding"] + "".join(f" {k}={v}" for k, v in r["options"].items())
        print(f"{label:<26}{r['metadata_pages']:>16,}{r['metadata_bytes']:>16,}{r['encode_s']:>10.3f}{r['decode_s']:>10.3f}")


if __name__ == "__main__":
    main()
