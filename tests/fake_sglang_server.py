"""A stand-in SGLang server for the protocol tests: the documented HTTP surface of
`sglang.launch_server` (sglang 0.5.x) that abs-fast uses, with deterministic fake generation.

Run as `python -m fake_sglang_server <the sglang.launch_server options abs-fast passes>`. It checks
those options the way the issue states them (127.0.0.1 only, LoRA on, a rank, a target-module
list without "all-linear", at least 3 LoRAs per batch) and serves:

- GET /health: 200 (503 for the first FAKE_SGLANG_STARTUP_503 calls)
- GET /get_server_info: version (FAKE_SGLANG_VERSION, default 0.5.23), tp_size / dp_size
  (FAKE_SGLANG_TP / FAKE_SGLANG_DP), disable_radix_cache, model_path
- POST /generate: batched `input_ids`, one `sampling_params` dict per item (every value explicit,
  else HTTP 400), `lora_path` per item (loaded names or None), `return_logprob`, `rid`. Outputs
  carry meta_info.id, finish_reason, prompt_tokens, completion_tokens, output_token_logprobs
  ([logprob, token_id, None]) and output_ids.
- POST /load_lora_adapter {lora_name, lora_path}, POST /unload_lora_adapter {lora_name}
- POST /load_lora_adapter_from_tensors {lora_name, config_dict, serialized_tensors} when
  FAKE_SGLANG_TENSORS=1 (serialized_tensors: base64 of safetensors bytes), else 404;
  FAKE_SGLANG_TENSORS_CRASH=1 makes that route kill the server (a handle its scheduler cannot map).

The generation rule (`fake_generation`) depends on the prompt, the sampling values and the adapter's
weights (the sum of its tensors), so a test can tell which adapter version answered.
Faults, for the restart tests: FAKE_SGLANG_CRASH_ONCE_FILE / FAKE_SGLANG_HANG_ONCE_FILE (a file
whose existence makes the next /generate crash the process / hang; it is deleted first),
FAKE_SGLANG_CRASH_ALWAYS=1, FAKE_SGLANG_GENERATE_DELAY (seconds), FAKE_SGLANG_REVERSE=1 (outputs in
reverse order), FAKE_SGLANG_GENERATE_500=MESSAGE (HTTP 500 with an OpenAI-style error body).
Aborts, as SGLang 0.5.23 reports them: FAKE_SGLANG_ABORT_FIRST_TOKEN=ID aborts each request whose
prompt starts with ID (its output's finish_reason is {"type": "abort", "message": ...}, the rest of
the batch completes); FAKE_SGLANG_ABORT_STATUS_FIRST_TOKEN=ID aborts such requests with HTTP status
400, which SGLang turns into a failure of the whole call ({"error": {"message": ...}}).
Error bodies are SGLang's: {"error": {"message": ...}} for a refused request (its ValueError path),
{"detail": ...} for an unknown route, {"success": false, "error_message": ...} for adapter routes.
The tensor route takes base64 safetensors here, not SGLang's ForkingPickler blob (CUDA IPC handles
cannot cross to a CPU stand-in): tests/test_sglang_contract.py checks the real payload against
SGLang's own serializer.
FAKE_SGLANG_JOURNAL: every request is appended there as a JSON line.
Keys, as SGLang's --api-key / --admin-api-key decide them: FAKE_SGLANG_API_KEY guards /generate;
the adapter routes want FAKE_SGLANG_ADMIN_API_KEY when it is set, else FAKE_SGLANG_API_KEY; /health
is open. A missing or wrong bearer token gets 401.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "max_new_tokens", "min_new_tokens", "stop",
                 "stop_token_ids", "ignore_eos", "repetition_penalty", "frequency_penalty", "presence_penalty",
                 "skip_special_tokens", "no_stop_trim", "n")


def fake_generation(prompt: list[int], signature: float, params: dict) -> tuple[list[int], list[float], dict]:
    """(token ids, log-probs, finish_reason) the fake server returns for one item."""
    max_new = params["max_new_tokens"]
    seed = (sum(prompt) * 1_000_003 + len(prompt) * 7 + round(signature * 1e4)) % 2**31
    n = 1 + seed % max_new
    tokens = [(seed + 7919 * j) % 1000 + 10 for j in range(n)]
    if n < max_new and params["stop_token_ids"] and not params.get("ignore_eos"):  # SGLang: ignore_eos drops them
        tokens.append(params["stop_token_ids"][0])
        reason = {"type": "stop", "matched": params["stop_token_ids"][0]}
    else:
        reason = {"type": "length", "length": len(tokens)}
    logprobs = [-(((seed + j) % 97) + 1) / 10 for j in range(len(tokens))]
    return tokens, logprobs, reason


def adapter_signature(tensors: dict) -> float:
    return round(float(sum(t.double().sum() for t in tensors.values())), 4)


class _State:
    def __init__(self, args):
        self.args = args
        self.adapters: dict[str, float] = {}
        self.health_calls = 0
        self.lock = threading.Lock()


def _journal(route: str, body) -> None:
    path = os.environ.get("FAKE_SGLANG_JOURNAL")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"pid": os.getpid(), "route": route, "body": body}) + "\n")


def _make_handler(state: _State):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):
            print("fake-sglang:", format % args, flush=True)

        def _send(self, status: int, body) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                state.health_calls += 1
                if state.health_calls <= int(os.environ.get("FAKE_SGLANG_STARTUP_503", "0")):
                    return self._send(503, {"status": "starting"})
                return self._send(200, {})
            if self.path == "/get_server_info":  # a few of the real fields (server args + version)
                return self._send(200, {"version": os.environ.get("FAKE_SGLANG_VERSION", "0.5.23"),
                                        "tp_size": int(os.environ.get("FAKE_SGLANG_TP", "1")),
                                        "dp_size": int(os.environ.get("FAKE_SGLANG_DP", "1")),
                                        "disable_radix_cache": state.args.disable_radix_cache,
                                        "model_path": state.args.model_path})
            self._send(404, {"detail": "Not Found"})

        def _authorised(self) -> bool:
            api_key = os.environ.get("FAKE_SGLANG_API_KEY")
            admin_key = os.environ.get("FAKE_SGLANG_ADMIN_API_KEY")
            wanted = api_key if self.path == "/generate" else (admin_key or api_key)
            return not wanted or self.headers.get("Authorization") == f"Bearer {wanted}"

        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            raw = self.rfile.read(length)
            if not self._authorised():
                return self._send(401, {"error": "Unauthorized"})
            try:
                body = json.loads(raw or b"null")
            except json.JSONDecodeError:
                return self._send(400, {"error": {"message": "body is not JSON"}})
            route = {"/generate": self._generate, "/load_lora_adapter": self._load,
                     "/unload_lora_adapter": self._unload, "/load_lora_adapter_from_tensors": self._load_tensors}
            handler = route.get(self.path)
            if handler is None:
                return self._send(404, {"detail": "Not Found"})
            logged = dict(body) if isinstance(body, dict) else body
            if isinstance(logged, dict) and "serialized_tensors" in logged:
                logged["serialized_tensors"] = f"<{len(logged['serialized_tensors'])} chars>"
            _journal(self.path, logged)
            handler(body)

        # --- adapters -----------------------------------------------------------------------

        def _check_adapter(self, name: str, config: dict, tensors: dict):
            if name in state.adapters:
                return f"The LoRA adapter {name!r} is already loaded"
            if config.get("r", 0) > state.args.max_lora_rank:
                return f"LoRA rank {config.get('r')} exceeds --max-lora-rank {state.args.max_lora_rank}"
            extra = set(config.get("target_modules", ())) - set(state.args.lora_target_modules)
            if extra:
                return f"target modules {sorted(extra)} are not in --lora-target-modules"
            if not tensors:
                return "no tensors"
            return None

        def _load(self, body):
            from safetensors.torch import load_file

            name, path = body.get("lora_name"), Path(body.get("lora_path", ""))
            if not (path / "adapter_config.json").is_file() or not (path / "adapter_model.safetensors").is_file():
                return self._send(400, {"success": False, "error_message": f"no PEFT adapter at {path}"})
            config = json.loads((path / "adapter_config.json").read_text())
            tensors = load_file(str(path / "adapter_model.safetensors"))
            self._install(name, config, tensors)

        def _load_tensors(self, body):
            if os.environ.get("FAKE_SGLANG_TENSORS") != "1":
                return self._send(404, {"detail": "Not Found"})
            if os.environ.get("FAKE_SGLANG_TENSORS_CRASH") == "1":  # as a scheduler that cannot map a handle
                print("fake-sglang: RuntimeError: Invalid device_uuid (scheduler exits)", flush=True)
                os._exit(3)
            from safetensors.torch import load

            tensors = load(base64.b64decode(body["serialized_tensors"]))
            self._install(body.get("lora_name"), body.get("config_dict", {}), tensors)

        def _install(self, name, config, tensors):
            with state.lock:
                error = self._check_adapter(name, config, tensors)
                if error is None:
                    state.adapters[name] = adapter_signature(tensors)
            if error:
                return self._send(400, {"success": False, "error_message": error})
            self._send(200, {"success": True, "error_message": None,
                             "loaded_adapters": {n: {"lora_name": n} for n in state.adapters}})

        def _unload(self, body):
            name = body.get("lora_name")
            with state.lock:
                found = state.adapters.pop(name, None) is not None
            if not found:
                return self._send(400, {"success": False, "error_message": f"LoRA adapter {name!r} is not loaded"})
            self._send(200, {"success": True, "error_message": None})

        # --- generation ---------------------------------------------------------------------

        def _generate(self, body):
            if os.environ.get("FAKE_SGLANG_GENERATE_500"):  # the server answers with an error (it is alive)
                return self._send(500, {"error": {"message": os.environ["FAKE_SGLANG_GENERATE_500"],
                                                  "type": "InternalServerError", "code": 500}})
            crash_once = os.environ.get("FAKE_SGLANG_CRASH_ONCE_FILE")
            if os.environ.get("FAKE_SGLANG_CRASH_ALWAYS") == "1" or (crash_once and os.path.exists(crash_once)):
                if crash_once and os.path.exists(crash_once):
                    os.unlink(crash_once)
                print("fake-sglang: simulated crash in the scheduler (CUDA error: an illegal memory access)",
                      flush=True)
                os._exit(3)
            hang_once = os.environ.get("FAKE_SGLANG_HANG_ONCE_FILE")
            if hang_once and os.path.exists(hang_once):
                os.unlink(hang_once)
                print("fake-sglang: simulated hang", flush=True)
                time.sleep(3600)
            time.sleep(float(os.environ.get("FAKE_SGLANG_GENERATE_DELAY", "0")))
            prompts = body.get("input_ids")
            if not isinstance(prompts, list) or not all(isinstance(p, list) for p in prompts):
                return self._send(400, {"error": {"message": "input_ids must be a list of token id lists"}})
            n = len(prompts)
            params = body.get("sampling_params")
            params = [params] * n if isinstance(params, dict) else params
            loras = body.get("lora_path")
            loras = [loras] * n if not isinstance(loras, list) else loras
            rids = body.get("rid") or [f"fake-{i}" for i in range(n)]
            if len(params) != n or len(loras) != n or len(rids) != n:
                return self._send(400, {"error": {"message": "sampling_params, lora_path and rid need one entry per "
                                                             "input"}})
            if body.get("return_logprob") is not True:
                return self._send(400, {"error": {"message": "this fake only serves return_logprob=true"}})
            for i, p in enumerate(params):
                missing = [k for k in SAMPLING_KEYS if k not in p]
                if missing:
                    return self._send(400, {"error": {"message": f"item {i}: sampling values not set explicitly: "
                                                                 f"{missing}"}})
            with state.lock:
                unknown = sorted({name for name in loras if name is not None and name not in state.adapters})
                signatures = [0.0 if name is None else state.adapters.get(name, 0.0) for name in loras]
            if unknown:
                return self._send(400, {"error": {"message": f"LoRA adapters not loaded: {unknown}"}})
            if len(set(loras)) > state.args.max_loras_per_batch:
                return self._send(400, {"error": {"message": "more adapters in the batch than --max-loras-per-batch"}})
            abort_status = os.environ.get("FAKE_SGLANG_ABORT_STATUS_FIRST_TOKEN")
            if abort_status and any(p and p[0] == int(abort_status) for p in prompts):
                return self._send(400, {"error": {"message": "The input is longer than the model's context length "
                                                             "(fake abort with status 400)"}})
            abort_first = os.environ.get("FAKE_SGLANG_ABORT_FIRST_TOKEN")
            outputs = []
            for prompt, p, signature, rid in zip(prompts, params, signatures, rids, strict=True):
                if abort_first and prompt and prompt[0] == int(abort_first):
                    outputs.append({"text": "", "output_ids": [], "meta_info": {
                        "id": rid, "finish_reason": {"type": "abort", "message": "fake abort: scheduler dropped it"},
                        "prompt_tokens": len(prompt), "completion_tokens": 0, "cached_tokens": 0,
                        "output_token_logprobs": []}})
                    continue
                tokens, logprobs, reason = fake_generation(prompt, signature, p)
                outputs.append({
                    "text": " ".join(f"t{t}" for t in tokens), "output_ids": tokens,
                    "meta_info": {"id": rid, "finish_reason": reason, "prompt_tokens": len(prompt),
                                  "completion_tokens": len(tokens), "cached_tokens": 0,
                                  "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, tokens,
                                                                                           strict=True)]}})
            if os.environ.get("FAKE_SGLANG_REVERSE") == "1":
                outputs.reverse()
            self._send(200, outputs)

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fake_sglang_server")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--enable-lora", action="store_true", required=True)
    parser.add_argument("--max-lora-rank", type=int, required=True)
    parser.add_argument("--lora-target-modules", nargs="+", required=True)
    parser.add_argument("--max-loras-per-batch", type=int, required=True)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--random-seed", type=int, default=0)
    parser.add_argument("--tokenizer-path")
    parser.add_argument("--mem-fraction-static", type=float)
    parser.add_argument("--disable-radix-cache", action="store_true")
    args = parser.parse_args(argv)
    if args.host != "127.0.0.1":
        parser.error(f"--host {args.host}: the protocol tests expect 127.0.0.1")
    if "all-linear" in args.lora_target_modules:
        parser.error("--lora-target-modules: the engine names the trained modules, not the all-linear shorthand")
    if args.max_loras_per_batch < 3:
        parser.error("--max-loras-per-batch must hold attacker, defender and base")
    if not Path(args.model_path).exists():
        parser.error(f"--model-path {args.model_path} does not exist")
    print(f"fake-sglang: serving {args.model_path} on {args.host}:{args.port}", flush=True)
    server = ThreadingHTTPServer((args.host, args.port), _make_handler(_State(args)))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
