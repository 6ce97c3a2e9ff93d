"""The embedded rollout engine: generation inside the trainer's process, on the policy's own weights.

Continuous batching over a preallocated KV cache: up to `max_batch` rows decode together, each with
its own adapter (attacker, defender, or the base), sampling settings and stop conditions. A row
that finishes leaves the batch at once (the last live row moves into its cache slot, so live rows
stay in slots 0..n-1) and a waiting request is prefilled into the free slot, so finished rows cost
no compute.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from abs_fast.model.transformer import CacheWrite, KVCache
from abs_fast.rollout.base import RolloutRequest, RolloutResult, SamplingParams
from abs_fast.rollout.sampling import sample_next

__all__ = ["EmbeddedEngine"]


@dataclass
class _Row:
    index: int  # position in the caller's request list
    request: RolloutRequest
    adapter_id: int
    stop_ids: frozenset[int]
    length: int  # tokens already in the cache
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


@dataclass
class EngineStats:
    """Counters of the last generate() call (for logs and benchmarks)."""

    prefill_tokens: int = 0
    decode_tokens: int = 0
    decode_steps: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


class EmbeddedEngine:
    """RolloutEngine over a Policy's own weights (nothing is copied: adapters trained in place are
    sampled from at the next generate()).

    max_batch: rows decoded together; max_seq_len: KV budget per row (prompt + generated tokens).
    tokenizer: needed for text output and stop strings (any Hugging Face tokenizer).
    """

    def __init__(self, policy, tokenizer=None, max_batch: int = 32, max_seq_len: int = 2048, seed: int = 0,
                 progress: bool = False):
        if max_batch < 1 or max_seq_len < 2:
            raise ValueError(f"need max_batch >= 1 and max_seq_len >= 2, got {max_batch}, {max_seq_len}")
        self.policy = policy
        self.tokenizer = tokenizer
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.generator = torch.Generator(device=policy.device).manual_seed(seed)
        self.progress = progress
        self.cache: KVCache | None = None
        self.stats = EngineStats()

    def kv_cache_bytes(self) -> int:
        config = self.policy.config
        per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim
        return per_token * self.max_batch * self.max_seq_len * torch.finfo(self.policy.dtype).bits // 8

    def update_adapters(self, policy, names=None) -> None:
        """Nothing to copy: the engine reads the policy's parameters directly."""
        if policy is not self.policy:
            raise ValueError("this EmbeddedEngine serves the policy it was built with; build a new engine for "
                             "another policy")

    # --- request checking -----------------------------------------------------------------

    def _row_for(self, index: int, request: RolloutRequest) -> _Row:
        where = f"request {index}"
        if not isinstance(request, RolloutRequest):
            raise TypeError(f"{where}: expected a RolloutRequest, got {type(request).__name__}")
        prompt = list(request.prompt_ids)
        vocab = self.policy.config.vocab_size
        if not prompt:
            raise ValueError(f"{where}: empty prompt")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"{where}: prompt ids must lie in [0, {vocab})")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"{where}: prompt of {len(prompt)} tokens leaves no room in max_seq_len="
                             f"{self.max_seq_len}")
        params = request.sampling
        if params.stop and self.tokenizer is None:
            raise ValueError(f"{where}: stop strings need a tokenizer (EmbeddedEngine(policy, tokenizer=...))")
        try:
            adapter_id = self.policy.adapter_id(request.adapter)
        except KeyError as err:
            raise KeyError(f"{where}: {err.args[0]}") from None
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops |= set(self.policy.config.eos_token_ids)
        return _Row(index, request, adapter_id, frozenset(stops), length=0)

    # --- the loop -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, requests: list[RolloutRequest]) -> list[RolloutResult]:
        rows = [self._row_for(i, r) for i, r in enumerate(requests)]
        results: list[RolloutResult | None] = [None] * len(rows)
        if not rows:
            return []
        if self.cache is None:
            self.cache = KVCache(self.policy.config, self.max_batch, self.max_seq_len, self.policy.device,
                                 self.policy.dtype)
        self.stats = EngineStats()
        waiting = deque(rows)
        live: list[_Row] = []
        bar = self._progress_bar(len(rows))
        while waiting or live:
            if waiting and len(live) < self.max_batch:
                admitted = [waiting.popleft() for _ in range(min(len(waiting), self.max_batch - len(live)))]
                start = time.perf_counter()
                logits = self._prefill(admitted, first_slot=len(live))
                self.stats.prefill_seconds += time.perf_counter() - start
                live += admitted
                new_rows = admitted
            else:
                start = time.perf_counter()
                logits = self._decode(live)
                self.stats.decode_seconds += time.perf_counter() - start
                new_rows = live
            self._sample_and_finish(live, new_rows, logits, results, bar)
        if bar is not None:
            bar.close()
        return results

    def _progress_bar(self, total: int):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="rollout", unit="seq", leave=False)

    def _prefill(self, rows: list[_Row], first_slot: int) -> torch.Tensor:
        device = self.policy.device
        prompts = [list(r.request.prompt_ids) for r in rows]
        S = max(len(p) for p in prompts)
        input_ids = torch.zeros(len(rows), S, dtype=torch.long)
        mask = torch.zeros(len(rows), S, dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, : len(p)] = torch.tensor(p)
            mask[i, : len(p)] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = torch.arange(S, device=device).expand(len(rows), S)
        slots = torch.arange(first_slot, first_slot + len(rows), device=device)
        ids = torch.tensor([r.adapter_id for r in rows], device=device, dtype=torch.int32)[:, None].expand(-1, S)
        hidden = self.policy.model(input_ids, ids, positions, mask, CacheWrite(self.cache, slots, decode=False))
        last = torch.tensor([len(p) - 1 for p in prompts], device=device)
        for r, p in zip(rows, prompts, strict=True):
            r.length = len(p)
        self.stats.prefill_tokens += sum(len(p) for p in prompts)
        return self._logits(hidden[torch.arange(len(rows), device=device), last])

    def _decode(self, rows: list[_Row]) -> torch.Tensor:
        device = self.policy.device
        B = len(rows)
        input_ids = torch.tensor([[r.tokens[-1]] for r in rows], device=device)
        positions = torch.tensor([[r.length] for r in rows], device=device)
        ids = torch.tensor([[r.adapter_id] for r in rows], device=device, dtype=torch.int32)
        slots = torch.arange(B, device=device)
        key_length = max(r.length for r in rows) + 1
        write = CacheWrite(self.cache, slots, decode=True, leading_slots=True)
        hidden = self.policy.model(input_ids, ids, positions, None, write, key_length=key_length)
        for r in rows:
            r.length += 1
        self.stats.decode_steps += 1
        self.stats.decode_tokens += B
        return self._logits(hidden[:, 0])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.policy.model.lm_head_weight
        if hidden.dtype == torch.float32:
            return hidden @ weight.T
        return hidden.float() @ weight.float().T

    def _sample_and_finish(self, live: list[_Row], new_rows: list[_Row], logits: torch.Tensor, results, bar):
        device = logits.device
        params = [r.request.sampling for r in new_rows]
        temperature = torch.tensor([p.temperature for p in params], device=device, dtype=torch.float32)
        top_k = torch.tensor([p.top_k for p in params], device=device, dtype=torch.long)
        top_p = torch.tensor([p.top_p for p in params], device=device, dtype=torch.float32)
        tokens, logprobs = sample_next(logits.float(), temperature, top_k, top_p, self.generator)
        finished = []
        for r, token, logprob in zip(new_rows, tokens.tolist(), logprobs.tolist(), strict=True):
            r.tokens.append(token)
            r.logprobs.append(logprob)
            result = self._finish_if_done(r)
            if result is not None:
                results[r.index] = result
                finished.append(r)
        for r in finished:  # compact: the last live row takes the finished row's cache slot
            slot = live.index(r)
            last = live.pop()
            if last is not r:
                self.cache.move_row(len(live), slot, last.length)
                live[slot] = last
        if bar is not None and finished:
            bar.update(len(finished))

    def _finish_if_done(self, row: _Row) -> RolloutResult | None:
        params: SamplingParams = row.request.sampling
        token = row.tokens[-1]
        if token in row.stop_ids:
            return self._result(row, "stop", token, text_tokens=row.tokens[:-1])
        if params.stop:
            matched = self._stop_string(row, params.stop)
            if matched is not None:
                return matched
        if len(row.tokens) >= params.max_new_tokens or row.length + 1 >= self.max_seq_len:
            return self._result(row, "length", None, text_tokens=row.tokens)
        return None

    def _stop_string(self, row: _Row, stops: tuple[str, ...]) -> RolloutResult | None:
        window = max(len(s) for s in stops) + 8  # a token decodes to >= 1 character (or a byte piece)
        tail = self.tokenizer.decode(row.tokens[-window:], skip_special_tokens=False)
        if not any(s in tail for s in stops):
            return None
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=False)
        cut, matched = min((text.find(s), s) for s in stops if s in text)
        return self._result(row, "stop", matched, text=text[:cut])

    def _result(self, row: _Row, reason: str, matched, text_tokens=None, text=None) -> RolloutResult:
        if text is None:
            text = self.tokenizer.decode(text_tokens, skip_special_tokens=False) if self.tokenizer else ""
        return RolloutResult(token_ids=list(row.tokens), text=text, logprobs=list(row.logprobs),
                             finish_reason=reason, prompt_tokens=len(row.request.prompt_ids), matched_stop=matched)
