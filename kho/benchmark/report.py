"""Benchmark results as JSON documents and markdown tables, and the results index.

A JSON document (:func:`document`) is ``{"schema": SCHEMA, "kind": ..., "machine":
machine_info(), "config": {...}, "results": ...}`` with ``kind`` one of :data:`KINDS`:

* ``encodings``: ``results`` is a list of points (:func:`kho.benchmark.encodings.run_point`);
* ``reboot``: ``results`` is :func:`kho.benchmark.reboot.run_reboot`'s dict;
* ``scale``: ``results`` is :func:`kho.benchmark.scale.run_scale`'s dict;
* ``sizes``: ``results`` is :func:`kho.benchmark.design.design_sizes`'s dict.

:func:`load` reads one back, refusing other schemas or kinds (KHOError EINVAL).  The
markdown functions return GitHub-flavoured tables; :func:`write_index` writes a results
directory's ``README.md`` from the documents it holds.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from kho.benchmark.design import BUDGET as DESIGN_BUDGET
from kho.benchmark.environment import machine_info
from kho.errors import KHOError
from kho.files import read_bounded, write_atomic
from kho.sizes import format_size

SCHEMA = "kho-bench/1"
KINDS = ("encodings", "reboot", "scale", "sizes")
#: Largest result document read back.
MAX_DOCUMENT_BYTES = 1 << 30
#: File names in a results directory, by kind (JSON; the markdown and plots share the stem).
FILES = {"sizes": "sizes.json", "encodings": "encodings.json", "reboot": "reboot.json", "scale": "scale.json"}


# -- JSON ---------------------------------------------------------------------------------
def document(kind: str, config: dict, results) -> dict:
    """A JSON-ready result document recording the machine it ran on."""
    if kind not in KINDS:
        raise KHOError("EINVAL", f"unknown result kind {kind!r} (one of {', '.join(KINDS)})")
    return {"schema": SCHEMA, "kind": kind, "machine": machine_info(), "config": config, "results": results}


def dump(doc: dict, path: str) -> None:
    """Write ``doc`` as indented JSON at ``path`` (atomically: :func:`kho.files.write_atomic`)."""
    write_atomic(path, json.dumps(doc, indent=1) + "\n")


def load(path: str, kind: str | None = None) -> dict:
    """A document written by :func:`dump`; KHOError(EINVAL) when it is not JSON, has another
    schema, or (with ``kind``) another kind.  OSError when unreadable; a regular file of at
    most :data:`MAX_DOCUMENT_BYTES`, checked before it is read (:func:`kho.files.read_bounded`)."""
    try:
        doc = json.loads(read_bounded(path, MAX_DOCUMENT_BYTES, "result document"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KHOError("EINVAL", f"{path}: not JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise KHOError("EINVAL", f"{path}: not a {SCHEMA} document")
    if kind is not None and doc.get("kind") != kind:
        raise KHOError("EINVAL", f"{path}: a {doc.get('kind')!r} document, not {kind!r}")
    return doc


# -- formatting (sizes: kho.sizes.format_size) -------------------------------------------
def fmt_s(seconds: float | None) -> str:
    """Seconds with three significant digits, or ``-``."""
    if seconds is None:
        return "-"
    return f"{seconds:.3g}"


def table(headers: Sequence[str], rows: Sequence[Sequence], right: Sequence[bool] | None = None) -> str:
    """A markdown table; ``right[i]`` right-aligns column ``i`` (default: every column but the first)."""
    right = right if right is not None else [i > 0 for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if r else ":---" for r in right) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# -- encodings ----------------------------------------------------------------------------
def measured(points: Sequence[dict]) -> list[dict]:
    """The points that ran (not those recorded with an ``error``)."""
    return [p for p in points if "error" not in p]


def skipped_lines(points: Sequence[dict]) -> str:
    """A markdown list of the points that could not run, with the reason ('' when none)."""
    return "".join(f"- {p['pattern']}, {p['share']:.0%} of {format_size(p['ram_bytes'])}: {p['error']}\n"
                   for p in points if "error" in p)


def _path_s(enc: dict, path: str) -> float | None:
    return enc["paths"][path]["rebuild_s"] if path in enc["paths"] else None


def _point_label(p: dict) -> tuple[str, str, str]:
    return p["pattern"], format_size(p["ram_bytes"]), f"{p['share']:.0%}"


def encodings_table(points: Sequence[dict]) -> str:
    """One row per point and encoding: bytes, times, rebuild on each path, reserve calls, orders."""
    headers = ["pattern", "RAM", "share", "units", "encoding", "bytes", "B/page", "encode s", "decode s",
               "rebuild s (memblock)", "rebuild s (instr.)", "memblock_reserve", "orders", "handover"]
    rows = []
    for p in measured(points):
        for e in p["encodings"]:
            mb = e["paths"].get("memblock")
            rows.append([*_point_label(p), f"{p['units']:,}", e["encoding"], format_size(e["total_bytes"]),
                         f"{e['bytes_per_page']:.3g}", fmt_s(e["encode_s"]), fmt_s(e["decode_s"]),
                         fmt_s(_path_s(e, "memblock")), fmt_s(_path_s(e, "instructions")),
                         f"{mb['memblock_reserve_calls']:,}" if mb else "-",
                         "kept" if e["orders_survive"] else "lost", _handover_note(e)])
    return table(headers, rows, [False, True, True, True, False] + [True] * 7 + [False, False])


def _handover_note(e: dict) -> str:
    if e["handover"] in (None, "ok"):
        return "one-page FDT" if e["fdt_fits_page"] else "FDT > 1 page"
    return e["handover"].split(":")[0]


def _best(encs: Sequence[dict], key) -> str:
    scored = [(key(e), e["encoding"]) for e in encs]
    scored = [(v, n) for v, n in scored if v is not None]
    if not scored:
        return "-"
    value, name = min(scored)
    return f"{name} ({value:.3g})" if isinstance(value, float) else f"{name} ({format_size(value)})"


def winners_table(points: Sequence[dict]) -> str:
    """Per point: the smallest map, the fastest encode and decode, the fastest free-list
    rebuild on any path, and the smallest map that keeps the folio orders."""
    headers = ["pattern", "RAM", "share", "smallest", "smallest keeping orders", "fastest encode s",
               "fastest decode s", "fastest rebuild s"]
    rows = []
    for p in measured(points):
        encs = p["encodings"]

        def rebuild(e):
            times = [v["rebuild_s"] for v in e["paths"].values()]
            return min(times) if times else None

        rows.append([*_point_label(p), _best(encs, lambda e: e["total_bytes"]),
                     _best([e for e in encs if e["orders_survive"]], lambda e: e["total_bytes"]),
                     _best(encs, lambda e: e["encode_s"]), _best(encs, lambda e: e["decode_s"]), _best(encs, rebuild)])
    return table(headers, rows, [False, True, True, False, False, False, False, False])


# -- reboot -------------------------------------------------------------------------------
def reboot_table(results: dict) -> str:
    """One row per RAM, image and mode (and linear map for MMU on)."""
    headers = ["RAM", "image", "mode", "linear map", "relocation s", "reboot s", "speedup", "memory cost", "held"]
    rows = [[format_size(r["ram_bytes"]), format_size(r["image_bytes"]), r["mode"], r["linear_map"] or "-",
             fmt_s(r["relocation_s"]), fmt_s(r["total_s"]), f"{r['speedup_vs_mmu_off']:.2f}x",
             format_size(r["memory_bytes"]), r["lifetime"]] for r in results["rows"]]
    return table(headers, rows, [True, True, False, False, True, True, True, True, False])


def simulated_table(results: dict) -> str:
    """The simulated reboots against the model."""
    headers = ["RAM", "image", "mode", "model reboot s", "simulated reboot s", "bytes relocated", "host s", "result"]
    rows = []
    for s in results["simulated"]:
        if "error" in s:
            rows.append([format_size(s["ram_bytes"]), format_size(s["image_bytes"]), s["mode"], fmt_s(s["model_total_s"]),
                         "-", "-", "-", s["error"].split(":")[0] + ": does not fit"])
        else:
            rows.append([format_size(s["ram_bytes"]), format_size(s["image_bytes"]), s["mode"], fmt_s(s["model_total_s"]),
                         fmt_s(s["total_s"]), format_size(s["bytes_relocated"]), fmt_s(s["host_s"]),
                         "verified" if s["ok"] else "FAILED"])
    return table(headers, rows, [True, True, False, True, True, True, True, False])


# -- scale --------------------------------------------------------------------------------
def scale_table(results: dict) -> str:
    """One row per encoding of the scale run."""
    headers = ["encoding", "bytes", "generate s", "preserve_many s", "encode s", "decode s", "encode+decode s",
               "peak RSS through decode", "targets"]
    rows = []
    for r in results["results"]:
        if "error" in r:
            rows.append([r["encoding"], "-", "-", "-", "-", "-", "-", "-", f"failed: {r['error']}"])
            continue
        e, v = r["encoding"], r["verdict"]
        if v["held"]:
            ok = v["within_time"] and v["within_memory"]
            target = "met" if ok else ("too slow" if not v["within_time"] else "too much memory")
        else:
            target = "(not held)"
        rows.append([e["encoding"], format_size(e["total_bytes"]), fmt_s(r["generate_s"]), fmt_s(r["preserve_s"]),
                     fmt_s(e["encode_s"]), fmt_s(e["decode_s"]), fmt_s(v["encode_decode_s"]),
                     format_size(v["peak_rss_bytes"]), target])
    return table(headers, rows, [False] + [True] * 7 + [False])


def limits(results: dict) -> str:
    """A markdown list saying, from the measurements, what limits each encoding not held to
    the targets: its bytes against the smallest held encoding's, whether its root FDT fits
    the kernel's one page, whether a handover could be built, its orders, time and memory."""
    done = [r for r in results["results"] if "error" not in r]
    held = [r["encoding"]["total_bytes"] for r in done if r["verdict"]["held"]]
    lines = []
    for r in done:
        e, v = r["encoding"], r["verdict"]
        if v["held"]:
            continue
        parts = [f"{format_size(e['total_bytes'])} ({e['total_bytes'] / DESIGN_BUDGET:,.1f}x the design discussion's "
                 f"512 KiB" + (f", {e['total_bytes'] / min(held):,.0f}x the smallest held map)" if held else ")")]
        if e["fdt_bytes"] > 8:
            parts.append(f"{format_size(e['fdt_bytes'])} inside the root FDT, which then needs at least "
                         f"{format_size(e['fdt_min_bytes'])} "
                         f"({'fits' if e['fdt_fits_page'] else 'the kernel builds it in one 4 KiB page'})")
        if e["handover"] not in (None, "ok"):
            parts.append(f"no handover: {e['handover']}")
        if not e["orders_survive"]:
            parts.append("folio orders lost")
        parts.append(f"encode + decode {v['encode_decode_s']:.3g} s, peak RSS {format_size(v['peak_rss_bytes'])}")
        lines.append(f"- **{e['encoding']}**: " + "; ".join(parts))
    for r in results["results"]:
        if "error" in r:
            lines.append(f"- **{r['encoding']}**: failed: {r['error']}")
    return "\n".join(lines) + ("\n" if lines else "")


def scale_boot_table(results: dict) -> str:
    """The next kernel's boot paths in the scale run (children started with ``boot``)."""
    headers = ["encoding", "path", "rebuild s", "deserialize s", "free lists s", "memblock_reserve",
               "peak RSS with the boot"]
    rows = []
    for r in results["results"]:
        if "error" in r:
            continue
        if r["encoding"]["handover"] not in (None, "ok"):
            rows.append([r["encoding"]["encoding"], "-", "-", "-", "-", "-", f"no handover: {r['encoding']['handover']}"])
        for path, v in r["encoding"]["paths"].items():
            rows.append([r["encoding"]["encoding"], path, fmt_s(v["rebuild_s"]), fmt_s(v["deserialize_s"]),
                         fmt_s(v["free_lists_s"]), f"{v['memblock_reserve_calls']:,}", format_size(r["peak_rss_bytes"])])
    return table(headers, rows, [False, False] + [True] * 5)


# -- sizes (the design discussion's) ------------------------------------------------------------
def sizes_table(sizes: dict) -> str:
    """Each design-discussion size next to what kho computed."""
    b, ri, rr, pk, mp = (sizes[k] for k in ("bitmaps_16g", "ranges_isolated", "ranges_random", "packed_512k", "maple_node"))
    rows = [
        ["512 KiB of order-0 bitmaps covers 16 GiB",
         f"{format_size(b['ram_bytes'])}, every page preserved: {b['page']['bitmaps']} x {b['page']['bitmap_bytes_each']} B "
         f"= {format_size(b['page']['bytes'])} ({b['linux_6_16']['bitmaps']:,} x {b['linux_6_16']['bitmap_bytes_each']} B "
         f"= {format_size(b['linux_6_16']['bytes'])} with Linux 6.16's bitmaps)"],
        ["16 GiB of random order-0 pages as 16-byte pairs, none neighbours: 64 MiB",
         f"{ri['ranges']:,} ranges x {ri['range_bytes']} B = {format_size(ri['bytes'])}"],
        ["merging neighbours, 16 GiB random in 64 GiB: about 48 MiB, 3.1 M ranges",
         f"{rr['ranges']:,} ranges = {rr['bytes']:,} B ({format_size(rr['bytes'])}, {rr['bytes'] / 1e6:.1f} MB)"],
        ["512 KiB of packed 8-byte ranges = 65k ranges = only 256 MiB of random 4 KiB pages",
         f"{pk['full']['ranges']:,} isolated pages ({format_size(pk['full']['preserved_bytes'])}) fill "
         f"{format_size(pk['full']['bytes'])} of chunks ({pk['entries_without_headers']:,} entries without the "
         f"{pk['chunk_header_bytes']}-byte chunk headers); one more page needs {format_size(pk['one_more']['bytes'])}"],
        ["maple tree node: 256 bytes, 16 slots, 15 pivots",
         f"{mp['node_bytes']} B, {mp['slots']} slots, {mp['pivots']} pivots; {mp['units']:,} isolated pages: "
         f"{mp['nodes']:,} nodes, height {mp['height']}, {format_size(mp['bytes'])} of pages"],
    ]
    return table(["the design discussion's sizes", "computed by kho"], rows, [False, False])


# -- documents as markdown ------------------------------------------------------------------
def machine_line(doc: dict) -> str:
    """One line naming the machine, versions and date of a document."""
    m = doc["machine"]
    ram = f", {format_size(m['ram_bytes'])} RAM" if m.get("ram_bytes") else ""
    return (f"Measured on {m['cpu']} ({m['cores']} cores{ram}), {m['os']}, Python {m['python']}, numpy {m['numpy']}, "
            f"kho {m['kho']}, {m['date']}.")


def markdown(doc: dict) -> str:
    """A whole document as markdown: a title, the machine line and its tables."""
    kind, res = doc["kind"], doc["results"]
    parts = []
    if kind == "encodings":
        runs = sorted({p["runs"] for p in measured(res)})
        parts += [f"# Encodings benchmark\n\n{machine_line(doc)}  Median of {', '.join(map(str, runs))} run(s); "
                  "seconds are wall clock.  *rebuild* is the next kernel's deserialize + free-list stages.\n",
                  "## Winners\n\n" + winners_table(res), "## Every point\n\n" + encodings_table(res)]
        if skipped_lines(res):
            parts.append("## Points that could not run\n\n" + skipped_lines(res))
    elif kind == "reboot":
        parts += [f"# Reboot benchmark\n\n{machine_line(doc)}  Profile {res['profile']['name']}, purgatory checks "
                  f"{'on' if res['checks'] else 'off'}; times are modelled.\n", reboot_table(res)]
        if res["simulated"]:
            parts.append("## Simulated reboots against the model\n\n" + simulated_table(res))
    elif kind == "scale":
        parts += [f"# Scale run: {format_size(res['ram_bytes'])} RAM, {format_size(res['preserved_bytes'])} of random order-0 "
                  f"pages\n\n{machine_line(doc)}  Each encoding in its own process; peak RSS from getrusage.\n",
                  scale_table(res)]
        if limits(res):
            parts.append("## What limits the others\n\n" + limits(res))
        if any(r.get("encoding", {}).get("paths") for r in res["results"] if "error" not in r):
            parts.append("## Next kernel\n\n" + scale_boot_table(res))
    else:
        parts += [f"# The design discussion's sizes, computed\n\n{machine_line(doc)}\n", sizes_table(res)]
    return "\n".join(parts)


def write_index(directory: str) -> str:
    """Write ``README.md`` in ``directory`` indexing the documents there (with their
    markdown and plots) and return its path."""
    lines = ["# Benchmark results\n", "Written by `python bench/run_all.py` (and `python bench/bench_scale.py`); "
             "every figure comes from running kho.\n"]
    for kind, name in FILES.items():
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            continue
        doc = load(path, kind)
        stem = os.path.splitext(name)[0]
        lines.append(f"## {kind}\n\n{machine_line(doc)}\n")
        lines.append(f"- [`{name}`]({name}) (JSON), [`{stem}.md`]({stem}.md) (tables)")
        for png in sorted(f for f in os.listdir(directory) if f.startswith(stem + "_") and f.endswith(".png")):
            lines.append(f"- [`{png}`]({png})")
        lines.append("")
        if kind == "sizes":
            lines.append(sizes_table(doc["results"]))
        elif kind == "scale":
            lines.append(scale_table(doc["results"]))
    path = os.path.join(directory, "README.md")
    write_atomic(path, "\n".join(lines))
    return path
