"""Supervising an SGLang server and talking HTTP to it: the launch command and environment, the
process (start, health wait, stop, log tail), what a server says about itself (version, topology),
and JSON requests with bearer keys. The rollout engine on top is rollout/sglang.py.

Transport failures (refused, reset, timed out) raise ServerUnreachable, the only failure a restart
may cure; an HTTP error status is the server's answer and is returned to the caller.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["MIN_SGLANG_VERSION", "SGLangRequestError", "SGLangServer", "SGLangServerError", "ServerSettings",
           "ServerUnreachable", "auth_hint", "check_key_transport", "error_text", "free_port", "http_json",
           "is_loopback_url", "ram_directory", "read_server_info", "resolve_option", "server_command",
           "server_environment", "server_options", "tail", "tensor_parallel_size", "visible_gpu"]

logger = logging.getLogger(__name__)

_LOG_TAIL_LINES = 40


class SGLangServerError(RuntimeError):
    """The server died, stopped answering, or never became healthy."""


class SGLangRequestError(RuntimeError):
    """The server answered, and refused or aborted a request (the server itself is fine)."""


class ServerUnreachable(Exception):
    """A transport-level failure (refused, reset, timed out): the only failure a restart may cure."""


@dataclass
class ServerSettings:
    """How to launch an SGLang server for a policy.

    lora_target_modules: projection names (q_proj, ...), the modules the adapters train (not the
    "all" shorthand: the server then reserves LoRA memory for exactly these). max_loras_per_batch:
    adapters that can be in one batch; the default counts every adapter, the base, and one newer
    version of each adapter.
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
    gpu: int | None = None  # this process's GPU index the server runs on (mapped through CUDA_VISIBLE_DEVICES)
    python: str = ""  # the interpreter that runs SGLang (its own environment); default: this one
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


# launch options the engine owns, refuses, or reads, as SGLang spells them
_OWNED = ("--host", "--port", "--enable-lora", "--lora-paths")
_KEYS = ("--api-key", "--admin-api-key")
_DATA_PARALLEL = ("--dp", "--dp-size", "--data-parallel-size")
_TENSOR_PARALLEL = ("--tp", "--tp-size", "--tensor-parallel-size")
_GUARDED = (*_OWNED, *_KEYS, *_DATA_PARALLEL, *_TENSOR_PARALLEL)


def _sglang_long_options() -> tuple[str, ...] | None:
    """Every long option of the installed SGLang's launch_server parser (None when SGLang does not
    import in this interpreter)."""
    try:
        import argparse

        from sglang.srt.server_args import ServerArgs
    except Exception:  # not installed, or installed for another torch
        return None
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return tuple(s for action in parser._actions for s in action.option_strings if s.startswith("--"))


def resolve_option(name: str, known: Sequence[str] | None = None) -> str:
    """The option that `name` (as written, without "=value") means to SGLang's argparse, which accepts
    any unambiguous prefix (allow_abbrev): with SGLang's own option list (`known`), exactly as argparse
    resolves it; without one, a prefix of an option the engine guards counts as that option (so
    `--hos` is `--host`), whatever else it might have meant."""
    if known is not None:
        if name in known:
            return name
        matches = [option for option in known if option.startswith(name)]
        return matches[0] if len(matches) == 1 else name
    if name in _GUARDED:
        return name
    matches = [option for option in _GUARDED if option.startswith(name) and len(name) > 2]
    return matches[0] if matches else name


def server_options(extra_args: Sequence[str], known: Sequence[str] | None = None) -> list[tuple[str, str, str | None]]:
    """(as written, the option SGLang reads, its value or None) for each long option in `extra_args`;
    `known` defaults to the installed SGLang's options when it imports."""
    known = _sglang_long_options() if known is None else known
    out = []
    for i, arg in enumerate(extra_args):
        if not arg.startswith("--") or arg == "--":
            continue
        name, equals, value = arg.partition("=")
        if not equals:
            value = extra_args[i + 1] if i + 1 < len(extra_args) and not extra_args[i + 1].startswith("-") else None
        out.append((name, resolve_option(name, known), value))
    return out


def tensor_parallel_size(extra_args: Sequence[str]) -> int:
    """The --tp-size the extra server args give the launched server (1 when they give none)."""
    for written, option, value in server_options(extra_args):
        if option in _TENSOR_PARALLEL:
            try:
                return int(value or "")
            except ValueError:
                raise ValueError(f"extra server args: {written} needs a whole number, got {value!r}") from None
    return 1


def visible_gpu(index: int) -> str:
    """What CUDA_VISIBLE_DEVICES must say for a process to see this process's GPU `index`: that entry
    of the CUDA_VISIBLE_DEVICES this process inherited (SLURM, Kubernetes), else the index itself."""
    inherited = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not inherited:
        return str(index)
    if index >= len(inherited):
        raise ValueError(f"GPU {index} is not among the {len(inherited)} this process may use "
                         f"(CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})")
    return inherited[index]


def server_command(settings: ServerSettings, port: int) -> list[str]:
    """The argv that launches an SGLang server for `settings` on 127.0.0.1:`port`."""
    modules = tuple(settings.lora_target_modules)
    if not modules or "all-linear" in modules or "all" in modules:
        raise ValueError(f"lora_target_modules must list projection names (q_proj, k_proj, ...), got {modules!r}: "
                         "the server reserves LoRA memory for exactly the modules the adapters train")
    if settings.max_lora_rank < 1:
        raise ValueError(f"max_lora_rank must be >= 1, got {settings.max_lora_rank}")
    if settings.max_loras_per_batch is not None and settings.max_loras_per_batch < 3:
        raise ValueError(f"max_loras_per_batch must be >= 3 (attacker, defender and the base in one batch), got "
                         f"{settings.max_loras_per_batch}")
    for written, option, _ in server_options(settings.extra_args):
        shown = option if written == option else f"{option} (written {written!r})"
        if option in _DATA_PARALLEL:
            raise ValueError(f"extra server args must not set {shown}: SGLang's data-parallel controller does not "
                             "load LoRA adapters (every load answers HTTP 500); run one server per GPU (torchrun "
                             "launches one per rank) or put several behind sglang-router")
        if option in _KEYS:
            raise ValueError(f"extra server args must not set {shown}: a launched server binds to 127.0.0.1, "
                             "and a key on its command line is visible to every local user; put a server that "
                             "needs a key behind sglang_url and set SGLANG_API_KEY for abs-fast")
        if option in _OWNED:
            raise ValueError(f"extra server args must not set {shown}: the engine sets it (the server binds to "
                             "127.0.0.1; adapters are loaded after start)")
    command = [settings.python or sys.executable, "-m", settings.module, "--model-path", str(settings.model_path),
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


def ram_directory() -> Path:
    """A fresh private directory in RAM (/dev/shm) where there is one, else in the temp directory."""
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="abs-fast-adapters-", dir=root))


def tail(path: Path | None, lines: int = _LOG_TAIL_LINES) -> str:
    if path is None or not path.is_file():
        return "(no server log)"
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:]) or "(the server log is empty)"


def _gpu_free_bytes(gpu: int | None) -> int | None:
    """Free memory of this process's GPU `gpu` (the current one when None), after this process's
    unused cached blocks are released; None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()  # blocks this process keeps cached but does not use go back to the GPU
    return torch.cuda.mem_get_info(gpu if gpu is not None else torch.cuda.current_device())[0]


class SGLangServer:
    """One launched server process: start, health wait, stop, log tail.

    On a GPU, SGLang sizes its static memory pool from the memory free when it starts. The first start
    measures what the server took (`gpu_bytes`) and what it left free (`gpu_free_after_start`: what a
    trainer sharing the GPU may use); each start first releases this process's cached blocks, and a
    restart that would find less free than the server took the first time is refused."""

    def __init__(self, settings: ServerSettings, log_path: Path):
        self.settings, self.log_path = settings, log_path
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.gpu_bytes: int | None = None
        self.gpu_free_after_start: int | None = None
        self._free_before: int | None = None

    def start(self) -> None:
        free = _gpu_free_bytes(self.settings.gpu)
        if self.gpu_bytes is not None and free is not None and free < self.gpu_bytes:
            gib = 2**30
            raise SGLangServerError(f"cannot restart the SGLang server: it took {self.gpu_bytes / gib:.1f} GiB of the "
                                    f"GPU when it first started and {free / gib:.1f} GiB are free now (this process "
                                    "holds the rest). Lower the trainer's memory (token_budget, engine or judge batch) "
                                    "or the server's --mem-fraction-static, then resume from the last checkpoint")
        self._free_before = free
        port = free_port()
        command = server_command(self.settings, port)
        env = server_environment(self.settings)
        if self.settings.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible_gpu(self.settings.gpu)
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
                                        f"{self.log_path}:\n{tail(self.log_path)}")
            with contextlib.suppress(ServerUnreachable):
                status, _ = http_json(self.url + "/health", timeout=10)
                if status == 200:
                    self._measure_gpu()
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise SGLangServerError(f"the SGLang server did not become healthy within {timeout:.0f} s "
                                        f"(startup_timeout). Last lines of {self.log_path}:\n{tail(self.log_path)}")
            time.sleep(0.5)

    def _measure_gpu(self) -> None:
        if self.gpu_bytes is not None or self._free_before is None:
            return
        free = _gpu_free_bytes(self.settings.gpu)
        self.gpu_free_after_start = free
        self.gpu_bytes = max(0, self._free_before - free)

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


def check_key_transport(url: str) -> None:
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


def http_json(url: str, payload: dict | None = None, timeout: float = 60.0,
              key: str | None = None) -> tuple[int, object]:
    """(status, parsed JSON or text) of a GET (payload None) or a JSON POST, with `key` as a bearer
    token when given. Transport failures (refused, reset, timed out) raise ServerUnreachable; HTTP
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
        raise ServerUnreachable(f"{url}: {type(reason).__name__}: {reason}") from None
    text = body.decode("utf-8", errors="replace")
    try:
        return status, json.loads(text) if text else None
    except json.JSONDecodeError:
        return status, text


def error_text(answer) -> str:
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


def auth_hint(status: int) -> str:
    """What to do about a refused key (the key itself is never printed)."""
    if status == 401:
        return (" (the server wants an API key: set SGLANG_API_KEY to its --api-key, and SGLANG_ADMIN_API_KEY to "
                "its --admin-api-key if it has one, in abs-fast's environment)")
    if status == 403:
        return (" (forbidden: the server's adapter routes need its --admin-api-key; set SGLANG_ADMIN_API_KEY in "
                "abs-fast's environment)")
    return ""



def read_server_info(url: str, key: str | None = None) -> tuple[str | None, int]:
    """(version, tp_size) from /get_server_info (/server_info on newer servers). Refuses a server
    older than MIN_SGLANG_VERSION unless its radix cache is off, and one with dp_size > 1."""
    info = None
    for route in ("/get_server_info", "/server_info"):
        try:
            status, body = http_json(url + route, timeout=30, key=key)
        except ServerUnreachable as err:
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
