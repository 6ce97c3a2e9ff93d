"""The SGLang rollout engine: the waves run on an SGLang server (continuous batching, radix cache,
CUDA graphs, multi-LoRA kernels) while the trainer keeps its own fused kernels. The server process
and the HTTP plumbing are rollout/sglang_server.py; this module holds what the engine decides:
adapter versions, payloads, and reading results.

- One /generate call per wave: input_ids, one sampling dict per request with every value set (so
  nothing comes from the model's generation_config), one lora_path per request (None = base),
  output log-probs, and one request id per item, so results are mapped back by id.
- After each optimizer step the adapters are pushed under new versioned names: PEFT files in a
  RAM-backed directory and /load_lora_adapter, or SGLang's in-memory tensor route where the
  installed SGLang has it and the server is one this engine launched on this host with one
  tensor-parallel rank. Requests switch to the new names and the old versions are unloaded.
- A server that stops answering (a transport failure) gives an SGLangServerError with the server's
  last log lines; a server this engine launched is restarted once and the wave is retried. An HTTP
  error is the server's answer: never a restart. A request the server aborts comes back as a result
  with finish_reason "abort" and the server's message; the other requests of the wave are kept.

Facts about SGLang's HTTP API (sglang 0.5.x; checked against its own classes by
tests/test_sglang_contract.py): /generate takes `input_ids` (a list of lists), `sampling_params` (a
list of dicts), `lora_path` (a list of loaded adapter names or None), `return_logprob`, `rid`; each
output has `meta_info.id`, `meta_info.finish_reason` ({"type": "stop", "matched": id or string},
{"type": "length", ...} or {"type": "abort", "message": ...}) and `meta_info.output_token_logprobs`
([logprob, token_id, text] per generated token, the log-softmax of logits / temperature before
top-k/top-p filtering: the RolloutResult convention). An abort that carries an HTTP status fails the
whole call instead; the engine then sends the wave's requests one by one to learn which failed.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from abs_fast.rollout.base import RolloutRequest, RolloutResult, SamplingParams
from abs_fast.rollout.sglang_server import (
    MIN_SGLANG_VERSION,
    ServerSettings,
    ServerUnreachable,
    SGLangRequestError,
    SGLangServer,
    SGLangServerError,
    auth_hint,
    check_key_transport,
    error_text,
    free_port,
    http_json,
    is_loopback_url,
    ram_directory,
    read_server_info,
    server_command,
    server_environment,
    tail,
)

__all__ = ["ADAPTER_SYNC_MODES", "MIN_SGLANG_VERSION", "SGLangEngine", "SGLangRequestError", "SGLangServerError",
           "ServerSettings", "TensorRoute", "fold_patterns", "free_port", "generate_payload", "is_loopback_url",
           "load_adapter_body", "read_output", "read_outputs", "server_command", "server_environment",
           "unload_adapter_body"]

logger = logging.getLogger(__name__)

ADAPTER_SYNC_MODES = ("auto", "files", "tensors")
_SINGLE_REQUEST_THREADS = 32  # requests in flight at once when a failed wave is resent one by one


def fold_patterns(config: dict, tensors: dict) -> tuple[dict, dict]:
    """An adapter SGLang's loader reads right. It takes one r and one lora_alpha for every module and
    ignores rank_pattern, alpha_pattern and use_rslora, so: every module padded with zeros to the
    largest rank, each module's own scale (alpha_i / r_i, or alpha_i / sqrt(r_i) with rsLoRA) folded
    into B, and lora_alpha = r (scale 1). The products B A x are unchanged."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    if not ranks and not alphas and not rslora:
        return config, tensors
    from abs_fast.model.adapters import _pattern_value

    r, alpha = int(config["r"]), float(config["lora_alpha"])
    r_max = max([r, *(int(v) for v in ranks.values())])
    out = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        stem = key[: -len(".lora_A.weight")]
        module = stem.split("base_model.model.", 1)[-1]
        b = tensors[stem + ".lora_B.weight"]
        rank = a.shape[0]
        module_alpha = float(_pattern_value(alphas, module, alpha))
        scale = module_alpha / (rank ** 0.5 if rslora else rank)
        padded_a = a.new_zeros(r_max, a.shape[1])
        padded_a[:rank] = a
        padded_b = b.new_zeros(b.shape[0], r_max)
        padded_b[:, :rank] = b * scale
        out[stem + ".lora_A.weight"], out[stem + ".lora_B.weight"] = padded_a, padded_b
    folded = {**config, "r": r_max, "lora_alpha": r_max, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False}
    return folded, out



def _sampling_dict(params: SamplingParams, eos_token_ids: Sequence[int]) -> dict:
    """Every SGLang sampling value, explicitly (so none comes from the model's generation_config)."""
    if params.ignore_eos and params.stop_token_ids:
        raise ValueError(f"ignore_eos=True with stop_token_ids={list(params.stop_token_ids)}: SGLang's ignore_eos also "
                         "switches stop_token_ids off, so these rows would not stop where the embedded engine stops; "
                         "drop one of them")
    stop_ids = list(params.stop_token_ids)
    if not params.ignore_eos:
        stop_ids += [i for i in eos_token_ids if i not in stop_ids]
    return {
        "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k if params.top_k > 0 else -1,
        "min_p": 0.0, "max_new_tokens": params.max_new_tokens, "min_new_tokens": 0,
        "stop": list(params.stop), "stop_token_ids": stop_ids, "ignore_eos": params.ignore_eos,
        "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
        "skip_special_tokens": False, "no_stop_trim": False, "n": 1,
    }


class TensorRoute:
    """SGLang's in-memory adapter load (/load_lora_adapter_from_tensors), as the installed sglang
    defines it: the request field and the serializer are read from sglang itself. `copies`: one
    serialized payload per tensor-parallel rank (each rank deserializes only its own), or None for
    the older single-string field. `patch`: applied before CUDA tensors are pickled (SGLang's
    reductions patch: a CUDA handle names its device by UUID, not by index, so a server whose
    CUDA_VISIBLE_DEVICES differs from the trainer's, as under torchrun, maps it to the right GPU).
    The patch handles CUDA tensors only, so CPU tensors are pickled without it."""

    def __init__(self, serialize: Callable[[dict], object], field_name: str, copies: int | None,
                 patch: Callable[[], None] | None = None):
        self.serialize, self.field_name, self.copies, self.patch = serialize, field_name, copies, patch

    def body(self, name: str, config: dict, tensors: dict) -> dict:
        if self.patch is not None and any(t.is_cuda for t in tensors.values()):
            self.patch()  # idempotent (SGLang's own guard)
        blobs = self.serialize(tensors) if self.copies is None else [self.serialize(tensors)
                                                                      for _ in range(self.copies)]
        return {"lora_name": name, "config_dict": config, self.field_name: blobs}

    @classmethod
    def detect(cls, tp_size: int = 1) -> TensorRoute | None:
        """The route of the installed sglang, with its serializer and reductions patch, or None when it
        has none (or sglang is not importable)."""
        try:
            from sglang.srt.managers import io_struct
        except Exception:
            return None
        request = getattr(io_struct, "LoadLoRAAdapterFromTensorsReqInput", None)
        if request is None:
            return None
        fields = set(getattr(request, "__dataclass_fields__", {})) | set(getattr(request, "__struct_fields__", ()))
        fields |= set(getattr(request, "__annotations__", {}))
        serializer = patch = None
        for module in ("sglang.srt.utils", "sglang.srt.utils.common"):
            with contextlib.suppress(Exception):
                serializer = __import__(module, fromlist=["MultiprocessingSerializer"]).MultiprocessingSerializer
                break
        for module in ("sglang.srt.utils.patch_torch", "sglang.srt.patch_torch"):
            with contextlib.suppress(Exception):
                patch = __import__(module, fromlist=["monkey_patch_torch_reductions"]).monkey_patch_torch_reductions
                break
        if serializer is None or patch is None:
            return None
        serialize = lambda tensors: serializer.serialize(tensors, output_str=True)
        if "serialized_named_tensors" in fields:  # newer: one copy per tensor-parallel rank
            return cls(serialize, "serialized_named_tensors", max(1, tp_size), patch)
        if "serialized_tensors" in fields:
            return cls(serialize, "serialized_tensors", None, patch)
        return None


def generate_payload(requests: list[RolloutRequest], versions: dict[str, str], eos_token_ids: Sequence[int]) -> dict:
    """The /generate body of one wave: `versions` maps an adapter to the name the server knows its
    current version by (None or "base": the base model)."""
    prompts, sampling, loras = [], [], []
    for i, request in enumerate(requests):
        if not isinstance(request, RolloutRequest):
            raise TypeError(f"request {i}: expected a RolloutRequest, got {type(request).__name__}")
        prompt = [int(t) for t in request.prompt_ids]
        if not prompt:
            raise ValueError(f"request {i}: empty prompt")
        if min(prompt) < 0:
            raise ValueError(f"request {i}: negative token id in the prompt")
        prompts.append(prompt)
        sampling.append(_sampling_dict(request.sampling, eos_token_ids))
        if request.adapter is None or request.adapter == "base":
            loras.append(None)
        elif request.adapter in versions:
            loras.append(versions[request.adapter])
        else:
            raise KeyError(f"request {i}: no adapter named {request.adapter!r} on the SGLang server (pushed: "
                           f"{sorted(versions)}; call update_adapters(policy) first; None or 'base' = no adapter)")
    return {"input_ids": prompts, "sampling_params": sampling, "lora_path": loras,
            "rid": [f"abs-{uuid.uuid4().hex}" for _ in requests], "return_logprob": True, "logprob_start_len": -1,
            "top_logprobs_num": 0, "return_text_in_logprobs": False, "stream": False}


def load_adapter_body(name: str, path: str) -> dict:
    return {"lora_name": name, "lora_path": path}


def unload_adapter_body(name: str) -> dict:
    return {"lora_name": name}


def read_outputs(requests: list[RolloutRequest], rids: list[str], outputs, tokenizer=None) -> list[RolloutResult]:
    """The results of a /generate answer, in request order (mapped by request id; by position when
    the server sends none). tokenizer: decodes text as the embedded engine does (else the server's)."""
    if isinstance(outputs, dict):
        outputs = [outputs]
    if not isinstance(outputs, list) or len(outputs) != len(requests):
        got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
        raise SGLangRequestError(f"/generate returned {got} outputs for {len(requests)} requests")
    position = {rid: i for i, rid in enumerate(rids)}
    results: list[RolloutResult | None] = [None] * len(requests)
    for k, output in enumerate(outputs):
        meta = output.get("meta_info", {}) if isinstance(output, dict) else {}
        index = position.get(meta.get("id"), k)
        if results[index] is not None:
            raise SGLangRequestError(f"/generate returned two outputs for request {index} (id {rids[index]})")
        results[index] = read_output(index, requests[index], output, tokenizer)
    return results


def read_output(index: int, request: RolloutRequest, output: dict, tokenizer=None) -> RolloutResult:
    """One /generate output as a RolloutResult; an abort is a result (finish_reason "abort")."""
    meta = output.get("meta_info") or {}
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else reason
    matched = reason.get("matched") if isinstance(reason, dict) else None
    prompt_tokens = int(meta.get("prompt_tokens", len(request.prompt_ids)))
    if kind == "abort":
        message = reason.get("message") if isinstance(reason, dict) else None
        logger.warning("request %d was aborted by the server: %s", index, message)
        return RolloutResult(token_ids=[], text="", logprobs=[], finish_reason="abort", prompt_tokens=prompt_tokens,
                             error=f"aborted by the server: {message}")
    if kind not in ("stop", "length"):
        raise SGLangRequestError(f"request {index}: unknown finish_reason {reason!r}")
    token_logprobs = meta.get("output_token_logprobs")
    if token_logprobs is None:
        raise SGLangRequestError(f"request {index}: the output has no meta_info.output_token_logprobs")
    token_ids = [int(t[1]) for t in token_logprobs]
    if output.get("output_ids") is not None and list(output["output_ids"]) != token_ids:
        raise SGLangRequestError(f"request {index}: output_ids and output_token_logprobs disagree")
    return RolloutResult(token_ids=token_ids, text=_text(output, token_ids, kind, matched, tokenizer),
                         logprobs=[float(t[0]) for t in token_logprobs], finish_reason=kind, matched_stop=matched,
                         prompt_tokens=prompt_tokens)


def _text(output: dict, token_ids: list[int], kind: str, matched, tokenizer) -> str:
    """The embedded engine's rule: a stop token is not part of the text, a stop string cuts it."""
    if tokenizer is None:
        return output.get("text", "")
    if kind == "stop" and isinstance(matched, int) and token_ids and token_ids[-1] == matched:
        return tokenizer.decode(token_ids[:-1], skip_special_tokens=False)
    text = tokenizer.decode(token_ids, skip_special_tokens=False)
    if kind == "stop" and isinstance(matched, str) and matched in text:
        text = text[: text.find(matched)]
    return text


@dataclass
class _Version:
    name: str  # the name the server knows this version by
    path: str | None  # its PEFT directory (file route), None for the tensor route


class SGLangEngine:
    """RolloutEngine on an SGLang server.

    Launch: `SGLangEngine(settings=ServerSettings(...))`; attach: `SGLangEngine(url=...)` (a server or
    an sglang-router; `worker_urls` lists the servers behind a router, which receive the adapters).
    tokenizer: decodes text the way the embedded engine does (else the server's text is used).
    eos_token_ids: added to every request's stop ids unless it sets ignore_eos.
    adapter_sync: "files" (PEFT files in adapter_dir, default a fresh /dev/shm directory),
    "tensors" (SGLang's in-memory route; an error if the installed sglang has none) or "auto".
    push_adapters=False: another process (rank 0) pushes the same versions; this engine only
    switches names (data-parallel ranks sharing one fleet). name_tag: part of every version name,
    the same on every rank that shares a fleet.
    api_key / admin_api_key (attached servers only): sent as bearer tokens, api_key on /generate and
    admin_api_key (else api_key) on the adapter routes, as SGLang's --api-key/--admin-api-key expect.
    fallback_dir: where adapter files go when the RAM directory is too small for them.
    payload_dtype: the dtype of the adapter tensors sent (the server computes LoRA in its model dtype).
    """

    def __init__(self, settings: ServerSettings | None = None, url: str | None = None,
                 worker_urls: Sequence[str] | None = None, tokenizer=None, eos_token_ids: Sequence[int] = (),
                 request_timeout: float = 900.0, adapter_sync: str = "auto", adapter_dir: str | Path | None = None,
                 push_adapters: bool = True, name_tag: str | None = None, tensor_route: TensorRoute | None = None,
                 api_key: str | None = None, admin_api_key: str | None = None, fallback_dir: str | Path | None = None,
                 payload_dtype: torch.dtype = torch.bfloat16):
        if (settings is None) == (url is None):
            raise ValueError("give either settings (launch a server) or url (attach to a running server or router)")
        if settings is not None and (api_key or admin_api_key):
            raise ValueError("API keys are for attached servers (url=...): a launched server binds to 127.0.0.1 "
                             "and takes no key")
        if api_key or admin_api_key:
            for where in [url, *(worker_urls or ())]:
                check_key_transport(where)
        self._api_key = api_key or None
        self._admin_api_key = admin_api_key or api_key or None
        if adapter_sync not in ADAPTER_SYNC_MODES:
            raise ValueError(f"adapter_sync must be one of {', '.join(ADAPTER_SYNC_MODES)}, got {adapter_sync!r}")
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.request_timeout = request_timeout
        self.push_adapters = push_adapters
        self.name_tag = name_tag or uuid.uuid4().hex[:8]
        remote = [u for u in [url or "", *(worker_urls or ())] if u and not is_loopback_url(u)]
        if remote and adapter_dir is None:
            raise ValueError(f"{remote[0]} is another machine: it cannot read adapter files from this machine's "
                             "/dev/shm; set sglang_adapter_dir to storage both machines share")
        self.adapter_dir = Path(adapter_dir) if adapter_dir is not None else ram_directory()
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        self._own_dirs = [self.adapter_dir] if adapter_dir is None else []  # removed on close
        self._fallback_dir = Path(fallback_dir) if fallback_dir is not None and adapter_dir is None else None
        self.payload_dtype = payload_dtype
        self._current: dict[str, _Version] = {}
        self._counter = 0
        self._policy = None
        self.restarts = 0
        self.last_sync_seconds = 0.0
        self._server: SGLangServer | None = None
        if settings is not None:
            log_path = Path(settings.log_path) if settings.log_path else self.adapter_dir / "sglang-server.log"
            self._server = SGLangServer(settings, log_path)
        # runs on close(), when the engine is collected, at interpreter exit, or when the rest of this
        # constructor fails (a server it refuses, e.g. too old, is stopped at once): no orphaned server
        self._finalizer = weakref.finalize(self, SGLangEngine._cleanup, self._server, self._own_dirs)
        try:
            self._start_or_attach(settings, url, worker_urls, adapter_sync, tensor_route)
        except BaseException:
            self._finalizer()
            raise

    def _start_or_attach(self, settings: ServerSettings | None, url: str | None, worker_urls: Sequence[str] | None,
                         adapter_sync: str, tensor_route: TensorRoute | None) -> None:
        """Start the server (or reach the attached one), read its version and tensor-parallel size, and
        choose how adapters travel to it."""
        if self._server is not None:
            self._server.start()
            self._server.wait_healthy(settings.startup_timeout)
            self.url = self._server.url
        else:
            self.url = url.rstrip("/")
            self._check_attached()
        self.worker_urls = [u.rstrip("/") for u in worker_urls] if worker_urls else [self.url]
        self.server_version, self.tp_size = None, 1
        for worker in self.worker_urls:
            self.server_version, self.tp_size = read_server_info(worker, key=self._api_key)
        self.adapter_sync = adapter_sync
        # tensors travel as CUDA IPC handles (naming their GPU by UUID): only a server this engine
        # launched, on this host, with one tensor-parallel rank; a server on another GPU than the
        # tensors refuses the load and "auto" falls back to files
        tensors_ok = settings is not None and self.tp_size == 1
        if adapter_sync == "tensors" and not tensors_ok:
            where = "launched" if settings is not None else "attached"
            raise ValueError("adapter_sync='tensors' needs a server abs-fast launched on this host with one "
                             f"tensor-parallel rank (this one: {where}, tp_size {self.tp_size}); use "
                             "adapter_sync='files' or 'auto'")
        self._tensor_route = tensor_route
        if adapter_sync != "files" and tensor_route is None and tensors_ok:
            self._tensor_route = TensorRoute.detect(self.tp_size)
        if adapter_sync == "tensors" and self._tensor_route is None:
            raise ValueError("adapter_sync='tensors': the installed sglang has no load_lora_adapter_from_tensors (or "
                             "sglang is not importable here); use adapter_sync='files'")
        if adapter_sync == "files" or not tensors_ok:
            self._tensor_route = None

    # --- life cycle --------------------------------------------------------------------------

    @staticmethod
    def _cleanup(server: SGLangServer | None, own_dirs: list[Path]) -> None:
        if server is not None:
            server.stop()
        for directory in own_dirs:
            shutil.rmtree(directory, ignore_errors=True)

    def close(self) -> None:
        """Stop a launched server, or unload this engine's adapter versions from an attached one (so
        repeated runs do not fill its adapter slots); delete the adapter files this engine wrote."""
        if self._server is None and self.push_adapters:
            versions = list(self._current.values())
            self._current.clear()
            for version in versions:
                try:
                    self._unload(version)
                except SGLangServerError as err:  # the server is gone: nothing left to unload
                    logger.warning(f"could not unload {version.name!r} from {self.url}: {err}")
                    break
        self._finalizer()

    def __enter__(self) -> SGLangEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def server_log(self) -> Path | None:
        return self._server.log_path if self._server is not None else None

    @property
    def gpu_free_after_start(self) -> int | None:
        """Bytes the launched server left free on its GPU when it first started (None: attached, or no CUDA)."""
        return self._server.gpu_free_after_start if self._server is not None else None

    def _check_attached(self) -> None:
        try:
            status, body = http_json(self.url + "/health", timeout=30, key=self._api_key)
        except ServerUnreachable as err:
            raise SGLangServerError(f"cannot reach the SGLang server at {self.url} ({err}); start it first, or leave "
                                    "the URL empty to let abs-fast launch one") from None
        if status != 200:
            raise SGLangServerError(f"the SGLang server at {self.url} is not healthy (/health gave HTTP {status}: "
                                    f"{body}){auth_hint(status)}")

    def _failure(self, what: str) -> SGLangServerError:
        if self._server is None:
            return SGLangServerError(f"{what}. The server at {self.url} was not started by abs-fast, so it is not "
                                     "restarted; check its own log")
        return SGLangServerError(f"{what}. Last lines of {self._server.log_path}:\n{tail(self._server.log_path)}")

    def _restart(self, reason: str) -> None:
        """Restart a launched server and reload the current adapter versions into it."""
        logger.warning(f"SGLang server failed ({reason}); restarting it (restart {self.restarts + 1})")
        self._server.stop()
        self._server.start()
        self._server.wait_healthy(self._server.settings.startup_timeout)
        self.url = self._server.url
        self.worker_urls = [self.url]
        self.restarts += 1
        for adapter, version in list(self._current.items()):
            self._load(adapter, version)

    # --- adapters ----------------------------------------------------------------------------

    @property
    def adapter_versions(self) -> dict[str, str]:
        """Adapter -> the version name requests use now."""
        return {adapter: version.name for adapter, version in self._current.items()}

    def update_adapters(self, policy, names: Sequence[str] | None = None) -> None:
        """Push the policy's current weights of `names` (default: all its adapters) as new versions,
        switch requests to them, and unload the versions they replace."""
        start = time.perf_counter()
        self._policy = policy
        names = list(names) if names is not None else list(policy.adapter_names)
        for name in names:
            policy.adapter_id(name)  # a clear KeyError for an unknown adapter
        self._counter += 1
        fresh = {name: _Version(f"{name}-{self.name_tag}-v{self._counter}", None) for name in names}
        if self.push_adapters:
            for name, version in fresh.items():
                self._load(name, version)
        replaced = [self._current[name] for name in names if name in self._current]
        self._current.update(fresh)
        for old in replaced:
            self._unload(old)
        self.last_sync_seconds = time.perf_counter() - start

    def _load(self, adapter: str, version: _Version) -> None:
        if not self.push_adapters:
            return
        policy = self._policy
        if self._tensor_route is not None and policy is not None and version.path is None:
            from abs_fast.model.adapters import peft_adapter_state

            config, tensors = fold_patterns(*peft_adapter_state(policy.target_layers(), adapter, policy.source,
                                                                to_cpu=False))
            # copies (in the payload dtype): the server maps what it is sent, and the optimizer updates the
            # parameters in place
            body = self._tensor_route.body(version.name, config, {k: v.to(self.payload_dtype, copy=True)
                                                                  for k, v in tensors.items()})
            try:
                failures = self._post_all("/load_lora_adapter_from_tensors", body)
            except SGLangServerError as err:  # the load took the server down (e.g. a handle it cannot map)
                if self.adapter_sync == "tensors" or self._server is None:
                    raise
                logger.warning("SGLang's tensor route took the server down; adapters go through files from now on")
                self._tensor_route = None
                self._restart(f"loading {version.name!r} from tensors: {str(err).splitlines()[0]}")
                failures = []
            if not failures and self._tensor_route is not None:
                return
            if failures and self.adapter_sync == "tensors":
                raise SGLangRequestError(f"loading adapter {version.name!r} from tensors failed: {failures[0]}")
            if failures:
                logger.warning(f"SGLang's tensor route failed ({failures[0]}); adapters go through files from now on")
            self._tensor_route = None
        if version.path is None:
            from abs_fast.model.adapters import peft_adapter_state, write_peft_adapter

            config, tensors = fold_patterns(*peft_adapter_state(policy.target_layers(), adapter, policy.source))
            tensors = {k: v.to(self.payload_dtype) for k, v in tensors.items()}
            directory = self._files_directory(sum(t.nbytes for t in tensors.values()))
            version.path = str(write_peft_adapter(directory / version.name, config, tensors))
        failures = self._post_all("/load_lora_adapter", load_adapter_body(version.name, version.path))
        if failures:
            raise SGLangRequestError(f"loading adapter {version.name!r} from {version.path} failed: {failures[0]}")

    def _files_directory(self, nbytes: int) -> Path:
        """Where the next adapter version's files go: the engine's RAM directory while it has room for
        two versions of every adapter (Docker's default /dev/shm is 64 MB; a 14B rank-16 adapter is
        over 100 MB), else the fallback directory (the run's), once and for good, with a warning."""
        if self._fallback_dir is None or self.adapter_dir == self._fallback_dir:
            return self.adapter_dir
        needed = 2 * nbytes * max(len(self._current), 1) + 16 * 2**20
        free = shutil.disk_usage(self.adapter_dir).free
        if free >= needed:
            return self.adapter_dir
        logger.warning("%s has %.0f MB free, too little for the adapter versions (%.0f MB); adapter files go to %s "
                       "from now on", self.adapter_dir, free / 2**20, needed / 2**20, self._fallback_dir)
        self._fallback_dir.mkdir(parents=True, exist_ok=True)
        self._own_dirs.append(self._fallback_dir)
        self.adapter_dir = self._fallback_dir
        return self.adapter_dir

    def _unload(self, version: _Version) -> None:
        if self.push_adapters:
            failures = self._post_all("/unload_lora_adapter", unload_adapter_body(version.name))
            if failures:
                logger.warning("unloading old adapter version %r failed (%s); it stays loaded", version.name,
                               failures[0])
        if version.path is not None:
            shutil.rmtree(version.path, ignore_errors=True)

    def _post_all(self, route: str, body: dict) -> list[str]:
        """POST to every worker; the failures as readable strings (empty: all succeeded)."""
        failures = []
        for url in self.worker_urls:
            try:
                status, answer = http_json(url + route, body, timeout=self.request_timeout, key=self._admin_api_key)
            except ServerUnreachable as err:
                raise self._failure(f"{route} on {url} failed: {err}") from None
            ok = status == 200 and not (isinstance(answer, dict) and answer.get("success") is False)
            if not ok:
                failures.append(f"{url}{route}: HTTP {status}: {error_text(answer)}{auth_hint(status)}")
        return failures

    # --- generation ----------------------------------------------------------------------------

    def _payload(self, requests: list[RolloutRequest]) -> dict:
        return generate_payload(requests, self.adapter_versions, self.eos_token_ids)

    def generate(self, requests: list[RolloutRequest]) -> list[RolloutResult]:
        """One /generate call for the whole wave; results in request order. A request the server
        aborts gives a result with finish_reason "abort" (its message in `error`)."""
        if not requests:
            return []
        for attempt in range(2):
            payload = self._payload(requests)
            try:
                status, outputs = http_json(self.url + "/generate", payload, timeout=self.request_timeout,
                                            key=self._api_key)
            except ServerUnreachable as err:
                failure = str(err)
                if "timed out" in failure.lower():
                    failure += f" (no answer within request_timeout={self.request_timeout:.0f} s: hung?)"
                if self._server is None or attempt == 1:
                    raise self._failure(f"/generate at {self.url} failed"
                                        f"{' again after a restart' if attempt else ''}: {failure}") from None
                self._restart(failure)
                continue
            if status == 200:
                return read_outputs(requests, payload["rid"], outputs, self.tokenizer)
            # the server answered: an error status is the wave's, never a restart
            message = f"HTTP {status}: {error_text(outputs)}{auth_hint(status)}"
            if len(requests) == 1 or status in (401, 403, 404):
                raise SGLangRequestError(f"/generate at {self.url} refused the wave: {message}")
            return self._one_by_one(requests, message)
        raise AssertionError("unreachable")

    def _one_by_one(self, requests: list[RolloutRequest], message: str) -> list[RolloutResult]:
        """After a wave failed as a whole (SGLang fails the whole call when one request aborts with an
        HTTP status), each request alone: the ones the server refuses come back as aborts."""
        logger.warning("/generate at %s refused a wave of %d requests (%s); sending them one by one to find which",
                       self.url, len(requests), message)

        def one(request: RolloutRequest) -> RolloutResult:
            payload = self._payload([request])
            try:  # no restart from here (threads): a server gone now fails the wave
                status, outputs = http_json(self.url + "/generate", payload, timeout=self.request_timeout,
                                            key=self._api_key)
            except ServerUnreachable as err:
                raise self._failure(f"/generate at {self.url} failed while the wave was resent one request at a "
                                    f"time: {err}") from None
            if status == 200:
                return read_outputs([request], payload["rid"], outputs, self.tokenizer)[0]
            return RolloutResult(token_ids=[], text="", logprobs=[], finish_reason="abort",
                                 prompt_tokens=len(request.prompt_ids),
                                 error=f"HTTP {status}: {error_text(outputs)}{auth_hint(status)}")

        with ThreadPoolExecutor(min(_SINGLE_REQUEST_THREADS, len(requests))) as pool:
            results = list(pool.map(one, requests))
        if all(result.finish_reason == "abort" for result in results):
            raise SGLangRequestError(f"/generate at {self.url} refused the wave: {message}; and every request alone "
                                     f"(first: {results[0].error})")
        return results
