"""The embedded rollout engine: generation inside the trainer's process, on the policy's own weights.

Continuous batching over a preallocated KV cache: up to `max_batch` rows decode together, each with
its own adapter (attacker, defender, or the base), sampling settings and stop conditions.

A decode step has no host synchronisation. Each row's state (last token, cache length, tokens and
log-probs generated so far, finished flag and reason) lives on the device; sampling and the stop
checks (stop ids, max_new_tokens, the KV budget) run there. The host learns which rows finished
every `poll_every` steps, in one transfer: finished rows leave (the last live row moves into the
freed cache slot, so live rows stay in slots 0..n-1), waiting requests are prefilled into the
free slots (all prompts packed into one forward), and stop strings are checked on the new text.
A row that finishes between polls idles for at most poll_every - 1 steps.

On CUDA, with the Triton decode attention, the step's forward (embeddings to logits) is captured as a
CUDA graph per batch-size bucket (1, 2, 4, ... max_batch) and replayed; sampling runs eagerly after
it (a handful of kernels).
"""

from __future__ import annotations

import itertools
import struct
import time
from collections import deque
from dataclasses import dataclass

import torch

from abs_fast.model.attention import CacheWrite, DecodeBatch, Documents, KVCache, PackedBatch, decode_backend
from abs_fast.model.scoring import head_logits
from abs_fast.ops.routing import AdapterRouting
from abs_fast.rollout.base import RolloutRequest, RolloutResult
from abs_fast.rollout.sampling import SamplingSettings, sample_next

__all__ = ["DEFAULT_POLL_EVERY", "EmbeddedEngine", "EngineStats"]

# Decode steps between two host polls. On CPU (where a poll costs no device sync) 1..32 measured the
# same within noise (bench/RESULTS.md); on a GPU a poll stalls the launch queue once, and a row that
# finished idles until the next poll: 8 bounds that waste to 7 steps of a 256-512-token response.
# The GPU choice is unmeasured: the decode stage of scripts/gpu-check.sh measures 1, 4 and 32 against it.
DEFAULT_POLL_EVERY = 8
_RUNNING, _STOP, _LENGTH = 0, 1, 2


@dataclass
class _Row:
    index: int  # position in the caller's request list
    request: RolloutRequest
    adapter_id: int
    stop_ids: tuple[int, ...]
    prompt_len: int
    generated: int = 0  # tokens generated, as of the last poll
    checked: int = 0  # tokens already searched for stop strings


@dataclass
class EngineStats:
    """Counters of the last generate() call (for logs and benchmarks). decode_tokens counts every
    row of every decode step, finished rows waiting for the next poll included."""

    prefill_tokens: int = 0
    decode_tokens: int = 0
    decode_steps: int = 0
    polls: int = 0
    graph_replays: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


class _DeviceRows:
    """The per-row decode state on the device, one entry per cache slot. The step's inputs (last
    token, cache length, adapter) keep their storage for the engine's life: CUDA graphs read them."""

    def __init__(self, capacity: int, device: torch.device):
        self.capacity, self.device = capacity, device
        self.last_token = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.cached = torch.zeros(capacity, dtype=torch.int32, device=device)  # tokens in the cache
        self.adapter = torch.full((capacity,), -1, dtype=torch.int32, device=device)

    def reset(self, max_new: int, max_stops: int) -> None:
        """Every slot idle; output buffers for up to `max_new` tokens per row."""
        capacity, device = self.capacity, self.device
        self.last_token.zero_()
        self.cached.zero_()
        self.adapter.fill_(-1)
        self.generated = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.max_new = torch.ones(capacity, dtype=torch.int64, device=device)
        self.reason = torch.full((capacity,), _LENGTH, dtype=torch.int64, device=device)  # idle slots are done
        self.stops = torch.full((capacity, max(max_stops, 1)), -1, dtype=torch.int64, device=device)
        # generated tokens and their log-probs; column max_new is where finished rows write
        self.tokens = torch.zeros(capacity, max_new + 1, dtype=torch.int64, device=device)
        self.logprobs = torch.zeros(capacity, max_new + 1, dtype=torch.float32, device=device)

    def per_row(self) -> list[torch.Tensor]:
        return [self.last_token, self.cached, self.adapter, self.generated, self.max_new, self.reason, self.stops,
                self.tokens, self.logprobs]

    def move(self, src: int, dst: int) -> None:
        for tensor in self.per_row():
            tensor[dst] = tensor[src]

    def clear(self, slot: int) -> None:
        """An idle slot decodes as a harmless padding row (base adapter, position 0, finished)."""
        self.last_token[slot], self.cached[slot], self.adapter[slot] = 0, 0, -1
        self.reason[slot] = _LENGTH


class EmbeddedEngine:
    """RolloutEngine over a Policy's own weights (nothing is copied: adapters trained in place are
    sampled from at the next generate()).

    max_batch: rows decoded together; max_seq_len: KV budget per row (prompt + generated tokens).
    tokenizer: needed for text output and stop strings (any Hugging Face tokenizer).
    poll_every: decode steps between host polls (finished rows leave and new ones join at a poll).
    cuda_graphs: capture the decode step per batch bucket on CUDA (with the Triton decode attention).
    prefill_tokens: prompt tokens per prefill forward (bounds its activations; a longer prompt goes alone).
    """

    def __init__(self, policy, tokenizer=None, max_batch: int = 32, max_seq_len: int = 2048, seed: int = 0,
                 progress: bool = False, poll_every: int = DEFAULT_POLL_EVERY, cuda_graphs: bool = True,
                 prefill_tokens: int = 8192):
        if max_batch < 1 or max_seq_len < 2 or poll_every < 1 or prefill_tokens < 1:
            raise ValueError(f"need max_batch >= 1, max_seq_len >= 2, poll_every >= 1 and prefill_tokens >= 1, got "
                             f"{max_batch}, {max_seq_len}, {poll_every}, {prefill_tokens}")
        self.policy = policy
        self.tokenizer = tokenizer
        self.max_batch, self.max_seq_len, self.poll_every = max_batch, max_seq_len, poll_every
        self.prefill_tokens = prefill_tokens
        self.generator = torch.Generator(device=policy.device).manual_seed(seed)
        self.progress = progress
        self.attention = decode_backend(policy.device, policy.config.head_dim)
        self.cuda_graphs = cuda_graphs and policy.device.type == "cuda" and self.attention == "triton"
        self.cache: KVCache | None = None
        self.stats = EngineStats()
        self._slots: _DeviceRows | None = None
        self._max_len = 1  # a host upper bound of every live row's keys (what the sdpa path reads)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_key = None
        self._graph_pool = None

    def kv_cache_bytes(self) -> int:
        config = self.policy.config
        per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim
        return per_token * self.max_batch * self.max_seq_len * torch.finfo(self.policy.dtype).bits // 8

    def describe(self) -> dict[str, object]:
        """What runs: decode attention, CUDA graphs, poll interval (for logs and `abs-fast info`)."""
        return {"decode_attention": self.attention, "cuda_graphs": self.cuda_graphs, "poll_every": self.poll_every,
                **self.policy.model.kernels}

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
        return _Row(index, request, adapter_id, tuple(sorted(stops)), prompt_len=len(prompt))

    # --- the loop -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, requests: list[RolloutRequest]) -> list[RolloutResult]:
        rows = [self._row_for(i, r) for i, r in enumerate(requests)]
        results: list[RolloutResult | None] = [None] * len(rows)
        self.stats = EngineStats()
        if not rows:
            return []
        device = self.policy.device
        if self.cache is None:
            self.cache = self.policy.config.kv_cache(self.max_batch, self.max_seq_len, device, self.policy.dtype)
            self._slots = _DeviceRows(self.max_batch, device)
        self._check_graphs()
        self._slots.reset(max(r.request.sampling.max_new_tokens for r in rows), max(len(r.stop_ids) for r in rows))
        self._settings = SamplingSettings.build([1.0] * self.max_batch, [0] * self.max_batch, [1.0] * self.max_batch,
                                                device)
        waiting = deque(rows)
        live: list[_Row] = []
        bar = self._progress_bar(len(rows))
        while waiting or live:
            if waiting and len(live) < self.max_batch:
                start = time.perf_counter()
                admitted = [waiting.popleft() for _ in range(min(len(waiting), self.max_batch - len(live)))]
                for group in _by_tokens(admitted, self.prefill_tokens):
                    self._prefill(group, first_slot=len(live))
                    live += group
                self._settings = self._sampling_settings(live)
                self.stats.prefill_seconds += time.perf_counter() - start
            start = time.perf_counter()
            # decode until the next poll, or until every row must have finished
            steps = min(self.poll_every, min(r.request.sampling.max_new_tokens - r.generated for r in live))
            for _ in range(steps):
                self._decode_step(len(live))
            finished = self._poll(live, results)
            self.stats.decode_seconds += time.perf_counter() - start
            self._compact(live, finished)
            if bar is not None and finished:
                bar.update(len(finished))
        if bar is not None:
            bar.close()
        return results

    def _progress_bar(self, total: int):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="rollout", unit="seq", leave=False)

    def _sampling_settings(self, live: list[_Row]) -> SamplingSettings:
        params = [r.request.sampling for r in live]
        return SamplingSettings.build([p.temperature for p in params], [p.top_k for p in params],
                                      [p.top_p for p in params], self.policy.device)

    def _prefill(self, rows: list[_Row], first_slot: int) -> None:
        """All prompts packed into one forward that writes their keys and values into their cache
        slots; the first token of each row is sampled and stored on the device."""
        device, slots_state = self.policy.device, self._slots
        prompts = [list(r.request.prompt_ids) for r in rows]
        tokens = [t for p in prompts for t in p]
        slot_of = [first_slot + i for i, p in enumerate(prompts) for _ in p]
        positions = [j for p in prompts for j in range(len(p))]
        routing = AdapterRouting.from_ids([r.adapter_id for r, p in zip(rows, prompts, strict=True) for _ in p],
                                          len(self.policy.adapter_names), device=device)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=device)
        positions_t = as_tensor(positions)
        write = CacheWrite(self.cache, as_tensor(slot_of), positions_t)
        batch = PackedBatch(Documents.from_lengths([len(p) for p in prompts], device), write)
        hidden = self.policy.model(as_tensor(tokens), routing, positions_t, batch)
        ends = as_tensor(list(itertools.accumulate(len(p) for p in prompts))) - 1
        logits = self._logits(hidden[ends])
        settings = SamplingSettings.build([r.request.sampling.temperature for r in rows],
                                          [r.request.sampling.top_k for r in rows],
                                          [r.request.sampling.top_p for r in rows], device)
        token, logprob = sample_next(logits, settings, self.generator)
        slots = slice(first_slot, first_slot + len(rows))
        slots_state.cached[slots] = torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=device)
        slots_state.adapter[slots] = torch.tensor([r.adapter_id for r in rows], dtype=torch.int32, device=device)
        slots_state.max_new[slots] = as_tensor([r.request.sampling.max_new_tokens for r in rows])
        slots_state.generated[slots] = 0
        slots_state.reason[slots] = _RUNNING
        stops = torch.full((len(rows), slots_state.stops.shape[1]), -1, dtype=torch.int64)
        for i, r in enumerate(rows):
            stops[i, : len(r.stop_ids)] = torch.tensor(r.stop_ids, dtype=torch.int64)
        slots_state.stops[slots] = stops.to(device)
        self._record(token, logprob, first_slot, len(rows))
        for r in rows:
            r.generated = 1  # the prefill samples each row's first token
        self._max_len = max(self._max_len, max(len(p) for p in prompts) + 1)
        self.stats.prefill_tokens += len(tokens)

    def _record(self, token: torch.Tensor, logprob: torch.Tensor, first: int, count: int) -> None:
        """Append each running row's new token and log-prob; check its stop conditions (on the device)."""
        s = self._slots
        rows = slice(first, first + count)
        running = s.reason[rows] == _RUNNING
        column = torch.where(running, s.generated[rows], torch.full_like(s.generated[rows], s.tokens.shape[1] - 1))
        index = torch.arange(first, first + count, device=token.device)
        s.tokens[index, column] = token
        s.logprobs[index, column] = logprob
        generated = s.generated[rows] + running.long()
        s.generated[rows] = generated
        hit_stop = (token[:, None] == s.stops[rows]).any(dim=1)
        # the next step would write the cache at position `cached`: it must stay below max_seq_len
        out_of_room = s.cached[rows].long() + 1 >= self.max_seq_len
        at_length = (generated >= s.max_new[rows]) | out_of_room
        reason = torch.where(hit_stop, _STOP, torch.where(at_length, _LENGTH, _RUNNING))
        s.reason[rows] = torch.where(running, reason, s.reason[rows])
        s.last_token[rows] = torch.where(running, token, s.last_token[rows])

    def _decode_step(self, count: int) -> None:
        s = self._slots
        logits = self._replay(count) if self.cuda_graphs else self._decode_logits(count)
        token, logprob = sample_next(logits, self._settings.rows(count), self.generator)
        running = s.reason[:count] == _RUNNING
        s.cached[:count] += running.int()
        self._record(token, logprob, 0, count)
        self._max_len = min(self._max_len + 1, self.max_seq_len)
        self.stats.decode_steps += 1
        self.stats.decode_tokens += count

    def _decode_logits(self, count: int) -> torch.Tensor:
        """The forward of one decode step for slots 0..count-1 (what a CUDA graph captures)."""
        s = self._slots
        routing = AdapterRouting(s.adapter[:count], len(self.policy.adapter_names))  # ids checked at admission
        seq_lens = s.cached[:count] + 1
        batch = DecodeBatch(self.cache, seq_lens, self._max_len, self.attention)
        hidden = self.policy.model(s.last_token[:count], routing, s.cached[:count].long(), batch)
        return self._logits(hidden)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, vocab] fp32 logits from the head in the model's dtype (no copy of the head weight)."""
        return head_logits(hidden, self.policy.model.lm_head_weight)

    # --- CUDA graphs ----------------------------------------------------------------------

    def _graph_fingerprint(self) -> tuple:
        """The addresses of every tensor a captured decode step reads: the model's parameters and
        buffers (NF4 codes and scales, biases, norms, the head, each layer's adapter scaling), each
        layer's stacked adapters, the KV cache and the slot state. Any change of address (a replaced
        tensor) drops the captured graphs; values written in place reach the replays as they are."""
        model = self.policy.model
        slots = self._slots  # the step's inputs keep their storage for the engine's life
        tensors = [*model.parameters(), *model.buffers(), self.cache.k, self.cache.v, slots.last_token,
                   slots.cached, slots.adapter]
        stacks = [t for layer in model.target_layers().values() for t in (layer._stacks or ())]
        return tuple(t.data_ptr() for t in (*tensors, *stacks))

    def _check_graphs(self) -> None:
        if self.cuda_graphs and self._graph_key != self._graph_fingerprint():
            self._graphs.clear()
            self._graph_key = self._graph_fingerprint()

    def _replay(self, count: int) -> torch.Tensor:
        bucket = 1 << (count - 1).bit_length()
        bucket = min(bucket, self.max_batch)
        if bucket not in self._graphs:
            self._graphs[bucket] = self._capture(bucket)
        graph, logits = self._graphs[bucket]
        graph.replay()
        self.stats.graph_replays += 1
        return logits[:count]

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture the decode forward of `bucket` rows (rows beyond the live ones are idle slots:
        base adapter, position 0; their outputs are never read). Warm-up runs first (kernel
        autotuning happens outside the capture); they write each live row's next cache position with
        the values the real step writes there."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode_logits(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = self._decode_logits(bucket)
        return graph, logits

    # --- polls ----------------------------------------------------------------------------

    def _poll(self, live: list[_Row], results: list) -> list[_Row]:
        """One transfer of every live row's state to the host; returns the rows that finished (their
        results stored)."""
        s = self._slots
        count = len(live)
        width = max(r.generated for r in live) + self.poll_every + 1  # tokens any row can hold by now
        width = min(width, s.tokens.shape[1] - 1)
        state = torch.cat([s.reason[:count, None], s.generated[:count, None], s.tokens[:count, :width],
                           s.logprobs[:count, :width].view(torch.int32).long()], dim=1)
        host = state.tolist()  # the poll's one synchronisation
        self.stats.polls += 1
        finished = []
        for r, values in zip(live, host, strict=True):
            reason, generated = values[0], values[1]
            tokens = values[2: 2 + generated]
            r.generated = generated
            result = None
            if r.request.sampling.stop:  # searched up to a stop id, which takes precedence as it did per step
                searched = generated - 1 if reason == _STOP else generated
                result = self._stop_string(r, tokens[:searched], values[2 + width:2 + width + searched])
            if result is None and reason != _RUNNING:
                logprobs = _as_floats(values[2 + width: 2 + width + generated])
                if reason == _STOP:
                    result = self._result(r, tokens, logprobs, "stop", tokens[-1], text_tokens=tokens[:-1])
                else:
                    result = self._result(r, tokens, logprobs, "length", None, text_tokens=tokens)
            if result is not None:
                results[r.index] = result
                finished.append(r)
        return finished

    def _compact(self, live: list[_Row], finished: list[_Row]) -> None:
        """Finished rows leave; the last live row takes each freed cache slot."""
        self._max_len = min(max((r.prompt_len + r.generated + 1 for r in live), default=1), self.max_seq_len)
        for r in finished:
            slot = live.index(r)
            last = live.pop()
            if last is not r:
                self.cache.move_row(len(live), slot, min(last.prompt_len + last.generated, self.max_seq_len))
                self._slots.move(len(live), slot)
                live[slot] = last
            self._slots.clear(len(live))
        if finished and live:
            self._settings = self._sampling_settings(live)

    def _stop_string(self, row: _Row, tokens: list[int], logprob_bits: list[int]) -> RolloutResult | None:
        """The first token (since the last poll) after which the text holds a stop string."""
        stops = row.request.sampling.stop
        window = max(len(s) for s in stops) + 8  # a token decodes to >= 1 character (or a byte piece)
        for end in range(max(row.checked, 1), len(tokens) + 1):
            tail = self.tokenizer.decode(tokens[max(0, end - window):end], skip_special_tokens=False)
            if any(s in tail for s in stops):
                text = self.tokenizer.decode(tokens[:end], skip_special_tokens=False)
                cut, matched = min((text.find(s), s) for s in stops if s in text)
                return self._result(row, tokens[:end], _as_floats(logprob_bits[:end]), "stop", matched,
                                    text=text[:cut])
        row.checked = len(tokens) + 1
        return None

    def _result(self, row: _Row, tokens: list[int], logprobs: list[float], reason: str, matched,
                text_tokens=None, text=None) -> RolloutResult:
        if text is None:
            text = self.tokenizer.decode(text_tokens, skip_special_tokens=False) if self.tokenizer else ""
        return RolloutResult(token_ids=list(tokens), text=text, logprobs=logprobs, finish_reason=reason,
                             prompt_tokens=row.prompt_len, matched_stop=matched)


def _as_floats(bits: list[int]) -> list[float]:
    """fp32 values sent to the host as their int32 bit patterns (one transfer with the tokens)."""
    return list(struct.unpack(f"{len(bits)}f", struct.pack(f"{len(bits)}i", *bits)))


def _by_tokens(rows: list[_Row], budget: int) -> list[list[_Row]]:
    """Consecutive groups of rows whose prompts sum to at most `budget` tokens (a longer one alone)."""
    groups: list[list[_Row]] = []
    used = budget
    for r in rows:
        if used + r.prompt_len > budget:
            groups.append([])
            used = 0
        groups[-1].append(r)
        used += r.prompt_len
    return groups
