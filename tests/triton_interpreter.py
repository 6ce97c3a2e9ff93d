"""Test-harness patches for the Triton CPU interpreter (TRITON_INTERPRET=1), never used by the package.

The stock interpreter (triton 3.x) has gaps that are not bugs in our kernels:
- bf16 operands of tl.dot are multiplied as their raw uint16 bits, and bf16 arithmetic likewise:
  both are computed here in fp32 and rounded back to bf16, as a GPU's fp32-accumulating MMA does;
- fp32 -> bf16 casts truncate the mantissa; compiled Triton rounds to nearest even: so do we here;
- a Python float kernel argument stays a plain float (so `.to()` on it fails): it becomes an fp32
  scalar, as on a GPU;
- `tl.extra.libdevice` functions return None: not patched; abs-fast kernels do not use libdevice.
"""

from __future__ import annotations

import numpy as np
import torch


def patch_triton_interpreter() -> None:
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    if getattr(builder, "abs_fast_bf16_patch", False):
        return

    original_dot = builder.create_dot
    original_binary_op = builder.binary_op
    original_cvt = interp._implicit_cvt
    original_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interp.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original_cast(self, src, dst_type)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def binary_op(self, lhs, rhs, op):
        if lhs.dtype.scalar == tl.bfloat16 and rhs.dtype.scalar == tl.bfloat16:
            out = original_binary_op(self, self.cast_impl(lhs, tl.float32), self.cast_impl(rhs, tl.float32), op)
            return self.cast_impl(out, tl.bfloat16) if out.dtype.scalar == tl.float32 else out
        return original_binary_op(self, lhs, rhs, op)

    def implicit_cvt(arg):
        if isinstance(arg, float):
            return tl.tensor(interp.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return original_cvt(arg)

    builder.cast_impl = cast_impl
    builder.create_dot = create_dot
    builder.binary_op = binary_op
    interp._implicit_cvt = implicit_cvt
    builder.abs_fast_bf16_patch = True
