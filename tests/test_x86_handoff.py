"""The x86_64 handoff: boot_params with a SETUP_KEXEC_KHO setup_data node, against the real
kernel's kho_data (tests/fixtures/linux-7.3-x86_64/debugfs/setup_data__1)."""

import io
import struct
from pathlib import Path

import numpy as np
import pytest

from kho.abi.setup_data import BOOT_PARAMS_DTYPE, KHO_DATA_DTYPE, SETUP_DATA_DTYPE, SETUP_KEXEC_KHO
from kho.currentkernel.machine import Machine
from kho.devicetree.chosen import ChosenKHO
from kho.errors import KHOError, KHOFormatError
from kho.handover.imagefile import load_image, save_image
from kho.handover.outgoing import KHO
from kho.handover.x86_boot_params import build_params_segment, params_segment_size, read_handoff
from kho.memory.physical import PhysicalMemory
from kho.nextkernel.boot import boot

MiB = 1 << 20
REAL_KHO_DATA = (Path(__file__).parent / "fixtures" / "linux-7.3-x86_64" / "debugfs" / "setup_data__1").read_bytes()


def test_real_kho_data_layout():
    data = np.frombuffer(REAL_KHO_DATA, KHO_DATA_DTYPE)[0]
    assert (int(data["fdt_addr"]), int(data["fdt_size"]), int(data["scratch_addr"]), int(data["scratch_size"])) == (
        0x344000, 0x1000, 0x1D3F0000, 0x30)


def test_params_segment_round_trip_and_real_payload():
    memory = PhysicalMemory.single_bank(512 * MiB)
    chosen = ChosenKHO(0x344000, 0x1000, 0x1D3F0000, 0x30)
    segment = build_params_segment(memory, 0x90000, chosen)
    assert len(segment) == params_segment_size()
    memory.write(0x90000, segment)
    assert read_handoff(memory, 0x90000) == chosen
    params = np.frombuffer(segment[:BOOT_PARAMS_DTYPE.itemsize], BOOT_PARAMS_DTYPE)[0]
    node = int(params["hdr"]["setup_data"]) - 0x90000
    head = np.frombuffer(segment[node:node + 16], SETUP_DATA_DTYPE)[0]
    assert int(head["type"]) == SETUP_KEXEC_KHO and segment[node + 16:] == REAL_KHO_DATA  # byte for byte


def node(next_phys, kind, payload):
    return struct.pack("<QII", next_phys, kind, len(payload)) + payload


@pytest.mark.parametrize("chain, field", [
    ({0x3000: node(0x3000, 1, b"")}, "boot_params.setup_data.next"),  # loops on itself
    ({0x3000: node(1 << 40, 1, b"")}, "boot_params.setup_data.next"),  # leaves RAM
    ({0x3000: node(0, SETUP_KEXEC_KHO, bytes(16))}, "boot_params.setup_data.len"),  # short kho_data
])
def test_bad_chains(chain, field):
    memory = PhysicalMemory.single_bank(64 * MiB)
    params = np.zeros(1, BOOT_PARAMS_DTYPE)
    params["hdr"]["setup_data"] = min(chain)
    memory.write(0x1000, params.tobytes())
    for phys, data in chain.items():
        memory.write(phys, data)
    with pytest.raises(KHOFormatError) as err:
        read_handoff(memory, 0x1000)
    assert err.value.field == field


def test_no_kho_node_is_none():
    memory = PhysicalMemory.single_bank(64 * MiB)
    memory.write(0x1000, np.zeros(1, BOOT_PARAMS_DTYPE).tobytes())
    assert read_handoff(memory, 0x1000) is None


def test_x86_next_kernel_and_image():
    m = Machine.boot(512 * MiB, seed=2)
    kho = KHO(m.memory, m.allocator, arch="x86_64")
    folios = m.allocator.alloc_many(8, 2)
    kho.tracker.preserve_many(folios, 2)
    handover = kho.finalize()
    assert handover.arch == "x86_64"
    buf = io.BytesIO()
    save_image(buf, handover)
    image = load_image(io.BytesIO(buf.getvalue()))
    assert image.arch == "x86_64" and image.boot_params is not None
    assert any(a.addr <= image.boot_params < a.end for a in image.memory.scratch)  # kexec loads it in scratch
    nk = boot(image.memory, **image.boot_args())
    assert nk.revived, nk.messages
    assert sorted(nk.kho.unit_phys.tolist()) == sorted(p for p, _ in kho.tracker.units())
    with pytest.raises(KHOError):
        boot(image.memory, b"dtb", boot_params=image.boot_params)  # one handoff, not both
    with pytest.raises(KHOError):
        KHO(m.memory, m.allocator, arch="riscv64")
