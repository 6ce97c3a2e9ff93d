"""NF4Weight against bitsandbytes (the reference implementation of the format), on CPU."""

from __future__ import annotations

import pytest
import torch

from abs_fast.model import linear_shapes
from abs_fast.model.tiny import PRESETS
from abs_fast.quant import NF4_CODE, NF4Weight, dynamic_code

bnb_functional = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(300, 70), (129, 67), (256, 512), (33, 7)]  # ragged blocks, odd element counts, one exact fit
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    packed = packed.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)
    return codes[:numel].long()


def assert_same_quantization(ours: NF4Weight, packed: torch.Tensor, state, what: str) -> None:
    """Every byte and statistic bitsandbytes wrote, bit for bit."""
    assert torch.equal(ours.packed, packed.reshape(-1)), f"{what}: packed codes differ"
    if state.nested:
        assert torch.equal(ours.absmax, state.absmax), f"{what}: nested absmax codes differ"
        assert torch.equal(ours.nested_absmax, state.state2.absmax), f"{what}: nested scales differ"
        assert torch.equal(ours.nested_offset, state.offset), f"{what}: offset differs"
        assert torch.equal(ours.nested_code, state.state2.code), f"{what}: dynamic code differs"
    else:
        assert torch.equal(ours.absmax, state.absmax), f"{what}: absmax differs"


def test_quantize_is_bit_identical_to_bitsandbytes_on_random_shapes(rng_seed):
    """120 random shapes (ragged blocks, odd element counts, thousands of blocks so that nested
    blocks of 256 are partial too), every dtype, blocksize 32..256, with and without double
    quantisation: the same bytes as bitsandbytes' quantize_4bit."""
    gen = torch.Generator().manual_seed(rng_seed)
    for case in range(120):
        rows = int(torch.randint(1, 400, (), generator=gen))
        cols = int(torch.randint(1, 300, (), generator=gen))
        dtype = DTYPES[case % 3]
        blocksize = (32, 64, 128, 256)[int(torch.randint(0, 4, (), generator=gen))]
        double_quant = bool(case % 2)
        scale = torch.rand(rows, 1, generator=gen) * 3 + torch.rand((), generator=gen) * 1e-3
        w = (torch.randn(rows, cols, generator=gen) * scale).to(dtype)
        ours = NF4Weight.quantize(w, blocksize=blocksize, double_quant=double_quant)
        packed, state = bnb_functional.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                                     quant_type="nf4")
        assert ours.shape == w.shape and ours.dtype == dtype and ours.blocksize == blocksize
        assert_same_quantization(ours, packed, state, f"case {case}: {rows}x{cols} {dtype} bs={blocksize} "
                                                      f"dq={double_quant}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_quantize_matches_bitsandbytes(shape, blocksize, double_quant, dtype, rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    w = (torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen) * 3).to(dtype)
    ours = NF4Weight.quantize(w, blocksize=blocksize, double_quant=double_quant)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                                 quant_type="nf4")
    assert ours.packed.shape == (packed.numel(),) and ours.packed.dtype == torch.uint8
    assert_same_quantization(ours, packed, state, f"{shape} {dtype}")


def test_a_zero_tail_block_is_stored_as_bitsandbytes_stores_it():
    """A trailing partial block of zeros: bitsandbytes stores its absmax as 1e-38, not 0."""
    w = torch.randn(3, 50)
    w[-1, 14:] = 0  # 150 elements: the last block (128..149) is all zero
    for double_quant in (False, True):
        ours = NF4Weight.quantize(w, blocksize=64, double_quant=double_quant)
        packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=double_quant,
                                                     quant_type="nf4")
        assert_same_quantization(ours, packed, state, f"zero tail dq={double_quant}")


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
def test_degenerate_blocks_match_bitsandbytes(double_quant, rng_seed):
    """All-zero blocks (absmax 0) and blocks with equal absmax (nested absmax 0) are stored as
    bitsandbytes stores them and decode to the same values."""
    gen = torch.Generator().manual_seed(rng_seed)
    w = torch.randn(6, 64, generator=gen)
    w[1] = 0
    w[3:] = w[2]  # rows 2..5 share one absmax
    for weight in (w, w[2:]):  # mixed, then every scale equal
        ours = NF4Weight.quantize(weight, blocksize=64, double_quant=double_quant)
        packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant,
                                                     quant_type="nf4")
        assert_same_quantization(ours, packed, state, f"degenerate dq={double_quant}")
        assert torch.equal(ours.dequantize(torch.float32), bnb_functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("shape", [(300, 70), (129, 67)], ids=["300x70", "129x67"])
def test_dequantize_equals_bitsandbytes_on_the_same_bytes(shape, double_quant, out_dtype, rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    w = torch.randn(shape, generator=gen).to(out_dtype)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=double_quant,
                                                 quant_type="nf4")
    theirs = bnb_functional.dequantize_4bit(packed, state)
    ours = NF4Weight.from_bnb(packed, state).dequantize()
    assert ours.dtype == theirs.dtype == out_dtype
    assert torch.equal(ours, theirs)
    # and the other way: our bytes through bitsandbytes' dequantiser
    mine = NF4Weight.quantize(w, double_quant=double_quant)
    assert torch.equal(bnb_functional.dequantize_4bit(*mine.to_bnb()), mine.dequantize())


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [*SHAPES, (64, 96)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dequantize_is_the_format_definition(shape, out_dtype, rng_seed):
    """code[index] * absmax[flat_index // blocksize] in fp32, cast once. (64, 96) is a shape where
    bitsandbytes 0.50's native CPU dequantiser disagrees with this definition and with its own
    generic path; the bitsandbytes comparisons above avoid such shapes.)"""
    gen = torch.Generator().manual_seed(rng_seed)
    w = torch.randn(shape, generator=gen).to(out_dtype)
    for double_quant in (False, True):
        q = NF4Weight.quantize(w, blocksize=64, double_quant=double_quant)
        absmax = q.absmax if not double_quant else torch.tensor(
            [float(q.nested_code[int(c)]) * float(q.nested_absmax[i // 256]) for i, c in enumerate(q.absmax)],
            dtype=torch.float32) + q.nested_offset
        codes = unpack(q.packed, w.numel())
        expected = torch.tensor([float(NF4_CODE[c]) for c in codes], dtype=torch.float32)
        expected = (expected * absmax.repeat_interleave(64)[: w.numel()]).reshape(shape).to(out_dtype)
        assert torch.equal(q.dequantize(), expected)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_round_trip_error_is_within_half_a_code_gap(shape, rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    w = torch.randn(shape, generator=gen) * 0.05
    q = NF4Weight.quantize(w, blocksize=64, double_quant=False)
    err = (q.dequantize() - w).abs().reshape(-1)
    half_gap = ((NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2).item()  # the widest gap: (1 - 0.7230) / 2
    bound = half_gap * q.absmax.repeat_interleave(64)[: w.numel()] * (1 + 1e-6)
    assert torch.all(err <= bound)
    # nested absmax: off by at most half the widest dynamic-code gap, plus the spacing of the 65536
    # points bitsandbytes rounds through (its table is not an exact nearest-code search), times the
    # 256-block scale
    dq = NF4Weight.quantize(w, blocksize=64, double_quant=True)
    code2 = dynamic_code()
    step = ((code2[1:] - code2[:-1]).max() / 2) + 2 / 65535
    nested_bound = step * dq.nested_absmax.repeat_interleave(256)[: q.absmax.numel()]
    assert torch.all((dq.block_absmax() - q.absmax).abs() <= nested_bound * (1 + 1e-5) + 1e-7)


def test_bits_per_parameter():
    w = torch.randn(1024, 1024)
    assert NF4Weight.quantize(w, double_quant=False).bits_per_parameter() == pytest.approx(4.5, abs=1e-3)
    # 4 + 8/64 (uint8 absmax) + 32/(64*256) (nested fp32) + the 256-entry code and the offset
    assert NF4Weight.quantize(w, double_quant=True).bits_per_parameter() == pytest.approx(4.127 + 8 * 1028 / 2**20,
                                                                                          abs=1e-3)


@pytest.mark.slow
def test_qwen25_14b_linear_weights_fit_in_4_2_bits(capsys):
    """Every linear of Qwen2.5-14B, quantised (one real random layer per distinct shape: storage
    depends on the shape only), with all statistics counted."""
    layers = PRESETS["qwen2.5-14b"]["num_hidden_layers"]
    by_shape: dict[tuple[int, int], int] = {}
    for shape in linear_shapes("qwen2.5-14b").values():
        by_shape[shape] = by_shape.get(shape, 0) + layers
    total_bytes = total_params = 0
    gen = torch.Generator().manual_seed(0)
    for shape, count in by_shape.items():
        q = NF4Weight.quantize(torch.randn(shape, generator=gen, dtype=torch.float32).to(torch.bfloat16))
        total_bytes += q.nbytes() * count
        total_params += q.numel * count
    bits = 8 * total_bytes / total_params
    with capsys.disabled():
        print(f"\nQwen2.5-14B linear weights: {total_params:,} parameters in {total_bytes / 2**30:.2f} GiB "
              f"= {bits:.4f} bits per parameter")
    assert total_params == 13_212_057_600
    assert bits <= 4.2


def test_bad_inputs():
    with pytest.raises(ValueError, match="power of two"):
        NF4Weight.quantize(torch.randn(4, 64), blocksize=48)
    with pytest.raises(TypeError, match="fp32/bf16/fp16"):
        NF4Weight.quantize(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty"):
        NF4Weight.quantize(torch.empty(0, 64))
    w = torch.randn(8, 64)
    packed, state = bnb_functional.quantize_4bit(w, quant_type="fp4")
    with pytest.raises(ValueError, match="only 'nf4'"):
        NF4Weight.from_bnb(packed, state)
    packed, state = bnb_functional.quantize_4bit(w, quant_type="nf4")
    with pytest.raises(ValueError, match="needs 256"):
        NF4Weight.from_bnb(packed[:-1], state)


def test_from_bnb_reads_other_storage_dtypes(rng_seed):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(rng_seed)).to(torch.bfloat16)
    packed, state = bnb_functional.quantize_4bit(w, compress_statistics=True, quant_type="nf4",
                                                 quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    assert torch.equal(NF4Weight.from_bnb(packed, state).dequantize(), bnb_functional.dequantize_4bit(packed, state))
