"""token_logprobs against the float64 definition, on both backends, without [T, V] tensors."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rel
from torch.utils._python_dispatch import TorchDispatchMode

from abs_fast.ops import token_logprobs
from abs_fast.ops.logprobs import IGNORE_INDEX, token_logprobs_reference

BACKENDS = ["reference", "triton"]
# (tokens, hidden, vocab): odd sizes, a vocabulary that is not a multiple of any block, one token
SHAPES = [(37, 48, 1000), (1, 64, 389), (70, 40, 2051)]


def _inputs(seed, T, K, V, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(T, K, generator=gen) * 1.5).to(dtype)
    weight = (torch.randn(V, K, generator=gen) * 0.3).to(dtype)
    targets = torch.randint(0, V, (T,), generator=gen)
    return hidden, weight, targets


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_values_and_gradients_match_float64(backend, shape, temperature, rng_seed):
    T, K, V = shape
    hidden, weight, targets = _inputs(rng_seed, T, K, V)
    if T > 3:
        targets[2] = IGNORE_INDEX
    hidden.requires_grad_(True)
    logprobs, entropy = token_logprobs(hidden, weight, targets, temperature, return_entropy=True, backend=backend,
                                       chunk_size=256)
    h64 = hidden.detach().double().requires_grad_(True)
    ref_logprobs, ref_entropy = token_logprobs_reference(h64, weight, targets, temperature)
    # fp32 error scales with the logits the sums are made of; a peaked distribution (one token) has an
    # entropy far smaller than that, so relative to the entropy alone the check would flake (~1% of seeds)
    logit_scale = (h64.detach() @ weight.double().T).abs().max().item() / temperature
    assert_close_rel(logprobs, ref_logprobs, 1e-5, "log-probs", floor=logit_scale)
    assert_close_rel(entropy, ref_entropy, 1e-5, "entropy", floor=logit_scale)
    if T > 3:
        assert logprobs[2] == 0

    gen = torch.Generator().manual_seed(rng_seed + 1)
    w_lp, w_ent = torch.randn(T, generator=gen), torch.randn(T, generator=gen)
    (grad,) = torch.autograd.grad((logprobs * w_lp).sum() + (entropy * w_ent).sum(), hidden)
    (ref_grad,) = torch.autograd.grad((ref_logprobs * w_lp.double()).sum() + (ref_entropy * w_ent.double()).sum(),
                                      h64)
    # the same for the gradient: rows of W weighted by d log p and d H (which carries the logits)
    grad_scale = weight.abs().max().item() / temperature * (w_lp.abs().max().item()
                                                            + w_ent.abs().max().item() * logit_scale)
    assert_close_rel(grad, ref_grad, 1e-5, "d hidden (log-probs and entropy)", floor=grad_scale)

    # log-probs alone: the entropy term of the backward is skipped
    (grad_lp,) = torch.autograd.grad((token_logprobs(hidden, weight, targets, temperature, backend=backend,
                                                     chunk_size=300) * w_lp).sum(), hidden)
    (ref_grad_lp,) = torch.autograd.grad((token_logprobs_reference(h64, weight, targets, temperature)[0]
                                          * w_lp.double()).sum(), h64)
    assert_close_rel(grad_lp, ref_grad_lp, 1e-5, "d hidden (log-probs only)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_hidden_and_head(backend, rng_seed):
    hidden, weight, targets = _inputs(rng_seed, 33, 64, 700, torch.bfloat16)
    logprobs = token_logprobs(hidden, weight, targets, backend=backend)
    expected, _ = token_logprobs_reference(hidden, weight, targets)  # same bf16 inputs, float64 math
    assert logprobs.dtype == torch.float32
    assert_close_rel(logprobs, expected, 1e-5, "bf16 inputs, fp32 accumulation")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_leading_dims_and_empty(backend, rng_seed):
    hidden, weight, targets = _inputs(rng_seed, 12, 32, 300)
    got = token_logprobs(hidden.view(3, 4, 32), weight, targets.view(3, 4), backend=backend)
    assert got.shape == (3, 4)
    assert_close_rel(got.reshape(-1), token_logprobs_reference(hidden, weight, targets)[0], 1e-5, "[3, 4] batch")
    empty = torch.zeros(0, 32, requires_grad=True)
    out = token_logprobs(empty, weight, torch.zeros(0, dtype=torch.long), backend=backend)
    assert out.shape == (0,)
    out.sum().backward()
    assert empty.grad.shape == (0, 32)


class _LargestTensor(TorchDispatchMode):
    """Records the largest floating-point tensor any torch op produces (the Triton interpreter also
    copies each kernel argument's storage as raw bytes: uint8, not counted)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens_by_vocab_tensor_is_allocated(backend, rng_seed):
    T, K, V = 256, 32, 8192
    hidden, weight, targets = _inputs(rng_seed, T, K, V)
    hidden.requires_grad_(True)
    with _LargestTensor() as recorder:
        logprobs, entropy = token_logprobs(hidden, weight, targets, return_entropy=True, backend=backend,
                                           chunk_size=512)
        (logprobs.sum() + entropy.sum()).backward()
    # at most one [T, chunk] block of the backward, or the Triton interpreter's copy of the head
    assert recorder.largest <= max(T * 512, V * K) < T * V // 4, f"a tensor of {recorder.largest} elements"
    assert recorder.largest >= T * 512 // 2  # the recorder does see the chunked work
    # the same recorder catches the plain definition
    with _LargestTensor() as recorder:
        token_logprobs_reference(hidden.detach(), weight, targets)
    assert recorder.largest >= T * V


def test_errors():
    hidden, weight, targets = _inputs(0, 4, 8, 50)
    with pytest.raises(ValueError, match="frozen"):
        token_logprobs(hidden, weight.requires_grad_(True), targets)
    weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"outside \[0, 50\)"):
        token_logprobs(hidden, weight, torch.tensor([1, 2, 50, 3]))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="must match"):
        token_logprobs(hidden, weight, targets[:3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_gradients_keep_the_small_terms(backend, rng_seed):
    """fp16 models: each non-target term of d logp / d logit is -p * dlogp, here about (1/4096) * 1e-4 =
    2e-8, below fp16's smallest subnormal (6e-8). Kept in fp32, they cancel the head rows' common part
    (every row is 0.1 plus noise), so d hidden is dlogp * (noise of the target row - its p-mean); written
    in fp16 they would vanish and leave dlogp * the whole target row, ten times too large."""
    T, K, V = 6, 32, 4096
    gen = torch.Generator().manual_seed(rng_seed)
    hidden = (torch.randn(T, K, generator=gen) * 0.01).half()
    weight = (0.1 + torch.randn(V, K, generator=gen) * 0.01).half()
    targets = torch.randint(0, V, (T,), generator=gen)
    dlogp = torch.full((T,), 1e-4)
    h = hidden.clone().requires_grad_()
    (grad,) = torch.autograd.grad((token_logprobs(h, weight, targets, backend=backend) * dlogp).sum(), h)
    h64 = hidden.double().requires_grad_()
    (ref,) = torch.autograd.grad((token_logprobs_reference(h64, weight, targets)[0] * dlogp.double()).sum(), h64)
    assert grad.dtype == torch.float16
    # fp16 holds a gradient this small (~1e-6) to about 6e-8: 10% of its largest value
    assert_close_rel(grad.double(), ref, 0.1, "fp16 d hidden")
