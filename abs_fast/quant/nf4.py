"""NF4 weights in bitsandbytes' format, quantised bit-identically to its `quantize_4bit(quant_type="nf4")`.

Format (bitsandbytes NF4): the weight is flattened row-major and cut into blocks of `blocksize` elements.
Each block stores one absmax, and each element stores the index (4 bits) of the NF4 code value
nearest to element / absmax. Element 2j goes in the high nibble of byte j, element 2j+1 in the low
nibble. With double quantisation (bitsandbytes' `compress_statistics=True`), the absmax values minus
their mean are themselves quantised in blocks of 256, to 8-bit indices into bitsandbytes' signed
dynamic code, with one fp32 scale per 256 blocks.

The arithmetic below is bitsandbytes' (0.50) own, so the bytes are identical to what it writes on
CPU. 4-bit codes: full blocks are scaled by the reciprocal of their absmax, a trailing partial block
is divided by its own absmax (stored as at least 1e-38), values are clamped to [-1, 1] and rounded to
the nearest code (a value exactly half-way takes the lower one). Nested absmax codes: bitsandbytes'
CPU blockwise quantiser scales by the reciprocal of each 256-block's absmax and reads the code from
a table of 65536 evenly spaced points of [-1, 1] (`_dynamic_lut`), which is not always the nearest
code; an all-equal block (nested absmax 0) stores code 0. bitsandbytes' CUDA quantiser uses a
binary search instead and can round a few nested codes differently: bytes it wrote on a GPU load
exactly (`from_bnb`, pre-quantised checkpoints), but re-quantising on a GPU with bitsandbytes is
not guaranteed to reproduce ours.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch

__all__ = ["NF4_CODE", "NF4Weight", "code_table", "dynamic_code"]

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=torch.float32)

NESTED_BLOCKSIZE = 256  # blocks of absmax values per fp32 scale under double quantisation
_CHUNK_BLOCKS = 1 << 16  # blocks quantised at a time: bounds the working memory of a huge layer




@functools.cache
def _code_on(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return NF4_CODE.to(device=device, dtype=dtype)


def code_table(device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 16 NF4 code values on `device` (fp32, or rounded once to `dtype` for a kernel whose products
    take that dtype), moved there once per device and dtype: no copy inside a forward, so nothing moves
    or allocates a table inside a CUDA graph capture."""
    return _code_on(torch.device(device), dtype)


NF4_ZERO_INDEX = 7  # NF4_CODE[7] == 0.0: bitsandbytes fills the spare nibble of an odd count with it


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (256 values, ascending), used for nested absmax.

    Seven decades 10^-6 .. 10^0; decade i holds 2^i values (the midpoints of an even split of
    [0.1, 1]) of each sign; plus 0 and 1.
    """
    return _dynamic_code_cpu().clone()


@functools.cache
def _dynamic_code_cpu() -> torch.Tensor:
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        midpoints = (edges[:-1] + edges[1:]) / 2.0
        decade = 10 ** (i - 6)
        values += (decade * midpoints).tolist()
        values += (-decade * midpoints).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def _midpoints(code: torch.Tensor) -> torch.Tensor:
    return (code[:-1] + code[1:]) / 2


def _quantize_nf4_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest NF4 code indices (uint8) and per-block absmax (fp32) of a flat tensor, chunk by chunk,
    as bitsandbytes' `quantize_4bit` computes them."""
    n = flat.numel()
    n_full = n - n % blocksize
    bounds = _midpoints(code_table(flat.device))
    indices = torch.empty(n, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    chunk = _CHUNK_BLOCKS * blocksize
    for start in range(0, n_full, chunk):
        stop = min(start + chunk, n_full)
        blocks = flat[start:stop].float().view(-1, blocksize)
        block_absmax = blocks.abs().amax(dim=1)
        # an all-zero full block keeps absmax 0 (as bitsandbytes stores it); its values scale to 0
        scaled = torch.clamp(blocks * (1.0 / block_absmax.clamp(min=_TINY))[:, None], -1, 1)
        indices[start:stop] = torch.bucketize(scaled.reshape(-1), bounds).to(torch.uint8)
        absmax[start // blocksize: stop // blocksize] = block_absmax
    if n_full < n:
        tail = flat[n_full:].float()
        tail_absmax = tail.abs().amax().clamp(min=_TINY)  # bitsandbytes stores a zero tail's absmax as 1e-38
        indices[n_full:] = torch.bucketize(torch.clamp(tail / tail_absmax, -1, 1), bounds).to(torch.uint8)
        absmax[-1] = tail_absmax
    return indices, absmax


_TINY = 1e-38
_LUT_SIZE = 65536


@functools.cache
def _dynamic_lut(device: torch.device) -> torch.Tensor:
    """bitsandbytes' CPU lookup table for its dynamic code: entry i holds the code nearest to
    -1 + 2i / 65535 (the count of code midpoints below that point), all in fp32 as it computes them."""
    code = _dynamic_code_cpu()
    midpoints = 0.5 * (code[:-1] + code[1:])
    points = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / (_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, points, side="left").to(torch.uint8).to(device)


def _quantize_dynamic_blocks(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic-code indices (uint8) and fp32 absmax per block of NESTED_BLOCKSIZE values, as
    bitsandbytes' CPU `quantize_blockwise` computes them (see the module docstring)."""
    n = flat.numel()
    blocks = -(-n // NESTED_BLOCKSIZE)
    padded = torch.zeros(blocks * NESTED_BLOCKSIZE, dtype=torch.float32, device=flat.device)
    padded[:n] = flat
    padded = padded.view(blocks, NESTED_BLOCKSIZE)
    absmax = padded.abs().amax(dim=1)
    scaled = torch.clamp(padded * (1.0 / absmax.clamp(min=_TINY))[:, None], -1, 1)
    slots = (((scaled + 1.0) * 0.5) * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)  # truncation, as a C cast
    indices = _dynamic_lut(flat.device)[slots]
    indices = torch.where((absmax > 0)[:, None], indices, torch.zeros_like(indices))
    return indices.reshape(-1)[:n], absmax


def _expand_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] * scales[i // blocksize] in fp32."""
    n = values.numel()
    n_full = n - n % blocksize
    out = torch.empty(n, dtype=torch.float32, device=values.device)
    out[:n_full] = (values[:n_full].view(-1, blocksize) * scales[: n_full // blocksize, None]).reshape(-1)
    if n_full < n:
        out[n_full:] = values[n_full:] * scales[-1]
    return out


@dataclass(frozen=True, eq=False)  # compared by identity: field-wise == would compare tensors
class NF4Weight:
    """A frozen weight in NF4: packed 4-bit codes plus per-block statistics.

    `absmax` holds fp32 scales, or uint8 indices into `nested_code` when double-quantised, with
    `nested_absmax` (fp32 per 256 blocks) and `nested_offset` (fp32 scalar) completing it.
    """

    packed: torch.Tensor  # uint8 [(numel + 1) // 2]
    absmax: torch.Tensor  # fp32 [n_blocks], or uint8 [n_blocks] when double-quantised
    shape: torch.Size
    dtype: torch.dtype  # the dtype the weight had, and dequantises to by default
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None  # fp32 [ceil(n_blocks / 256)]
    nested_offset: torch.Tensor | None = None  # fp32 scalar
    nested_code: torch.Tensor | None = None  # fp32 [256]
    scales: torch.Tensor | None = None  # fp32 [n_blocks]: block_absmax() decoded once and kept (`with_scales`)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @classmethod
    def quantize(cls, w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
        if blocksize < 2 or blocksize & (blocksize - 1):
            raise ValueError(f"blocksize must be a power of two >= 2, got {blocksize}")
        if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"NF4 quantises fp32/bf16/fp16 weights, got {w.dtype}")
        if w.numel() == 0:
            raise ValueError("cannot quantise an empty weight")
        with torch.no_grad():
            flat = w.detach().reshape(-1)
            indices, absmax = _quantize_nf4_blocks(flat, blocksize)
            if indices.numel() % 2:
                indices = torch.cat([indices, indices.new_full((1,), NF4_ZERO_INDEX)])
            packed = (indices[0::2] << 4) | indices[1::2]
            if not double_quant:
                return cls(packed, absmax, w.shape, w.dtype, blocksize)
            offset = absmax.mean()
            code2 = _dynamic_code_cpu().to(w.device, copy=True)
            absmax_q, absmax2 = _quantize_dynamic_blocks(absmax - offset)
            return cls(packed, absmax_q, w.shape, w.dtype, blocksize, absmax2, offset, code2)

    def block_absmax(self) -> torch.Tensor:
        """The fp32 scale of every block (decoding the nested statistics if double-quantised, unless
        they were decoded once already: `with_scales`)."""
        if self.scales is not None:
            return self.scales
        if not self.double_quant:
            return self.absmax
        nested = self.nested_code[self.absmax.long()]
        return _expand_blocks(nested, self.nested_absmax, NESTED_BLOCKSIZE) + self.nested_offset

    def with_scales(self) -> NF4Weight:
        """This weight with its block scales decoded once and kept (4 bytes per block, 0.5 bit per
        parameter at blocksize 64): kernels then read them instead of decoding them at every call."""
        return self if self.scales is not None or not self.double_quant else replace(self, scales=self.block_absmax())

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a dense tensor (fp32 products, then cast), as bitsandbytes computes it."""
        codes = torch.empty(self.packed.numel() * 2, dtype=torch.long, device=self.device)
        codes[0::2] = (self.packed >> 4).long()
        codes[1::2] = (self.packed & 0xF).long()
        values = code_table(self.device)[codes[: self.numel]]
        out = _expand_blocks(values, self.block_absmax(), self.blocksize)
        return out.view(self.shape).to(dtype or self.dtype)

    def nbytes(self) -> int:
        """Bytes stored for this weight: packed codes and every statistic."""
        tensors = [self.packed, self.absmax, self.nested_absmax, self.nested_offset, self.nested_code, self.scales]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def bits_per_parameter(self) -> float:
        return 8 * self.nbytes() / self.numel

    def to(self, device: torch.device | str) -> NF4Weight:
        move = lambda t: None if t is None else t.to(device)
        return replace(self, packed=move(self.packed), absmax=move(self.absmax),
                       nested_absmax=move(self.nested_absmax), nested_offset=move(self.nested_offset),
                       nested_code=move(self.nested_code), scales=move(self.scales))

    # --- bitsandbytes interop -------------------------------------------------------------

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> NF4Weight:
        """Wrap bitsandbytes' `quantize_4bit(..., quant_type="nf4")` output (no copy of the codes)."""
        if quant_state.quant_type != "nf4":
            raise ValueError(f"quant_state.quant_type is {quant_state.quant_type!r}; only 'nf4' is supported")
        code = quant_state.code.detach().float().cpu()
        if code.numel() != 16 or not torch.equal(code, NF4_CODE):
            raise ValueError("quant_state.code is not the NF4 code table")
        shape = torch.Size(quant_state.shape)
        if packed.dtype != torch.uint8:
            packed = packed.contiguous().view(torch.uint8)
        packed = packed.reshape(-1)
        if packed.numel() != (math.prod(shape) + 1) // 2:
            raise ValueError(f"packed has {packed.numel()} bytes; a {tuple(shape)} weight needs "
                             f"{(math.prod(shape) + 1) // 2}")
        if quant_state.nested:
            state2 = quant_state.state2
            if state2.blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"nested blocksize {state2.blocksize} is not supported (expected 256)")
            offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=packed.device)
            return cls(packed, quant_state.absmax, shape, quant_state.dtype, quant_state.blocksize,
                       state2.absmax.float(), offset.reshape(()), state2.code.float())
        return cls(packed, quant_state.absmax.float(), shape, quant_state.dtype, quant_state.blocksize)

    def to_bnb(self):
        """(packed [bytes, 1] uint8, bitsandbytes QuantState) for bitsandbytes' own 4-bit functions."""
        from bitsandbytes.functional import QuantState

        code = NF4_CODE.to(self.device)
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax, code=self.nested_code, blocksize=NESTED_BLOCKSIZE,
                                dtype=torch.float32)
            state = QuantState(absmax=self.absmax, shape=self.shape, code=code, blocksize=self.blocksize,
                               quant_type="nf4", dtype=self.dtype, offset=self.nested_offset, state2=state2)
        else:
            state = QuantState(absmax=self.absmax, shape=self.shape, code=code, blocksize=self.blocksize,
                               quant_type="nf4", dtype=self.dtype)
        return self.packed.view(-1, 1), state
