"""The SGLang rollout engine: the waves run on an SGLang server (continuous batching, radix cache,
CUDA graphs, multi-LoRA kernels) while the trainer keeps its own fused kernels.

- The server is a subprocess bound to 127.0.0.1 on a free port (or an existing server or
  sglang-router URL is attached to). LoRA is on, with an explicit rank, an explicit list of target
  modules, and room for every adapter, the base and one version swap per adapter.
- One /generate call per wave: input_ids, one sampling dict per request with every value set (so
  nothing comes from the model's generation_config), one lora_path per request (None = base),
  output log-probs, and one request id per item, so results are mapped back by id.
- After each optimizer step the adapters are pushed under new versioned names: PEFT files in a
  RAM-backed directory and /load_lora_adapter, or SGLang's in-memory tensor route where the
  installed SGLang has it. Requests switch to the new names; an old version is unloaded as soon as
  no request in flight uses it.
- A dead, unhealthy or hung server gives an SGLangServerError with the server's last log lines.
  A server this engine launched is restarted once per failure and the wave is retried.

Facts about SGLang's HTTP API (sglang 0.5.x): /generate takes `input_ids` (a list of lists),
`sampling_params` (a list of dicts), `lora_path` (a list of loaded adapter names or None),
`return_logprob`, `rid`; each output has `meta_info.id`, `meta_info.finish_reason` ({"type": "stop",
"matched": id or string} or {"type": "length", ...} or {"type": "abort", "message": ...}) and
`meta_info.output_token_logprobs` ([logprob, token_id, text] per generated token, the log-softmax of
logits / temperature before top-k/top-p filtering: the RolloutResult convention).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from abs_fast.rollout.base import RolloutRequest, RolloutResult, SamplingParams

__all__ = ["ADAPTER_SYNC_MODES", "SGLangEngine", "SGLangRequestError", "SGLangServerError", "ServerSettings",
           "free_port", "server_command"]

logger = logging.getLogger(__name__)

ADAPTER_SYNC_MODES = ("auto", "files", "tensors")
_LOG_TAIL_LINES = 40


class SGLangServerError(RuntimeError):
    """The server died, stopped answering, or never became healthy."""


class SGLangRequestError(RuntimeError):
    """The server answered, and refused or aborted a request (the server itself is fine)."""


class _ServerFailure(Exception):
    """Internal: a transport-level failure that a restart may cure."""


@dataclass
class ServerSettings:
    """How to launch an SGLang server for a policy.

    lora_target_modules: projection names (q_proj, ...); never "all-linear", which SGLang's LoRA
    loader does not accept as a target list. max_loras_per_batch: adapters that can be in one
    batch; the default counts every adapter, the base, and one newer version of each adapter.
    extra_args: more `sglang.launch_server` options (e.g. --mem-fraction-static 0.4); --host and
    --port are this engine's to set."""

    model_path: str
    max_lora_rank: int
    lora_target_modules: tuple[str, ...]
    adapters: tuple[str, ...] = ("attacker", "defender")
    max_loras_per_batch: int | None = None
    tokenizer_path: str | None = None
    dtype: str = "auto"
    seed: int = 0
    extra_args: tuple[str, ...] = ()
    gpu: int | None = None  # CUDA_VISIBLE_DEVICES for the server process
    startup_timeout: float = 900.0
    log_path: str | None = None  # default: a file in the engine's adapter directory
    module: str = "sglang.launch_server"  # the Python module that serves (tests use a stand-in)
    env: dict[str, str] = field(default_factory=dict)

    def loras_per_batch(self) -> int:
        needed = 2 * len(self.adapters) + 1  # each adapter, its next version, and the base
        return max(self.max_loras_per_batch or needed, 3)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(settings: ServerSettings, port: int) -> list[str]:
    """The argv that launches an SGLang server for `settings` on 127.0.0.1:`port`."""
    modules = tuple(settings.lora_target_modules)
    if not modules or "all-linear" in modules or "all" in modules:
        raise ValueError(f"lora_target_modules must list projection names (q_proj, k_proj, ...), got {modules!r}: "
                         "SGLang's LoRA loader breaks on 'all-linear'")
    if settings.max_lora_rank < 1:
        raise ValueError(f"max_lora_rank must be >= 1, got {settings.max_lora_rank}")
    if settings.max_loras_per_batch is not None and settings.max_loras_per_batch < 3:
        raise ValueError(f"max_loras_per_batch must be >= 3 (attacker, defender and the base in one batch), got "
                         f"{settings.max_loras_per_batch}")
    for option in ("--dp", "--dp-size", "--data-parallel-size"):
        if any(arg == option or arg.startswith(option + "=") for arg in settings.extra_args):
            raise ValueError(f"extra server args must not set {option}: SGLang's data-parallel controller does not "
                             "load LoRA adapters (every load answers HTTP 500); run one server per GPU (torchrun "
                             "launches one per rank) or put several behind sglang-router")
    for option in ("--host", "--port", "--enable-lora", "--lora-paths", "--api-key", "--admin-api-key"):
        if any(arg == option or arg.startswith(option + "=") for arg in settings.extra_args):
            if option.endswith("api-key"):
                raise ValueError(f"extra server args must not set {option}: a launched server binds to 127.0.0.1, "
                                 "and a key on its command line is visible to every local user; put a server that "
                                 "needs a key behind sglang_url and set SGLANG_API_KEY for abs-fast")
            raise ValueError(f"extra server args must not set {option}: the engine sets it (the server binds to "
                             "127.0.0.1; adapters are loaded after start)")
    command = [sys.executable, "-m", settings.module, "--model-path", str(settings.model_path),
               "--host", "127.0.0.1", "--port", str(port), "--enable-lora",
               "--max-lora-rank", str(settings.max_lora_rank), "--lora-target-modules", *modules,
               "--max-loras-per-batch", str(settings.loras_per_batch()),
               "--dtype", settings.dtype, "--random-seed", str(settings.seed)]
    if settings.tokenizer_path:
        command += ["--tokenizer-path", str(settings.tokenizer_path)]
    return command + list(settings.extra_args)


# switches SGLang's returned log-probs to pre-temperature values; renamed between 0.5.3 and 0.5.6
_ORIGINAL_LOGPROB_VARIABLES = ("RETURN_ORIGINAL_LOGPROB", "SGLANG_RETURN_ORIGINAL_LOGPROB")
MIN_SGLANG_VERSION = (0, 5, 1)  # LoRA-aware radix cache: below it, adapters share each other's cached prefixes


def server_environment(settings: ServerSettings) -> dict[str, str]:
    """The launched server's environment: ours and the settings', without either name of the
    original-log-prob switch (the engine's log-probs must be those of the tempered distribution)."""
    env = {**os.environ, **settings.env}
    for name in _ORIGINAL_LOGPROB_VARIABLES:
        env.pop(name, None)
    return env


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


def _ram_directory() -> Path:
    """A fresh private directory in RAM (/dev/shm) where there is one, else in the temp directory."""
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="abs-fast-adapters-", dir=root))


def _tail(path: Path | None, lines: int = _LOG_TAIL_LINES) -> str:
    if path is None or not path.is_file():
        return "(no server log)"
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:]) or "(the server log is empty)"


class _Server:
    """One launched server process: start, health wait, stop, log tail."""

    def __init__(self, settings: ServerSettings, log_path: Path):
        self.settings, self.log_path = settings, log_path
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> None:
        port = free_port()
        command = server_command(self.settings, port)
        env = server_environment(self.settings)
        if self.settings.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.settings.gpu)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- abs-fast: {' '.join(command)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                code = self.process.returncode if self.process is not None else None
                raise SGLangServerError(f"the SGLang server exited with code {code} while starting. Last lines of "
                                        f"{self.log_path}:\n{_tail(self.log_path)}")
            with contextlib.suppress(_ServerFailure):
                status, _ = _http(self.url + "/health", timeout=10)
                if status == 200:
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise SGLangServerError(f"the SGLang server did not become healthy within {timeout:.0f} s "
                                        f"(startup_timeout). Last lines of {self.log_path}:\n{_tail(self.log_path)}")
            time.sleep(0.5)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def is_loopback_url(url: str) -> bool:
    """Whether `url` names this machine (localhost, 127.0.0.0/8, ::1)."""
    import ipaddress
    import urllib.parse

    host = urllib.parse.urlparse(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_key_transport(url: str) -> None:
    """A bearer key travels only over https or to this machine (loopback), unless
    SGLANG_ALLOW_PLAIN_HTTP_KEY=1 says the network between is trusted."""
    import urllib.parse

    parsed = urllib.parse.urlparse(url)
    host = parsed.hostname or ""
    if parsed.scheme == "https" or is_loopback_url(url) or os.environ.get("SGLANG_ALLOW_PLAIN_HTTP_KEY") == "1":
        return
    raise ValueError(f"SGLANG_API_KEY would be sent in clear over {parsed.scheme}:// to {host}: use an https:// URL "
                     "for sglang_url, a server on 127.0.0.1, or set SGLANG_ALLOW_PLAIN_HTTP_KEY=1 if the network is "
                     "trusted")


def _http(url: str, payload: dict | None = None, timeout: float = 60.0, key: str | None = None) -> tuple[int, object]:
    """(status, parsed JSON or text) of a GET (payload None) or a JSON POST, with `key` as a bearer
    token when given. Transport failures (refused, reset, timed out) raise _ServerFailure; HTTP
    error statuses are returned."""
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=data, method="GET" if payload is None else "POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read()
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise _ServerFailure(f"{url}: {type(reason).__name__}: {reason}") from None
    text = body.decode("utf-8", errors="replace")
    try:
        return status, json.loads(text) if text else None
    except json.JSONDecodeError:
        return status, text


def _error_text(answer) -> str:
    """The message of an SGLang error body: {"error": "..."} or {"error": {"message": ...}} (OpenAI
    style), {"detail": ...} (FastAPI), {"message": ...} / {"error_message": ...}; else the body."""
    if isinstance(answer, dict):
        for key in ("error", "detail", "error_message", "message"):
            value = answer.get(key)
            if isinstance(value, dict):
                value = value.get("message") or value
            if value:
                return str(value)
    return str(answer)


def _auth_hint(status: int) -> str:
    """What to do about a refused key (the key itself is never printed)."""
    if status == 401:
        return (" (the server wants an API key: set SGLANG_API_KEY to its --api-key, and SGLANG_ADMIN_API_KEY to "
                "its --admin-api-key if it has one, in abs-fast's environment)")
    if status == 403:
        return (" (forbidden: the server's adapter routes need its --admin-api-key; set SGLANG_ADMIN_API_KEY in "
                "abs-fast's environment)")
    return ""


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
    defines it: the request field and the serializer are read from sglang itself."""

    def __init__(self, serialize: Callable[[dict], object], field_name: str, copies: int | None):
        self.serialize, self.field_name, self.copies = serialize, field_name, copies

    def body(self, name: str, config: dict, tensors: dict) -> dict:
        blob = self.serialize(tensors)
        return {"lora_name": name, "config_dict": config,
                self.field_name: blob if self.copies is None else [blob] * self.copies}

    @classmethod
    def detect(cls, tp_size: int = 1) -> TensorRoute | None:
        """The route of the installed sglang, or None when it has none (or sglang is not importable)."""
        try:
            from sglang.srt.managers import io_struct
        except Exception:
            return None
        request = getattr(io_struct, "LoadLoRAAdapterFromTensorsReqInput", None)
        if request is None:
            return None
        fields = set(getattr(request, "__dataclass_fields__", {})) | set(getattr(request, "__struct_fields__", ()))
        fields |= set(getattr(request, "__annotations__", {}))
        serializer = None
        for module in ("sglang.srt.utils", "sglang.srt.utils.utils"):
            with contextlib.suppress(Exception):
                serializer = __import__(module, fromlist=["MultiprocessingSerializer"]).MultiprocessingSerializer
                break
        if serializer is None:
            return None
        serialize = lambda tensors: serializer.serialize(tensors, output_str=True)
        if "serialized_named_tensors" in fields:  # newer: one copy per tensor-parallel rank
            return cls(serialize, "serialized_named_tensors", max(1, tp_size))
        if "serialized_tensors" in fields:
            return cls(serialize, "serialized_tensors", None)
        return None


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
    """

    def __init__(self, settings: ServerSettings | None = None, url: str | None = None,
                 worker_urls: Sequence[str] | None = None, tokenizer=None, eos_token_ids: Sequence[int] = (),
                 request_timeout: float = 900.0, adapter_sync: str = "auto", adapter_dir: str | Path | None = None,
                 push_adapters: bool = True, name_tag: str | None = None, tensor_route: TensorRoute | None = None,
                 api_key: str | None = None, admin_api_key: str | None = None):
        if (settings is None) == (url is None):
            raise ValueError("give either settings (launch a server) or url (attach to a running server or router)")
        if settings is not None and (api_key or admin_api_key):
            raise ValueError("API keys are for attached servers (url=...): a launched server binds to 127.0.0.1 "
                             "and takes no key")
        if api_key or admin_api_key:
            for where in [url, *(worker_urls or ())]:
                _check_key_transport(where)
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
        self._own_dir = adapter_dir is None
        self.adapter_dir = Path(adapter_dir) if adapter_dir is not None else _ram_directory()
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()
        self._retiring: dict[str, _Version] = {}
        self._current: dict[str, _Version] = {}
        self._counter = 0
        self._policy = None
        self.restarts = 0
        self.last_sync_seconds = 0.0
        self._server: _Server | None = None
        if settings is not None:
            log_path = Path(settings.log_path) if settings.log_path else self.adapter_dir / "sglang-server.log"
            self._server = _Server(settings, log_path)
            self._server.start()
            self._server.wait_healthy(settings.startup_timeout)
            self.url = self._server.url
        else:
            self.url = url.rstrip("/")
            self._check_attached()
        self.worker_urls = [u.rstrip("/") for u in worker_urls] if worker_urls else [self.url]
        self.server_version, self.tp_size = None, 1
        for worker in self.worker_urls:
            self.server_version, self.tp_size = self._check_server_info(worker)
        self.adapter_sync = adapter_sync
        # tensors travel as CUDA IPC handles that name a device by index: only a server this engine
        # launched, on this host, seeing the same device index, with one tensor-parallel rank
        tensors_ok = settings is not None and settings.gpu in (None, 0) and self.tp_size == 1
        if adapter_sync == "tensors" and not tensors_ok:
            where = "launched" if settings is not None else "attached"
            raise ValueError("adapter_sync='tensors' needs a server abs-fast launched on this host, on its first "
                             f"visible GPU, with one tensor-parallel rank (this one: {where}, tp_size {self.tp_size}); "
                             "use adapter_sync='files' or 'auto'")
        self._tensor_route = tensor_route
        if adapter_sync != "files" and tensor_route is None and tensors_ok:
            self._tensor_route = TensorRoute.detect(self.tp_size)
        if adapter_sync == "tensors" and self._tensor_route is None:
            raise ValueError("adapter_sync='tensors': the installed sglang has no load_lora_adapter_from_tensors (or "
                             "sglang is not importable here); use adapter_sync='files'")
        if adapter_sync == "files" or not tensors_ok:
            self._tensor_route = None
        # runs on close(), when the engine is collected, or at interpreter exit: no orphaned server
        self._finalizer = weakref.finalize(self, SGLangEngine._cleanup, self._server, self.adapter_dir, self._own_dir)

    # --- life cycle --------------------------------------------------------------------------

    @staticmethod
    def _cleanup(server: _Server | None, adapter_dir: Path, own_dir: bool) -> None:
        if server is not None:
            server.stop()
        if own_dir:
            shutil.rmtree(adapter_dir, ignore_errors=True)

    def close(self) -> None:
        """Stop a launched server, or unload this engine's adapter versions from an attached one (so
        repeated runs do not fill its adapter slots); delete the adapter files this engine wrote."""
        if self._server is None and self.push_adapters:
            with self._lock:
                versions = [*self._current.values(), *self._retiring.values()]
                self._current.clear()
                self._retiring.clear()
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

    def _check_attached(self) -> None:
        try:
            status, body = _http(self.url + "/health", timeout=30, key=self._api_key)
        except _ServerFailure as err:
            raise SGLangServerError(f"cannot reach the SGLang server at {self.url} ({err}); start it first, or leave "
                                    "the URL empty to let abs-fast launch one") from None
        if status != 200:
            raise SGLangServerError(f"the SGLang server at {self.url} is not healthy (/health gave HTTP {status}: "
                                    f"{body}){_auth_hint(status)}")

    def _check_server_info(self, url: str) -> tuple[str | None, int]:
        """(version, tp_size) from /get_server_info (/server_info on newer servers). Refuses a server
        older than MIN_SGLANG_VERSION unless its radix cache is off, and one with dp_size > 1."""
        info = None
        for route in ("/get_server_info", "/server_info"):
            try:
                status, body = _http(url + route, timeout=30, key=self._api_key)
            except _ServerFailure as err:
                raise SGLangServerError(f"cannot read {url}{route}: {err}") from None
            if status == 200 and isinstance(body, dict):
                info = body
                break
        if info is None:
            logger.warning("%s does not say its SGLang version (no /get_server_info): make sure it is %s or newer, "
                           "or runs with --disable-radix-cache", url, ".".join(map(str, MIN_SGLANG_VERSION)))
            return None, 1
        version = str(info.get("version") or "")
        numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:3])
        if numbers and numbers < MIN_SGLANG_VERSION and not info.get("disable_radix_cache"):
            raise SGLangServerError(
                f"{url} runs SGLang {version}, whose radix cache keys on token ids alone: the attacker, the defender "
                f"and the base share chat-template prefixes and would reuse each other's KV cache (wrong tokens and "
                f"log-probs, no error). Use SGLang {'.'.join(map(str, MIN_SGLANG_VERSION))} or newer, or start it "
                "with --disable-radix-cache")
        if int(info.get("dp_size") or 1) > 1:
            raise SGLangServerError(f"{url} runs with dp_size={info.get('dp_size')}: SGLang's data-parallel controller "
                                    "does not load LoRA adapters; use one server per GPU behind sglang-router")
        return version or None, int(info.get("tp_size") or 1)

    def _failure(self, what: str) -> SGLangServerError:
        if self._server is None:
            return SGLangServerError(f"{what}. The server at {self.url} was not started by abs-fast, so it is not "
                                     "restarted; check its own log")
        return SGLangServerError(f"{what}. Last lines of {self._server.log_path}:\n{_tail(self._server.log_path)}")

    def _restart(self, reason: str) -> None:
        """Restart a launched server and reload the current adapter versions into it."""
        logger.warning(f"SGLang server failed ({reason}); restarting it (restart {self.restarts + 1})")
        self._server.stop()
        self._server.start()
        self._server.wait_healthy(self._server.settings.startup_timeout)
        self.url = self._server.url
        self.worker_urls = [self.url]
        self.restarts += 1
        with self._lock:
            versions = list(self._current.items())
            self._retiring.clear()
            self._in_flight.clear()
        for adapter, version in versions:
            self._load(adapter, version)

    # --- adapters ----------------------------------------------------------------------------

    @property
    def adapter_versions(self) -> dict[str, str]:
        """Adapter -> the version name requests use now."""
        return {adapter: version.name for adapter, version in self._current.items()}

    def update_adapters(self, policy, names: Sequence[str] | None = None) -> None:
        """Push the policy's current weights of `names` (default: all its adapters) as new versions,
        switch requests to them, and unload the versions they replace once no request uses them."""
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
        with self._lock:
            replaced = [self._current[name] for name in names if name in self._current]
            self._current.update(fresh)
            idle = []
            for old in replaced:
                if self._in_flight[old.name]:
                    self._retiring[old.name] = old
                else:
                    idle.append(old)
        for old in idle:
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
            # copies: the server maps what it is sent, and the optimizer updates the parameters in place
            body = self._tensor_route.body(version.name, config, {k: v.clone() for k, v in tensors.items()})
            failures = self._post_all("/load_lora_adapter_from_tensors", body)
            if not failures:
                return
            if self.adapter_sync == "tensors":
                raise SGLangRequestError(f"loading adapter {version.name!r} from tensors failed: {failures[0]}")
            logger.warning(f"SGLang's tensor route failed ({failures[0]}); adapters go through files from now on")
            self._tensor_route = None
        if version.path is None:
            from abs_fast.model.adapters import peft_adapter_state, write_peft_adapter

            state = fold_patterns(*peft_adapter_state(policy.target_layers(), adapter, policy.source))
            version.path = str(write_peft_adapter(self.adapter_dir / version.name, *state))
        failures = self._post_all("/load_lora_adapter", {"lora_name": version.name, "lora_path": version.path})
        if failures:
            raise SGLangRequestError(f"loading adapter {version.name!r} from {version.path} failed: {failures[0]}")

    def _unload(self, version: _Version) -> None:
        if self.push_adapters:
            failures = self._post_all("/unload_lora_adapter", {"lora_name": version.name})
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
                status, answer = _http(url + route, body, timeout=self.request_timeout, key=self._admin_api_key)
            except _ServerFailure as err:
                raise self._failure(f"{route} on {url} failed: {err}") from None
            ok = status == 200 and not (isinstance(answer, dict) and answer.get("success") is False)
            if not ok:
                failures.append(f"{url}{route}: HTTP {status}: {_error_text(answer)}{_auth_hint(status)}")
        return failures

    # --- generation ----------------------------------------------------------------------------

    def _server_name(self, index: int, adapter: str | None) -> str | None:
        if adapter is None or adapter == "base":
            return None
        version = self._current.get(adapter)
        if version is None:
            known = sorted(self._current)
            raise KeyError(f"request {index}: no adapter named {adapter!r} on the SGLang server (pushed: {known}; "
                           "call update_adapters(policy) first; None or 'base' = no adapter)")
        return version.name

    def _payload(self, requests: list[RolloutRequest]) -> tuple[dict, list[str]]:
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
            sampling.append(_sampling_dict(request.sampling, self.eos_token_ids))
            loras.append(self._server_name(i, request.adapter))
        rids = [f"abs-{uuid.uuid4().hex}" for _ in requests]
        payload = {"input_ids": prompts, "sampling_params": sampling, "lora_path": loras, "rid": rids,
                   "return_logprob": True, "logprob_start_len": -1, "top_logprobs_num": 0,
                   "return_text_in_logprobs": False, "stream": False}
        return payload, [name for name in loras if name is not None]

    def _acquire(self, names: list[str]) -> None:
        with self._lock:
            self._in_flight.update(names)

    def _release(self, names: list[str]) -> None:
        idle = []
        with self._lock:
            self._in_flight.subtract(names)
            for name in set(names):
                if self._in_flight[name] <= 0:
                    del self._in_flight[name]
                    if name in self._retiring:
                        idle.append(self._retiring.pop(name))
        for old in idle:
            self._unload(old)

    def generate(self, requests: list[RolloutRequest]) -> list[RolloutResult]:
        """One /generate call for the whole wave; results in request order."""
        if not requests:
            return []
        for attempt in range(2):
            payload, names = self._payload(requests)
            self._acquire(names)
            try:
                status, outputs = _http(self.url + "/generate", payload, timeout=self.request_timeout,
                                        key=self._api_key)
                failure = None  # the server answered: an error status is the request's, never a restart
            except _ServerFailure as err:
                failure = str(err)
                if "timed out" in failure.lower():
                    failure += f" (no answer within request_timeout={self.request_timeout:.0f} s: hung?)"
            finally:
                self._release(names)
            if failure is None:
                if status != 200:
                    raise SGLangRequestError(f"/generate at {self.url} refused the wave: HTTP {status}: "
                                             f"{_error_text(outputs)}{_auth_hint(status)}")
                return self._results(requests, payload["rid"], outputs)
            if self._server is None or attempt == 1:
                raise self._failure(f"/generate at {self.url} failed{' again after a restart' if attempt else ''}: "
                                    f"{failure}")
            self._restart(failure)
        raise AssertionError("unreachable")

    def _results(self, requests: list[RolloutRequest], rids: list[str], outputs) -> list[RolloutResult]:
        if isinstance(outputs, dict):
            outputs = [outputs]
        if not isinstance(outputs, list) or len(outputs) != len(requests):
            got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
            raise SGLangRequestError(f"/generate returned {got} outputs for {len(requests)} requests")
        position = {rid: i for i, rid in enumerate(rids)}
        results: list[RolloutResult | None] = [None] * len(requests)
        for k, output in enumerate(outputs):
            meta = output.get("meta_info", {}) if isinstance(output, dict) else {}
            index = position.get(meta.get("id"), k)  # by request id; by position if the server sends none
            if results[index] is not None:
                raise SGLangRequestError(f"/generate returned two outputs for request {index} (id {rids[index]})")
            results[index] = self._result(index, requests[index], output)
        return results

    def _result(self, index: int, request: RolloutRequest, output: dict) -> RolloutResult:
        meta = output.get("meta_info") or {}
        token_logprobs = meta.get("output_token_logprobs")
        if token_logprobs is None:
            raise SGLangRequestError(f"request {index}: the output has no meta_info.output_token_logprobs")
        token_ids = [int(t[1]) for t in token_logprobs]
        if output.get("output_ids") is not None and list(output["output_ids"]) != token_ids:
            raise SGLangRequestError(f"request {index}: output_ids and output_token_logprobs disagree")
        logprobs = [float(t[0]) for t in token_logprobs]
        reason = meta.get("finish_reason") or {}
        kind = reason.get("type") if isinstance(reason, dict) else reason
        matched = reason.get("matched") if isinstance(reason, dict) else None
        if kind == "abort":
            raise SGLangRequestError(f"request {index}: aborted by the server: {reason.get('message')}")
        if kind not in ("stop", "length"):
            raise SGLangRequestError(f"request {index}: unknown finish_reason {reason!r}")
        return RolloutResult(token_ids=token_ids, text=self._text(output, token_ids, kind, matched),
                             logprobs=logprobs, finish_reason=kind, matched_stop=matched,
                             prompt_tokens=int(meta.get("prompt_tokens", len(request.prompt_ids))))

    def _text(self, output: dict, token_ids: list[int], kind: str, matched) -> str:
        """The embedded engine's rule: a stop token is not part of the text, a stop string cuts it."""
        if self.tokenizer is None:
            return output.get("text", "")
        if kind == "stop" and isinstance(matched, int) and token_ids and token_ids[-1] == matched:
            return self.tokenizer.decode(token_ids[:-1], skip_special_tokens=False)
        text = self.tokenizer.decode(token_ids, skip_special_tokens=False)
        if kind == "stop" and isinstance(matched, str) and matched in text:
            text = text[: text.find(matched)]
        return text
