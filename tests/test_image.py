"""The handover image file: round trips, compact runs, and every kind of bad file."""

import copy
import io

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kho.currentkernel.machine import Machine
from kho.devicetree import build_boot_dtb
from kho.errors import KHOFormatError
from kho.handover.imagefile import IMAGE_VERSION, image_map, load_image, save_image
from kho.handover.outgoing import KHO

MiB = 1 << 20
PS = 4096


def make_handover(encoding="kho-v2", seed=1, **options):
    m = Machine.boot(512 * MiB, seed=seed)
    kho = KHO(m.memory, m.allocator, encoding, **options)
    folios = m.allocator.alloc_many(40, 2)
    kho.tracker.preserve_many(folios, 2)
    kho.tracker.preserve_many(m.allocator.alloc_many(30, 0), 0)
    m.memory.fill_pattern(int(folios[0]), PS << 2, 11)  # generated data in a preserved folio
    m.memory.write(int(folios[1]) + 100, b"explicit bytes")
    big = m.allocator.alloc_pages(6)  # a generated region with two preserved pages inside
    m.memory.fill_pattern(big, PS << 6, 12)
    kho.tracker.preserve_folio(big + 3 * PS, 0)
    kho.tracker.preserve_folio(big + 9 * PS, 0)
    free_page = m.allocator.alloc_pages(0)  # written but not preserved: not in the image
    m.memory.write(free_page, b"scratchpad")
    blob = kho.add_blob("workload", b"checksums" * 1000)
    return m, kho, kho.finalize(), dict(folios=folios, big=big, free_page=free_page, blob=blob)


@pytest.mark.parametrize("encoding, options", [("kho-v2", {}), ("kho-v1", {}), ("kho-v1", {"bitmap_bytes": 512})])
def test_round_trip(encoding, options, tmp_path):
    m, kho, handover, where = make_handover(encoding, **options)
    path = tmp_path / "x.kho"
    size = save_image(path, handover)
    assert path.stat().st_size == size
    img = load_image(path)
    assert img.encoding == encoding and img.options == handover.options and img.version == IMAGE_VERSION
    assert img.memory.banks == m.memory.banks and img.memory.scratch == m.memory.scratch
    assert img.boot_dtb == handover.boot_dtb()
    assert (img.fdt_phys, img.fdt_size, img.scratch_phys, img.scratch_size) == (
        handover.fdt_phys, handover.fdt_size, handover.scratch_phys, handover.scratch_size)
    assert img.decode().units() == kho.tracker.units()
    assert img.kho_fdt().retrieve_subtree("workload") == where["blob"]
    for phys in handover.pages_to_keep().tolist():
        assert img.memory.read(phys, PS) == m.memory.read(phys, PS)
    folio = int(where["folios"][0])
    assert img.memory.digest(folio, PS << 2) == m.memory.digest(folio, PS << 2)
    assert img.memory.read(int(where["folios"][1]) + 100, 14) == b"explicit bytes"
    for page in (3, 9):
        phys = where["big"] + page * PS
        assert img.memory.read(phys, PS) == m.memory.read(phys, PS)
    assert img.memory.read(where["free_page"], 10) == bytes(10)  # not preserved, not kept
    assert img.memory.read(where["blob"], 9) == b"checksums"


def test_runs_are_compact():
    m, kho, handover, where = make_handover()
    top = image_map(handover)
    pages = sum(len(data) // PS for _, data in top["pages"])
    assert len(top["pages"]) < pages  # consecutive pages share one run
    assert sorted(top["generated"]) == sorted([[int(where["folios"][0]) // PS, 4, 11], [where["big"] // PS + 3, 7, 12]])
    stored = {pfn for pfn, data in top["pages"] for pfn in range(pfn, pfn + len(data) // PS)}
    assert where["free_page"] // PS not in stored
    assert set((handover.pages_to_keep() // PS).tolist()) <= stored


def test_file_objects():
    _, kho, handover, _ = make_handover()
    buf = io.BytesIO()
    save_image(buf, handover)
    assert load_image(io.BytesIO(buf.getvalue())).decode().units() == kho.tracker.units()


# -- bad files ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_map():
    return image_map(make_handover()[2])


def load_map(top):
    return load_image(io.BytesIO(msgpack.packb(top, use_bin_type=True)))


def error_for(top):
    with pytest.raises(KHOFormatError) as err:
        load_map(top)
    return err.value


def edited(base, **changes):
    top = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            del top[key]
        else:
            top[key] = value
    return top


@pytest.mark.parametrize("change, field", [
    (dict(magic="other"), "image.magic"),
    (dict(version=2), "image.version"),
    (dict(version="1"), "image.version"),
    (dict(boot_dtb=None), "image.map"),
    (dict(extra=1), "image.map"),
    (dict(page_size=5000), "image.banks"),
    (dict(banks=[[0, 1000, 0]]), "image.banks"),
    (dict(banks=[[0, "512M", 0]]), "image.banks[0].size"),
    (dict(banks=[[0, 512 * MiB]]), "image.banks[0]"),
    (dict(banks=[[0, -4096, 0]]), "image.banks[0].size"),
    (dict(banks=[[0, True, 0]]), "image.banks[0].size"),
    (dict(banks={}), "image.banks"),
    (dict(scratch=[[0x1000, 0x1000, "global"], [0x1000, 0x2000, "node0"]]), "image.scratch"),
    (dict(scratch=[[0x1000, 0x1000, 7]]), "image.scratch[0].kind"),
    (dict(encoding="no-such-abi"), "image.encoding"),
    (dict(encoding="kho-v2", options={"bitmap_bytes": 512}), "image.encoding"),
    (dict(options={"x": 1.5}), "image.options"),
    (dict(options=[]), "image.options"),
    (dict(fdt=[0x1000, 0]), "image.fdt"),
    (dict(fdt=[1 << 40, 4096]), "image.fdt"),
    (dict(scratch_array=[0x1000]), "image.scratch_array"),
    (dict(boot_dtb="text"), "image.boot_dtb"),
    (dict(boot_dtb=b"\xd0\x0d\xfe\xed" + bytes(60)), "dtb.header.version"),
    (dict(boot_dtb=build_boot_dtb(0x1000, 4096, 0x2000, 48)), "image.boot_dtb"),
    (dict(pages=[[0, b"x" * 100]]), "image.pages[0].data"),
    (dict(pages=[[0, b""]]), "image.pages[0].data"),
    (dict(pages=[[1 << 30, bytes(PS)]]), "image.pages[0]"),
    (dict(pages=[[0, bytes(PS)], [0, bytes(PS)]]), "image.pages[1]"),
    (dict(generated=[[0, 0, 1]]), "image.generated[0].pages"),
    (dict(generated=[[0, 1 << 40, 1]]), "image.generated[0]"),
    (dict(generated=[[5, 2, 1]], pages=[[6, bytes(PS)]]), "image.pages[0]"),
    (dict(generated=[[5, 2, -1]]), "image.generated[0].seed"),
])
def test_malformed_maps(base_map, change, field):
    assert error_for(edited(base_map, **change)).field == field


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x93\x01\x02\x03", msgpack.packb([1, 2]), b"\x81\xa5magic"])
def test_not_an_image(data):
    with pytest.raises(KHOFormatError) as err:
        load_image(io.BytesIO(data))
    assert err.value.field.startswith("image")


def test_every_truncation_fails_cleanly(base_map):
    data = msgpack.packb(base_map, use_bin_type=True)
    for cut in list(range(0, 200, 7)) + list(range(len(data) - 300, len(data), 13)):
        with pytest.raises(KHOFormatError):
            load_image(io.BytesIO(data[:cut]))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_corrupted_bytes_never_crash(base_map, data):
    raw = bytearray(msgpack.packb(base_map, use_bin_type=True))
    for _ in range(data.draw(st.integers(1, 5))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        img = load_image(io.BytesIO(bytes(raw)))
    except KHOFormatError:
        return
    try:  # a loaded image may still carry a damaged handover: the decoders judge it
        img.decode()
    except KHOFormatError:
        pass


def test_a_damaged_handover_still_loads(base_map):
    """load_image checks the container; the KHO FDT itself is the next kernel's business."""
    top = copy.deepcopy(base_map)
    fdt_pfn = top["fdt"][0] // PS
    for run in top["pages"]:
        first, data = run
        if first <= fdt_pfn < first + len(data) // PS:
            offset = (fdt_pfn - first) * PS
            run[1] = data[:offset] + bytes(PS) + data[offset + PS:]
    img = load_map(top)
    with pytest.raises(KHOFormatError) as err:
        img.kho_fdt()
    assert err.value.field == "fdt.header.magic"
