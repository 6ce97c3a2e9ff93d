"""The NF4 decode matmul's register decode (kernels/nf4.py nf4_register_decode): PTX that only a GPU
runs, so its text is executed here by a small interpreter of the six PTX instructions it uses, with
their semantics as the PTX ISA defines them (prmt's default mode: byte selectors in c[4i+3:4i], bit 3
replicating the selected byte's sign; lop3's truth table over 0xF0, 0xCC, 0xAA), on every byte value
at every position of the packed register, for bf16 and fp16 tables. The Triton interpreter runs the
same kernel with the table-in-memory decode (tests/test_nf4_ops.py); the compiled GPU code is read in
tests/test_kernels_compile.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from abs_fast.kernels.nf4 import nf4_register_decode
from abs_fast.quant.nf4 import NF4_CODE

MASK = 0xFFFFFFFF


def _prmt(a, b, c):
    source = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = np.zeros_like(a)
    for i in range(4):
        selector = (c >> (4 * i)) & 0xF
        byte = np.choose(selector & 7, source)
        byte = np.where(selector & 8, np.where(byte & 0x80, 0xFF, 0), byte)
        out |= byte << (8 * i)
    return out


def _lop3(a, b, c, lut):
    out = np.zeros_like(a)
    for index in range(8):
        if lut >> index & 1:
            term = (a if index & 4 else ~a) & (b if index & 2 else ~b) & (c if index & 1 else ~c)
            out |= term & MASK
    return out


def run_ptx(asm: str, registers: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Execute the straight-line PTX block `asm` on int64 arrays holding 32-bit values."""
    body = asm.strip()
    assert body.startswith("{") and body.endswith("}"), "one scoped block"
    regs = dict(registers)
    for raw in body[1:-1].strip().splitlines():
        line = raw.strip().rstrip(";")
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dest, *args = (part.strip() for part in rest.split(","))

        def value(arg):
            return np.int64(int(arg, 0) & MASK) if arg[0].isdigit() else regs[arg]

        if op == "mov.b32":
            result = value(args[0]) + np.zeros_like(regs["$4"])
        elif op == "shr.b32":
            result = value(args[0]) >> int(args[1])
        elif op == "shl.b32":
            result = (value(args[0]) << int(args[1])) & MASK
        elif op == "and.b32":
            result = value(args[0]) & value(args[1])
        elif op == "or.b32":
            result = value(args[0]) | value(args[1])
        elif op == "prmt.b32":
            result = _prmt(value(args[0]), value(args[1]), value(args[2]))
        elif op == "lop3.b32":
            result = _lop3(value(args[0]), value(args[1]), value(args[2]), int(args[3], 0))
        else:
            raise AssertionError(f"the interpreter does not know {op!r}: teach it before trusting the test")
        regs[dest] = result & MASK
    return regs


def _inputs() -> np.ndarray:
    # every byte value at every position, and random words
    k = np.arange(256, dtype=np.int64)
    walk = k | ((k * 7 + 1) % 256) << 8 | ((k * 13 + 2) % 256) << 16 | ((k * 31 + 3) % 256) << 24
    rotated = [(walk << (8 * s) | walk >> (32 - 8 * s)) & MASK for s in range(4)]
    rng = np.random.default_rng(0)
    return np.concatenate([*rotated, rng.integers(0, 2**32, 4096, dtype=np.int64)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_the_register_decode_gives_every_bytes_two_code_values(dtype):
    bits = (NF4_CODE.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF).tolist()
    asm, words = nf4_register_decode(bits)
    packed = _inputs()
    registers = {"$4": packed}
    for slot, word in zip((5, 9, 13, 17), words, strict=True):  # pack=4: four slots per 32-bit operand
        for i in range(4):
            registers[f"${slot + i}"] = np.full_like(packed, word & MASK)
    out = run_ptx(asm, registers)
    table = np.array(bits, dtype=np.int64)
    byte = [(packed >> (8 * i)) & 0xFF for i in range(4)]
    high = [table[b >> 4] for b in byte]
    low = [table[b & 0xF] for b in byte]
    for reg, (first, second) in (("$0", (high[0], high[1])), ("$1", (high[2], high[3])),
                                 ("$2", (low[0], low[1])), ("$3", (low[2], low[3]))):
        want = first | second << 16  # the lower byte's value in the low half
        assert np.array_equal(out[reg], want), (dtype, reg, np.flatnonzero(out[reg] != want)[:5])


def test_the_register_decode_refuses_a_bad_table():
    with pytest.raises(ValueError, match="16 values"):
        nf4_register_decode(list(range(15)))
    with pytest.raises(ValueError, match="16 values"):
        nf4_register_decode([1 << 16] * 16)


def test_the_interpreter_can_fail():
    """A wrong selector in the text is caught: the check does not pass vacuously."""
    bits = (NF4_CODE.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF).tolist()
    asm, words = nf4_register_decode(bits)
    line = next(x for x in asm.splitlines() if x.startswith("prmt.b32 $0,"))
    selector = line.rstrip(";").split(",")[-1].strip()
    broken = asm.replace(line, line.replace(selector, "0x" + selector[2:][::-1]))  # the interleave reversed
    packed = _inputs()
    registers = {"$4": packed, **{f"${s + i}": np.full_like(packed, w & MASK)
                                  for s, w in zip((5, 9, 13, 17), words, strict=True) for i in range(4)}}
    good, bad = run_ptx(asm, registers), run_ptx(broken, registers)
    assert not np.array_equal(good["$0"], bad["$0"])


def test_a_register_decode_that_disagrees_is_dropped_with_one_warning(caplog):
    """On its first CUDA call the decode matmul runs a small problem with the register decode and with
    the table in memory (ops.lora._register_decode); if they disagree it warns once and keeps the
    table. The comparison, with stand-in runs: equal within 2^-7 passes, a wrong decode does not."""
    from abs_fast.ops.lora import NO_REGISTER_DECODE, register_decode_matches

    want = torch.randn(5, 136, generator=torch.Generator().manual_seed(1))
    decode = ("{ asm }", (1, 2, 3, 4))
    caplog.set_level("WARNING", logger="abs_fast")
    assert register_decode_matches(lambda d: want * (1 + 2.0**-9) if d == decode else want, decode, "cuda:0")
    assert not caplog.records
    seen = []
    assert not register_decode_matches(lambda d: seen.append(d) or (want.flip(1) if d == decode else want), decode,
                                       "cuda:0 torch.bfloat16")
    assert seen == [decode, NO_REGISTER_DECODE]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "disagrees" in warnings[0] and "cuda:0 torch.bfloat16" in warnings[0]


def test_the_register_decode_is_for_cuda_16_bit_activations_only():
    from abs_fast.ops.lora import NO_REGISTER_DECODE, _register_decode, nf4_register_decode_for

    assert _register_decode(torch.device("cpu"), torch.bfloat16) == NO_REGISTER_DECODE
    assert nf4_register_decode_for(torch.float32) == NO_REGISTER_DECODE
    asm, words = nf4_register_decode_for(torch.float16)
    assert asm.startswith("{") and len(words) == 4


def test_the_first_call_probe_is_a_valid_decode_problem():
    """The probe the first CUDA call runs twice builds and multiplies a real NF4 problem: here it
    runs on the CPU through the Triton interpreter (table decode) and matches float64."""
    from abs_fast.ops.lora import NO_REGISTER_DECODE, _register_decode_probe
    from abs_fast.quant import NF4Weight

    got = _register_decode_probe(torch.device("cpu"), torch.float32, NO_REGISTER_DECODE)
    gen = torch.Generator(device="cpu").manual_seed(0)
    weight = NF4Weight.quantize(torch.randn(136, 512, generator=gen))
    x = torch.randn(5, 512, generator=gen)
    want = x.double() @ weight.dequantize(torch.float64).T
    assert got.shape == (5, 136)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)
