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


def assert_only_near_ties_differ(ours: torch.Tensor, theirs: torch.Tensor, scaled: torch.Tensor,
                                 code: torch.Tensor, what: str, max_fraction: float) -> int:
    """Differing code indices must be neighbours with the value within 2% of a code gap of their
    midpoint (a near-tie that another nearest-code search may resolve the other way); count them."""
    differ = (ours != theirs).nonzero().flatten()
    assert differ.numel() <= max_fraction * ours.numel(), f"{what}: {differ.numel()} of {ours.numel()} differ"
    for i in differ.tolist():
        a, b = int(ours[i]), int(theirs[i])
        assert abs(a - b) == 1, f"{what}[{i}]: codes {a} and {b} are not neighbours"
        lo, hi = sorted((a, b))
        gap = float(code[hi] - code[lo])
        midpoint = float(code[lo] + code[hi]) / 2
        assert abs(float(scaled[i]) - midpoint) <= 0.02 * gap, f"{what}[{i}]: {float(scaled[i])} is no near-tie"
    return differ.numel()


def assert_ours_is_nearest(ours: torch.Tensor, theirs: torch.Tensor, scaled: torch.Tensor, code: torch.Tensor,
                           what: str, max_fraction: float) -> int:
    """Where the codes differ, ours must be at least as close to the value as theirs. The count is
    bounded by a fraction of the codes, with a floor of 4 for small tensors."""
    differ = (ours != theirs).nonzero().flatten()
    limit = max(4, max_fraction * ours.numel())
    assert differ.numel() <= limit, f"{what}: {differ.numel()} of {ours.numel()} differ"
    ours_err = (scaled[differ] - code[ours[differ]]).abs()
    theirs_err = (scaled[differ] - code[theirs[differ]]).abs()
    assert torch.all(ours_err <= theirs_err), f"{what}: a differing code of ours is farther from the value"
    return differ.numel()


def test_code_tables_are_bitsandbytes():
    assert torch.equal(NF4_CODE, bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnb_functional.create_dynamic_map(signed=True))


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
    assert ours.shape == w.shape and ours.dtype == dtype and ours.blocksize == blocksize
    assert ours.packed.shape == (packed.numel(),) and ours.packed.dtype == torch.uint8

    # 4-bit codes: same bytes (ties, if any, counted and bounded)
    plain = bnb_functional.quantize_4bit(w, blocksize=blocksize, compress_statistics=False, quant_type="nf4")[1]
    raw_absmax = plain.absmax
    flat = w.float().reshape(-1)
    scaled = flat / raw_absmax.repeat_interleave(blocksize)[: flat.numel()]
    assert_only_near_ties_differ(unpack(ours.packed, w.numel()), unpack(packed, w.numel()), scaled, NF4_CODE,
                                 "nf4 codes", max_fraction=1e-3)
    assert ours.packed[-1] == packed.reshape(-1)[-1], "padding nibble differs"

    if not double_quant:
        assert torch.equal(ours.absmax, state.absmax)
        return
    assert torch.equal(ours.nested_offset, state.offset)
    assert torch.equal(ours.nested_absmax, state.state2.absmax)
    assert torch.equal(ours.nested_code, state.state2.code)
    # bitsandbytes' compiled CPU blockwise quantiser is not an exact nearest-code search (measured
    # over 1.2M values: 0.15% of its codes differ from the nearest, a few by more than one step);
    # ours is exact, so where the nested codes differ ours must be the closer one.
    # a nested block whose scales are all equal has nested absmax 0: any code decodes to the offset
    centered = raw_absmax - state.offset
    nested_absmax = state.state2.absmax.repeat_interleave(256)[: centered.numel()]
    live = nested_absmax > 0
    assert_ours_is_nearest(ours.absmax[live].long(), state.absmax[live].long(), centered[live] / nested_absmax[live],
                           dynamic_code(), "nested absmax codes", max_fraction=0.02)
    assert torch.equal(ours.block_absmax()[~live], raw_absmax[~live])


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
        assert torch.equal(ours.packed, packed.reshape(-1))
        if double_quant:
            assert torch.equal(ours.nested_absmax, state.state2.absmax)
            assert torch.equal(ours.nested_offset, state.offset)
        else:
            assert torch.equal(ours.absmax, state.absmax)
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
    # nested absmax: off by at most half the widest dynamic-code gap times its 256-block scale
    dq = NF4Weight.quantize(w, blocksize=64, double_quant=True)
    code2 = dynamic_code()
    nested_bound = ((code2[1:] - code2[:-1]).max() / 2) * dq.nested_absmax.repeat_interleave(256)[: q.absmax.numel()]
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
