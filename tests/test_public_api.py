"""The public API at the top of the package (README "Python API"), used end to end."""

import io

import numpy as np
import pytest

import kho

MiB = 1 << 20


def test_public_names_are_exported():
    for name in ("Machine", "PhysicalMemory", "Tracker", "XArray", "KHO", "Handover", "save_image", "load_image",
                 "get_encoding", "KHOError", "KHOFormatError", "boot"):
        assert name in kho.__all__ and getattr(kho, name) is not None
    assert issubclass(kho.KHOFormatError, kho.KHOError)


def test_preserve_hand_over_save_load_and_boot():
    machine = kho.Machine.boot(512 * MiB, seed=1)
    assert isinstance(machine.memory, kho.PhysicalMemory)
    out = kho.KHO(machine.memory, machine.allocator, "kho-v2")
    assert isinstance(out.tracker, kho.Tracker) and isinstance(out.tracker.orders, kho.XArray)
    folios = machine.allocator.alloc_many(8, 3)
    out.tracker.preserve_many(folios, 3)
    blob = out.add_blob("demo", b"kept across kexec")
    handover = out.finalize()
    assert isinstance(handover, kho.Handover)

    buf = io.BytesIO()
    kho.save_image(buf, handover)
    image = kho.load_image(io.BytesIO(buf.getvalue()))
    decoded = image.decode()
    assert decoded.units() == out.tracker.units()
    assert kho.get_encoding("kho-v2").decode(image.memory, image.kho_fdt().props).units() == decoded.units()

    nk = kho.boot(image.memory, image.boot_dtb)
    assert nk.revived and nk.retrieve_subtree("demo") == blob
    assert image.memory.read(blob, 17) == b"kept across kexec"
    for phys in np.asarray(folios).tolist():
        assert nk.kho.restore_folio(phys) == 3


def test_errors_carry_errno_names():
    machine = kho.Machine.boot(512 * MiB)
    with pytest.raises(kho.KHOError) as err:
        kho.Tracker(machine.memory).preserve_folio(1, 0)  # not page-aligned
    assert err.value.errno_name == "EINVAL"
    with pytest.raises(kho.KHOFormatError) as err:
        kho.load_image(io.BytesIO(b"not a handover"))
    assert err.value.errno_name == "EINVAL" and err.value.field
