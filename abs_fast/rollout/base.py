"""What every rollout engine takes and returns (the embedded engine here, SGLang later)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = ["FINISH_REASONS", "RolloutEngine", "RolloutRequest", "RolloutResult", "SamplingParams"]

FINISH_REASONS = ("stop", "length", "abort")


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy. top_k 0 and top_p 1 switch those filters off. Generation stops at
    max_new_tokens, at any of stop_token_ids (kept in the output: the policy chose to stop), or
    when the text contains one of `stop` (the text is cut before it). The model's EOS ids are added
    to stop_token_ids unless ignore_eos."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.stop, str) or isinstance(self.stop_token_ids, int):
            raise TypeError("stop and stop_token_ids take sequences (e.g. stop=('</answer>',))")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclass(frozen=True)
class RolloutRequest:
    """prompt_ids: the prompt's token ids; adapter: an adapter name, or None for the base model."""

    prompt_ids: tuple[int, ...] | list[int]
    adapter: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class RolloutResult:
    """token_ids: generated ids; logprobs[i]: log-prob of token_ids[i] under the distribution it was
    sampled from (log softmax(logits / temperature), before top-k/top-p filtering; temperature 1
    for greedy rows); finish_reason: "stop", "length", or "abort" (a server engine refused or
    dropped this request; `error` says why, and the tokens are empty); matched_stop: the stop id
    or string."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str
    prompt_tokens: int
    matched_stop: int | str | None = None
    error: str = ""


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, requests: list[RolloutRequest]) -> list[RolloutResult]:
        """Results in request order."""
        ...

    def update_adapters(self, policy, names: list[str] | None = None) -> None:
        """Make the engine sample from the policy's current weights of adapters `names` (default all)."""
        ...
