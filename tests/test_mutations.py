"""Mutation properties: real serialized handovers, damaged the ways memory and files get
damaged, must decode to a valid map or raise KHOFormatError — never anything else, never
run away.

Starting points are the fuzz seeds (maps, FDTs, boot DTBs, scratch arrays, image files
written by kho).  Mutations: bit flips, truncation, pointer rewrites (to another node, back
to the root or to the node itself, to 0, misaligned, into scratch, into the hole between
the banks, beyond RAM), duplicated and zeroed pages, and for devicetree blobs edits made
with libfdt (properties set, resized, deleted or NOP-ed, nodes added, header fields
changed); image files are also edited as msgpack maps.  Each input goes through its fuzz
target (both decoding modes, every successful decode checked), under a generous time
limit: a hang is a failure.
"""

import struct
from functools import lru_cache

import libfdt
import msgpack
from fuzz.corpus import seeds
from fuzz.samples import ARENA, ARENA_PAGES, PS, SCRATCH
from fuzz.targets import TARGETS, time_limit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MAP_TARGETS = ["kho-v1", "kho-v2", "ranges-packed", "maple", "instructions"]
BLOB_TARGETS = ["fdt", "chosen"]
#: Pointer values a rewrite may use besides the map's own pointers.
ODD_POINTERS = [0, 8, SCRATCH[0].addr, SCRATCH[1].addr + PS, 20 << 20, 48 << 20, 1 << 52, (1 << 64) - PS]
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LIMIT = 60  # seconds per input: far above any real decode of these sizes


@lru_cache(maxsize=None)
def corpus(target: str) -> tuple[bytes, ...]:
    return tuple(seeds(target))


def flip(data, buf: bytearray) -> None:
    if buf:
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] ^= 1 << data.draw(st.integers(0, 7))


def truncate(data, buf: bytearray) -> None:
    del buf[data.draw(st.integers(0, len(buf))):]


def arena_pointers(buf: bytearray) -> list[int]:
    """Offsets (after the root pointer) of aligned u64s that point into the arena."""
    words = len(buf) // 8
    values = struct.unpack_from(f"<{words}Q", buf) if words else ()
    end = ARENA + ARENA_PAGES * PS
    return [8 * i for i in range(1, words) if ARENA <= values[i] < end]


def rewrite_pointer(data, buf: bytearray) -> None:
    """Point one pointer (or the root) somewhere else: a node of the map, the root, the page
    holding the pointer itself, or an odd address."""
    offsets = arena_pointers(buf)
    at = data.draw(st.sampled_from([0] + offsets)) if len(buf) >= 8 else None
    if at is None:
        return
    targets = [struct.unpack_from("<Q", buf, o)[0] for o in offsets[:64]]
    own_page = ARENA + (at - 8) // PS * PS if at else ARENA
    value = data.draw(st.sampled_from(targets + [ARENA, own_page] + ODD_POINTERS) if targets else st.sampled_from(ODD_POINTERS))
    buf[at:at + 8] = struct.pack("<Q", value % (1 << 64))


def page_count(buf: bytearray) -> int:
    return max(0, (len(buf) - 8) // PS)


def duplicate_page(data, buf: bytearray) -> None:
    pages = page_count(buf)
    if pages >= 2:
        src, dst = data.draw(st.integers(0, pages - 1)), data.draw(st.integers(0, pages - 1))
        buf[8 + dst * PS:8 + (dst + 1) * PS] = buf[8 + src * PS:8 + (src + 1) * PS]


def zero_page(data, buf: bytearray) -> None:
    pages = page_count(buf)
    if pages:
        i = data.draw(st.integers(0, pages - 1))
        buf[8 + i * PS:8 + (i + 1) * PS] = bytes(PS)


MAP_MUTATIONS = [flip, truncate, rewrite_pointer, rewrite_pointer, duplicate_page, zero_page]


def run(target: str, data: bytes) -> None:
    with time_limit(LIMIT):
        TARGETS[target].run(bytes(data))


@settings(SETTINGS, max_examples=250)
@given(target=st.sampled_from(MAP_TARGETS), data=st.data())
def test_damaged_maps(target, data):
    buf = bytearray(data.draw(st.sampled_from(corpus(target))))
    for _ in range(data.draw(st.integers(1, 4))):
        data.draw(st.sampled_from(MAP_MUTATIONS))(data, buf)
    run(target, buf)


# -- devicetree blobs ---------------------------------------------------------------------------

#: What pylibfdt raises on blobs it cannot handle (a non-ASCII property name surfaces as
#: SystemError): the harness then falls back to a bit flip; kho is not under test here.
LIBFDT_ERRORS = (libfdt.FdtException, SystemError, UnicodeError)


def libfdt_edit(data, blob: bytes) -> bytes:
    """One edit of a blob with libfdt.  libfdt trusts what it edits (its property walk can
    fault on a damaged blob), so only a blob passing ``fdt_check_full`` is edited; any other
    gets a bit flip."""
    try:
        if len(blob) < 40 or libfdt.fdt_check_full(bytearray(blob), len(blob)) != 0:
            raise libfdt.FdtException(-libfdt.BADSTRUCTURE)
        fdt = libfdt.Fdt(bytes(blob))
        fdt.resize(len(blob) + 1024)
        nodes, offset, depth = [0], 0, 0
        while True:
            offset, depth = fdt.next_node(offset, depth, quiet=(libfdt.NOTFOUND,))
            if offset < 0:
                break
            nodes.append(offset)
    except LIBFDT_ERRORS:
        buf = bytearray(blob)
        flip(data, buf)
        return bytes(buf)
    node = data.draw(st.sampled_from(nodes))
    props = []
    try:
        prop = fdt.first_property_offset(node, quiet=(libfdt.NOTFOUND,))
        while prop >= 0:
            props.append(fdt.get_property_by_offset(prop).name)
            prop = fdt.next_property_offset(prop, quiet=(libfdt.NOTFOUND,))
    except LIBFDT_ERRORS:
        pass
    names = props + ["compatible", "preserved-memory-map", "fdt", "preserved-data", "blob-size", "linux,kho-fdt",
                     "linux,kho-scratch", "#address-cells", "#size-cells"]
    kind = data.draw(st.sampled_from(["set", "set", "delete", "nop", "node", "totalsize"]))
    try:
        if kind == "set":
            size = data.draw(st.sampled_from([0, 1, 4, 7, 8, 12, 16, 9, 64]))
            value = data.draw(st.binary(min_size=size, max_size=size))
            fdt.setprop(node, data.draw(st.sampled_from(names)), value, quiet=(libfdt.NOSPACE,))
        elif kind == "delete" and props:
            fdt.delprop(node, data.draw(st.sampled_from(props)), quiet=(libfdt.NOTFOUND,))
        elif kind == "nop" and props:
            libfdt.fdt_nop_property(fdt._fdt, node, data.draw(st.sampled_from(props)))
        elif kind == "node":
            fdt.add_subnode(node, data.draw(st.sampled_from(["chosen", "memblock", "x@1", "kho-test"])), quiet=(libfdt.EXISTS,))
        else:
            fdt.pack()
            out = bytearray(fdt.as_bytearray())
            struct.pack_into(">I", out, 4, data.draw(st.sampled_from([0, 39, 40, len(out) - 4, len(out) + 8, 1 << 31])))
            return bytes(out)
        fdt.pack()
    except LIBFDT_ERRORS:
        pass
    return bytes(fdt.as_bytearray())


@SETTINGS
@given(target=st.sampled_from(BLOB_TARGETS), data=st.data())
def test_edited_devicetrees(target, data):
    blob = data.draw(st.sampled_from(corpus(target)))
    for _ in range(data.draw(st.integers(1, 3))):
        step = data.draw(st.sampled_from(["libfdt", "libfdt", "flip", "truncate"]))
        if step == "libfdt":
            blob = libfdt_edit(data, blob)
        else:
            buf = bytearray(blob)
            (flip if step == "flip" else truncate)(data, buf)
            blob = bytes(buf)
    run(target, blob)


@SETTINGS
@given(data=st.data())
def test_damaged_raw_properties(data):
    """The ``ranges`` property and the scratch-area array: flips, truncations, u64 rewrites."""
    target = data.draw(st.sampled_from(["ranges", "scratch-array"]))
    buf = bytearray(data.draw(st.sampled_from(corpus(target))))
    for _ in range(data.draw(st.integers(1, 4))):
        step = data.draw(st.sampled_from(["flip", "truncate", "word", "append"]))
        if step == "word" and len(buf) >= 8:
            at = 8 * data.draw(st.integers(0, len(buf) // 8 - 1))
            buf[at:at + 8] = struct.pack("<Q", data.draw(st.sampled_from(ODD_POINTERS + [PS, 3 * PS, 12 << 20])))
        elif step == "append":
            buf += data.draw(st.binary(max_size=40))
        elif step in ("flip", "truncate"):
            (flip if step == "flip" else truncate)(data, buf)
    run(target, buf)


# -- image files -----------------------------------------------------------------------------------

def edit_image(data, top: dict) -> None:
    """One edit of an image map: a field replaced, removed or retyped, or a page run damaged."""
    key = data.draw(st.sampled_from(sorted(top)))
    kind = data.draw(st.sampled_from(["int", "drop", "type", "pages"]))
    if kind == "drop":
        del top[key]
    elif kind == "type":
        top[key] = data.draw(st.sampled_from([None, 1, "x", b"x", [], {}, [[1, 2, 3]], 1 << 63]))
    elif kind == "pages" and isinstance(top.get("pages"), list) and top["pages"]:
        run_ = top["pages"][data.draw(st.integers(0, len(top["pages"]) - 1))]
        if not (isinstance(run_, list) and len(run_) == 2 and isinstance(run_[1], bytes)):
            return  # an earlier edit already retyped it
        buf = bytearray(run_[1])
        for _ in range(data.draw(st.integers(1, 8))):
            flip(data, buf)
        if data.draw(st.booleans()):
            truncate(data, buf)
        run_[1] = bytes(buf)
    else:
        value = top.get(key)
        if isinstance(value, list) and value and isinstance(value[0], int):
            value[data.draw(st.integers(0, len(value) - 1))] = data.draw(st.sampled_from(ODD_POINTERS + [1, PS, 4 << 20]))
        elif isinstance(value, list) and value and isinstance(value[0], list) and value[0] and isinstance(value[0][0], int):
            value[0][0] = data.draw(st.sampled_from(ODD_POINTERS + [1, PS]))
        else:
            top[key] = data.draw(st.sampled_from([0, 4096, 16384, 1 << 40]))


@SETTINGS
@given(data=st.data())
def test_damaged_images(data):
    raw = data.draw(st.sampled_from(corpus("image")))
    if data.draw(st.booleans()):
        top = msgpack.unpackb(raw, raw=False)
        for _ in range(data.draw(st.integers(1, 3))):
            edit_image(data, top)
        raw = msgpack.packb(top, use_bin_type=True)
    else:
        buf = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 4))):
            data.draw(st.sampled_from([flip, flip, truncate]))(data, buf)
        raw = bytes(buf)
    run("image", raw)
