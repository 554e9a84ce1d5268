import pytest

from kho.currentkernel.scratch import ScratchSpec, kernel_regions, place_scratch
from kho.errors import KHOError
from kho.memory.physical import Bank, PhysicalMemory
from kho.sizes import memparse, parse_size


@pytest.mark.parametrize("text,value", [("4096", 4096), ("0x1000", 4096), ("64M", 64 << 20), ("16GiB", 16 << 30),
                                        ("1T", 1 << 40), ("512KB", 512 << 10), ("2k", 2048), (" 8G ", 8 << 30)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "1X", "1.5G", "-1", "1GG", "0x"])
def test_parse_size_rejects(text):
    with pytest.raises(KHOError):
        parse_size(text)


def test_memparse_like_the_kernel():
    assert memparse("16M,") == (16 << 20, 3)
    assert memparse("0x10k") == (16 << 10, 5)
    assert memparse("010") == (8, 3)  # leading 0: octal
    assert memparse("x") == (0, 0)


def test_scratch_spec_parse():
    assert ScratchSpec.parse("150%").scale == 150
    spec = ScratchSpec.parse("16M,512M,256M")
    assert (spec.scale, spec.lowmem, spec.global_, spec.pernode) == (0, 16 << 20, 512 << 20, 256 << 20)
    assert ScratchSpec.parse("0,1G,0").global_ == 1 << 30


@pytest.mark.parametrize("text", ["", "%", "12345678901%", "x%", "1.5%", "16M", "16M,1G", "16M,1G,2G,", "0,0,0", "1G;2G;3G", "-1%"])
def test_scratch_spec_rejects(text):
    with pytest.raises(KHOError) as info:
        ScratchSpec.parse(text)
    assert info.value.errno_name == "EINVAL"


def test_default_scratch_is_200_percent_of_kernel_reserved():
    m = PhysicalMemory.single_bank(8 << 30)
    regions = kernel_regions(m, 32 << 20)
    reserved = sum(r.size for r in regions)
    areas = place_scratch(m, ScratchSpec(), regions)
    kinds = [a.kind for a in sorted(areas, key=lambda a: a.kind)]
    assert kinds == ["global", "lowmem", "node0"]
    by = {a.kind: a for a in areas}
    low_reserved = 32 << 20  # the image is below 4 GiB, the memmap above
    assert by["lowmem"].size == 2 * low_reserved
    assert by["lowmem"].size + by["global"].size == 2 * reserved
    assert by["node0"].size == 2 * reserved
    assert by["lowmem"].end <= 4 << 30
    for a in areas:
        assert a.addr % (2 << 20) == 0
        for r in regions:
            assert a.end <= r.phys or a.addr >= r.phys + r.size
    assert m.scratch == tuple(sorted(areas, key=lambda a: a.addr))


def test_explicit_sizes_and_per_node_areas():
    m = PhysicalMemory([Bank(0, 2 << 30, 0), Bank(4 << 30, 2 << 30, 1)])
    areas = place_scratch(m, ScratchSpec.parse("16M,64M,3M"), kernel_regions(m))
    by = {a.kind: a for a in areas}
    assert by["lowmem"].size == 16 << 20 and by["global"].size == 64 << 20
    assert by["node0"].size == 4 << 20 and by["node1"].size == 4 << 20  # per-node rounded to 2 MiB
    assert by["node0"].end <= 2 << 30 and by["node1"].addr >= 4 << 30


def test_scratch_that_cannot_fit():
    m = PhysicalMemory.single_bank(256 << 20)
    with pytest.raises(KHOError) as info:
        place_scratch(m, ScratchSpec.parse("1G,0,0"), kernel_regions(m))
    assert info.value.errno_name == "ENOMEM"
