"""Resource usage read from compiled GPU binaries (no GPU, no disassembly, no text parsing).

Triton learns registers and spills from the CUDA/HIP driver when it loads a kernel, which needs a
GPU. Ahead of time we read the same facts from the binaries themselves:

- cubin (NVIDIA ELF): the `.nv.info` section holds per-function attributes (the EIATTR records
  `cuobjdump -res-usage` prints): EIATTR_REGCOUNT (registers per thread) and EIATTR_FRAME_SIZE
  (per-thread local-memory stack frame). A zero frame means no spills. A non-zero frame is
  usually spilling, but libdevice's sin/cos keep a small array there too; the binary does not
  say which, so then `ptxas_spills` asks ptxas (`-v`) for the spill-store bytes of that PTX.
- hsaco (AMD ELF): the NT_AMDGPU_METADATA note is a msgpack map whose `amdhsa.kernels` entries
  carry `.vgpr_count`, `.sgpr_count`, `.agpr_count`, `.vgpr_spill_count`, `.sgpr_spill_count`
  and `.private_segment_fixed_size` (scratch bytes per lane).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

__all__ = ["Usage", "elf_sections", "cubin_usage", "hsaco_usage", "msgpack_loads", "ptxas_spills"]


@dataclass(frozen=True)
class Usage:
    registers: int  # per thread (AMD: VGPRs + AGPRs)
    stack_bytes: int  # NVIDIA: local-memory stack frame per thread; AMD: scratch per lane
    spills: int | None  # NVIDIA: spill-store bytes (None: unknown yet); AMD: spilled registers
    sgprs: int | None = None  # AMD scalar registers


def elf_sections(blob: bytes) -> dict[str, bytes]:
    """Section name -> contents of a little-endian ELF64 file."""
    if blob[:4] != b"\x7fELF" or blob[4] != 2:
        raise ValueError("not an ELF64 binary")
    shoff = struct.unpack_from("<Q", blob, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", blob, 0x3A)
    headers = []
    for i in range(shnum):
        fields = struct.unpack_from("<IIQQQQIIQQ", blob, shoff + i * shentsize)
        headers.append((fields[0], fields[1], fields[4], fields[5]))  # name, type, offset, size
    str_off = headers[shstrndx][2]
    out = {}
    for name_off, sh_type, offset, size in headers:
        end = blob.index(b"\0", str_off + name_off)
        name = blob[str_off + name_off : end].decode()
        out[name] = b"" if sh_type == 8 else blob[offset : offset + size]  # 8: NOBITS
    return out


_EIATTR_FRAME_SIZE = 0x11
_EIATTR_REGCOUNT = 0x2F


def _nv_attributes(data: bytes) -> list[tuple[int, bytes]]:
    """(attribute, payload) records of an `.nv.info` section."""
    out, i = [], 0
    while i + 2 <= len(data):
        fmt, attr = data[i], data[i + 1]
        if fmt == 0x04:  # EIFMT_SVAL: u16 size, then payload
            size = struct.unpack_from("<H", data, i + 2)[0]
            out.append((attr, data[i + 4 : i + 4 + size]))
            i += 4 + size
        elif fmt in (0x02, 0x03):  # EIFMT_BVAL / EIFMT_HVAL: a 2-byte value
            out.append((attr, data[i + 2 : i + 4]))
            i += 4
        else:  # EIFMT_NVAL: no value
            out.append((attr, b""))
            i += 2
    return out


def cubin_usage(cubin: bytes) -> Usage:
    """Registers and stack frame of the (single) kernel in a Triton cubin."""
    info = elf_sections(cubin).get(".nv.info", b"")
    regs, frame = None, 0
    for attr, payload in _nv_attributes(info):
        if attr == _EIATTR_REGCOUNT and len(payload) == 8:
            regs = struct.unpack_from("<II", payload)[1]
        elif attr == _EIATTR_FRAME_SIZE and len(payload) == 8:
            frame = max(frame, struct.unpack_from("<II", payload)[1])
    if regs is None:
        raise ValueError("cubin has no EIATTR_REGCOUNT record in .nv.info")
    return Usage(registers=regs, stack_bytes=frame, spills=0 if frame == 0 else None)


def hsaco_usage(hsaco: bytes) -> Usage:
    """VGPRs/AGPRs, SGPRs and spills of the (single) kernel in a Triton hsaco."""
    note = elf_sections(hsaco).get(".note", b"")
    meta = None
    i = 0
    while i + 12 <= len(note):
        namesz, descsz, note_type = struct.unpack_from("<III", note, i)
        desc = i + 12 + _align4(namesz)
        if note[i + 12 : i + 12 + namesz].rstrip(b"\0") == b"AMDGPU" and note_type == 32:
            meta = msgpack_loads(note[desc : desc + descsz])
        i = desc + _align4(descsz)
    if not meta or not meta.get("amdhsa.kernels"):
        raise ValueError("hsaco has no NT_AMDGPU_METADATA note with amdhsa.kernels")
    k = meta["amdhsa.kernels"][0]
    spills = k.get(".vgpr_spill_count", 0) + k.get(".sgpr_spill_count", 0)
    return Usage(
        registers=k[".vgpr_count"] + k.get(".agpr_count", 0),
        stack_bytes=k.get(".private_segment_fixed_size", 0),
        spills=spills,
        sgprs=k.get(".sgpr_count"),
    )


def ptxas_spills(ptx: str, capability: int, fp_fusion: bool = True) -> int:
    """Spill-store bytes of a kernel, from running Triton's own ptxas with `-v` on its PTX (the
    flags Triton's make_cubin uses). Only needed when the cubin has a non-zero stack frame."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/k.ptx"
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2"]
        cmd += [] if fp_fusion else ["--fmad=false"]
        cmd += [f"--gpu-name={sm_arch_from_capability(capability)}", src, "-o", f"{tmp}/k.o"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    found = re.findall(r"(\d+) bytes spill stores", log)
    if not found:
        raise ValueError(f"ptxas -v printed no spill figures:\n{log[-2000:]}")
    return max(int(n) for n in found)


def _align4(n: int) -> int:
    return (n + 3) & ~3


def msgpack_loads(data: bytes) -> Any:
    """Decode the msgpack subset AMD metadata uses (maps, arrays, strings, ints, bools)."""
    value, _ = _unpack(data, 0)
    return value


def _unpack(d: bytes, i: int) -> tuple[Any, int]:
    b = d[i]
    if b <= 0x7F:
        return b, i + 1
    if b >= 0xE0:
        return b - 0x100, i + 1
    if 0x80 <= b <= 0x8F:
        return _map(d, i + 1, b & 0x0F)
    if 0x90 <= b <= 0x9F:
        return _array(d, i + 1, b & 0x0F)
    if 0xA0 <= b <= 0xBF:
        n = b & 0x1F
        return d[i + 1 : i + 1 + n].decode(), i + 1 + n
    fixed = {0xC0: None, 0xC2: False, 0xC3: True}
    if b in fixed:
        return fixed[b], i + 1
    ints = {0xCC: "B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: "b", 0xD1: ">h", 0xD2: ">i"}
    ints |= {0xD3: ">q", 0xCA: ">f", 0xCB: ">d"}
    if b in ints:
        size = struct.calcsize(ints[b])
        return struct.unpack_from(ints[b], d, i + 1)[0], i + 1 + size
    sized = {0xD9: ("B", "str"), 0xDA: (">H", "str"), 0xDB: (">I", "str")}
    sized |= {0xC4: ("B", "bin"), 0xC5: (">H", "bin"), 0xC6: (">I", "bin")}
    sized |= {0xDC: (">H", "array"), 0xDD: (">I", "array"), 0xDE: (">H", "map")}
    sized |= {0xDF: (">I", "map")}
    if b not in sized:
        raise ValueError(f"msgpack type byte {b:#x} at {i} is not supported")
    fmt, kind = sized[b]
    n = struct.unpack_from(fmt, d, i + 1)[0]
    j = i + 1 + struct.calcsize(fmt)
    if kind == "str":
        return d[j : j + n].decode(), j + n
    if kind == "bin":
        return bytes(d[j : j + n]), j + n
    return _array(d, j, n) if kind == "array" else _map(d, j, n)


def _map(d: bytes, i: int, n: int) -> tuple[dict, int]:
    out = {}
    for _ in range(n):
        k, i = _unpack(d, i)
        v, i = _unpack(d, i)
        out[k] = v
    return out, i


def _array(d: bytes, i: int, n: int) -> tuple[list, int]:
    out = []
    for _ in range(n):
        v, i = _unpack(d, i)
        out.append(v)
    return out, i
