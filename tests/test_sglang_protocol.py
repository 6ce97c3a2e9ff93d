"""Protocol tests of SGLangEngine against a stand-in server (tests/fake_sglang_server.py) that speaks
the documented SGLang HTTP API: launch options, request bodies, order mapping, adapter version swaps,
and what happens when the server dies or hangs. They do not show that real SGLang generates well:
the `sglang`-marked test in test_sglang_engine.py compares the real server with the embedded engine.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from abs_fast.game import turn_answer
from abs_fast.model import load_policy
from abs_fast.model.adapters import peft_adapter_state
from abs_fast.rollout import RolloutRequest, SamplingParams
from abs_fast.rollout.sglang import (
    ServerSettings,
    SGLangEngine,
    SGLangRequestError,
    SGLangServerError,
    TensorRoute,
    free_port,
    server_command,
)

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from fake_sglang_server import adapter_signature, fake_generation  # noqa: E402

EOS = (151645,)


@pytest.fixture
def policy(rng_seed):
    policy = load_policy("tiny", quantize=None, adapters=("attacker", "defender"), rank=4, seed=rng_seed % 1000)
    gen = torch.Generator().manual_seed(rng_seed)
    with torch.no_grad():  # B = 0 would make every adapter look like the base
        for p in policy.adapter_parameters("attacker") + policy.adapter_parameters("defender"):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return policy


@pytest.fixture
def journal(tmp_path) -> Path:
    return tmp_path / "journal.jsonl"


def read_journal(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def running_servers(tmp_path: Path) -> list[int]:
    """Process ids of this test's fake servers still running (their command line names its model path,
    tmp_path), read from /proc (Linux; elsewhere none are found)."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if b"fake_sglang_server" in argv and str(tmp_path).encode() in argv:
            pids.append(int(entry.name))
    return pids


def settings_for(tmp_path: Path, journal: Path, **env) -> ServerSettings:
    environment = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                   "FAKE_SGLANG_JOURNAL": str(journal), **{k: str(v) for k, v in env.items()}}
    return ServerSettings(model_path=str(tmp_path), max_lora_rank=4, lora_target_modules=("q_proj", "k_proj",
                          "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), module="fake_sglang_server",
                          env=environment, startup_timeout=60)


def signature(policy, adapter: str | None) -> float:
    """The fake server's signature of the adapter the engine sends: its tensors in the payload dtype (bf16)."""
    if adapter is None:
        return 0.0
    return adapter_signature({k: v.to(torch.bfloat16) for k, v in peft_adapter_state(policy.target_layers(),
                                                                                      adapter)[1].items()})


def expected(policy, request: RolloutRequest, adapter_signatures: dict) -> tuple[list[int], list[float], str]:
    from abs_fast.rollout.sglang import _sampling_dict

    params = _sampling_dict(request.sampling, EOS)
    tokens, logprobs, reason = fake_generation(list(request.prompt_ids), adapter_signatures[request.adapter], params)
    return tokens, logprobs, reason["type"]


def mixed_requests(rng_seed: int, n: int = 9) -> list[RolloutRequest]:
    gen = torch.Generator().manual_seed(rng_seed)
    samplings = [SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=7, stop_token_ids=(7,)),
                 SamplingParams(temperature=0.0, max_new_tokens=5),
                 SamplingParams(temperature=0.7, top_k=20, max_new_tokens=9, stop=("</answer>",), ignore_eos=True)]
    adapters = ["attacker", "defender", None]
    return [RolloutRequest(torch.randint(0, 5000, (int(torch.randint(1, 30, (1,), generator=gen)),),
                                         generator=gen).tolist(), adapters[i % 3], samplings[(i // 3) % 3])
            for i in range(n)]


def generate_calls(entries: list[dict]) -> list[dict]:
    return [e for e in entries if e["route"] == "/generate"]


# --- launch options ------------------------------------------------------------------------


def test_protocol_launch_command_sets_lora_options_and_binds_localhost(tmp_path):
    settings = ServerSettings(model_path=str(tmp_path), max_lora_rank=16, lora_target_modules=("q_proj", "v_proj"),
                              extra_args=("--mem-fraction-static", "0.4"))
    command = server_command(settings, 31234)
    assert command[1:3] == ["-m", "sglang.launch_server"]
    arg = lambda name: command[command.index(name) + 1]
    assert arg("--host") == "127.0.0.1" and arg("--port") == "31234"
    assert "--enable-lora" in command and arg("--max-lora-rank") == "16"
    i = command.index("--lora-target-modules")
    assert command[i + 1:i + 3] == ["q_proj", "v_proj"] and command[i + 3].startswith("--")
    assert int(arg("--max-loras-per-batch")) == 5  # attacker, defender, the base, and one new version of each
    assert command[-2:] == ["--mem-fraction-static", "0.4"]
    for bad in (dict(lora_target_modules=("all-linear",)), dict(max_loras_per_batch=2),
                dict(extra_args=("--host", "0.0.0.0")), dict(extra_args=("--port=1",))):
        with pytest.raises(ValueError):
            server_command(ServerSettings(**{**dict(model_path="m", max_lora_rank=8, lora_target_modules=("q_proj",)),
                                             **bad}), 1)


def test_protocol_startup_failure_shows_the_server_log(tmp_path, journal):
    settings = settings_for(tmp_path, journal)
    settings.extra_args = ("--bogus-option",)
    with pytest.raises(SGLangServerError, match=r"(?s)exited with code 2 while starting.*unrecognized arguments"):
        SGLangEngine(settings=settings)


def test_protocol_health_wait_and_startup_timeout(tmp_path, journal, policy):
    with SGLangEngine(settings=settings_for(tmp_path, journal, FAKE_SGLANG_STARTUP_503=3)) as engine:
        engine.update_adapters(policy)  # healthy after three 503s
    settings = settings_for(tmp_path, journal, FAKE_SGLANG_STARTUP_503=10**6)
    settings.startup_timeout = 2
    with pytest.raises(SGLangServerError, match="did not become healthy within 2 s"):
        SGLangEngine(settings=settings)


# --- one /generate per wave, results mapped back ---------------------------------------------


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "server-reorders"])
def test_protocol_one_generate_per_wave_with_explicit_sampling(tmp_path, journal, policy, rng_seed, reverse):
    env = {"FAKE_SGLANG_REVERSE": 1} if reverse else {}
    with SGLangEngine(settings=settings_for(tmp_path, journal, **env), eos_token_ids=EOS) as engine:
        assert engine.generate([]) == []
        engine.update_adapters(policy)
        requests = mixed_requests(rng_seed)
        results = engine.generate(requests)
        versions = engine.adapter_versions
    calls = generate_calls(read_journal(journal))
    assert len(calls) == 1
    body = calls[0]["body"]
    assert body["input_ids"] == [list(r.prompt_ids) for r in requests]
    assert body["lora_path"] == [versions[r.adapter] if r.adapter else None for r in requests]
    assert body["return_logprob"] is True and len(set(body["rid"])) == len(requests)
    for request, params in zip(requests, body["sampling_params"], strict=True):
        s = request.sampling
        assert params["temperature"] == s.temperature and params["top_p"] == s.top_p
        assert params["top_k"] == (s.top_k if s.top_k else -1) and params["max_new_tokens"] == s.max_new_tokens
        assert params["stop"] == list(s.stop) and params["ignore_eos"] == s.ignore_eos
        assert params["stop_token_ids"] == list(s.stop_token_ids) + ([] if s.ignore_eos else list(EOS))
        assert (params["min_p"], params["repetition_penalty"], params["frequency_penalty"],
                params["presence_penalty"]) == (0.0, 1.0, 0.0, 0.0)
    signatures = {a: signature(policy, a) for a in ("attacker", "defender", None)}
    assert len(set(signatures.values())) == 3
    for request, result in zip(requests, results, strict=True):
        tokens, logprobs, reason = expected(policy, request, signatures)
        assert result.token_ids == tokens and result.finish_reason == reason
        assert result.logprobs == pytest.approx(logprobs)
        assert result.prompt_tokens == len(request.prompt_ids)


def test_protocol_text_follows_the_embedded_engine_rule(tmp_path, journal, policy, qwen_tokenizer):
    # the stand-in stops early unless it draws the full length; one token allowed always ends by length
    requests = [RolloutRequest(list(range(100, 100 + n)), "attacker",
                               SamplingParams(max_new_tokens=12 if n > 2 else 1, stop_token_ids=(151643,)))
                for n in range(1, 11)]
    with SGLangEngine(settings=settings_for(tmp_path, journal), tokenizer=qwen_tokenizer) as engine:
        engine.update_adapters(policy, names=["attacker"])
        results = engine.generate(requests)
    assert {r.finish_reason for r in results} == {"stop", "length"}
    for result in results:
        text_tokens = result.token_ids[:-1] if result.finish_reason == "stop" else result.token_ids
        assert result.text == qwen_tokenizer.decode(text_tokens, skip_special_tokens=False)
        assert (result.matched_stop == 151643) == (result.finish_reason == "stop")


def test_protocol_unknown_adapter_and_base_before_any_push(tmp_path, journal, policy):
    with SGLangEngine(settings=settings_for(tmp_path, journal)) as engine:
        base = engine.generate([RolloutRequest([5, 6, 7], None, SamplingParams(max_new_tokens=4))])
        assert base[0].token_ids == fake_generation([5, 6, 7], 0.0, {"max_new_tokens": 4, "stop_token_ids": []})[0]
        with pytest.raises(KeyError, match="request 0: no adapter named 'attacker'"):
            engine.generate([RolloutRequest([5], "attacker")])
        engine.update_adapters(policy)
        with pytest.raises(KeyError, match="no adapter named"):
            engine.update_adapters(policy, names=["nobody"])


# --- live adapter updates ---------------------------------------------------------------------


def test_protocol_version_swap_sequence(tmp_path, journal, policy):
    with SGLangEngine(settings=settings_for(tmp_path, journal)) as engine:
        engine.update_adapters(policy)
        first = engine.adapter_versions
        old_dirs = {a: engine.adapter_dir / name for a, name in first.items()}
        assert all(d.is_dir() for d in old_dirs.values())
        assert str(engine.adapter_dir).startswith("/dev/shm") or not Path("/dev/shm").is_dir()
        prompt = RolloutRequest([11, 12, 13], "attacker", SamplingParams(max_new_tokens=30))
        before = engine.generate([prompt])[0].token_ids
        with torch.no_grad():
            for p in policy.adapter_parameters("attacker"):
                p.add_(0.01)
        start = len(read_journal(journal))
        engine.update_adapters(policy, names=["attacker"])
        second = engine.adapter_versions
        after = engine.generate([prompt])[0].token_ids
        sync_seconds = engine.last_sync_seconds
    assert second["defender"] == first["defender"] and second["attacker"] != first["attacker"]
    sequence = [(e["route"], e["body"].get("lora_name")) for e in read_journal(journal)[start:]]
    assert sequence == [("/load_lora_adapter", second["attacker"]), ("/unload_lora_adapter", first["attacker"]),
                        ("/generate", None)]
    assert not old_dirs["attacker"].exists()
    assert before != after
    assert after == fake_generation([11, 12, 13], signature(policy, "attacker"),
                                    {"max_new_tokens": 30, "stop_token_ids": []})[0]
    assert sync_seconds > 0


def test_protocol_tensor_route_when_the_server_has_it(tmp_path, journal, policy, capsys, caplog):
    from safetensors.torch import save

    route = TensorRoute(lambda tensors: base64.b64encode(save({k: v.cpu() for k, v in tensors.items()})).decode(),
                        "serialized_tensors", None)
    with SGLangEngine(settings=settings_for(tmp_path, journal, FAKE_SGLANG_TENSORS=1), tensor_route=route) as engine:
        engine.update_adapters(policy)
        result = engine.generate([RolloutRequest([3, 4], "defender", SamplingParams(max_new_tokens=20))])[0]
        assert not any(engine.adapter_dir.glob("defender-*"))  # nothing written to files
    loads = [e for e in read_journal(journal) if e["route"].startswith("/load")]
    assert [e["route"] for e in loads] == ["/load_lora_adapter_from_tensors"] * 2
    config = peft_adapter_state(policy.target_layers(), "defender", policy.source)[0]
    assert loads[1]["body"]["config_dict"] == json.loads(json.dumps(config))
    assert result.token_ids == fake_generation([3, 4], signature(policy, "defender"),
                                               {"max_new_tokens": 20, "stop_token_ids": []})[0]
    # a server without the route: "auto" falls back to files, "tensors" is an error
    with SGLangEngine(settings=settings_for(tmp_path, journal), tensor_route=route) as engine:
        engine.update_adapters(policy)
        assert engine.generate([RolloutRequest([3, 4], "defender", SamplingParams(max_new_tokens=20))])[0] == result
    assert any("tensor route failed" in r.getMessage() for r in caplog.records)
    with SGLangEngine(settings=settings_for(tmp_path, journal), tensor_route=route, adapter_sync="tensors") as engine, \
            pytest.raises(SGLangRequestError, match="from tensors failed"):
        engine.update_adapters(policy)
    # handles name their GPU by UUID, so a launched server on another visible GPU may take the route
    settings = settings_for(tmp_path, journal, FAKE_SGLANG_TENSORS=1)
    settings.gpu = 1
    with SGLangEngine(settings=settings, tensor_route=route, adapter_sync="tensors") as engine:
        engine.update_adapters(policy)


def test_protocol_a_tensor_load_that_kills_the_server_falls_back_to_files(tmp_path, journal, policy, caplog):
    """A scheduler that cannot map the handles dies: the engine restarts the server it launched and
    pushes through files from then on, instead of failing the run (adapter_sync=tensors: an error)."""
    from safetensors.torch import save

    route = TensorRoute(lambda tensors: base64.b64encode(save({k: v.cpu() for k, v in tensors.items()})).decode(),
                        "serialized_tensors", None)
    settings = settings_for(tmp_path, journal, FAKE_SGLANG_TENSORS=1, FAKE_SGLANG_TENSORS_CRASH=1)
    with SGLangEngine(settings=settings, tensor_route=route, eos_token_ids=EOS) as engine:
        engine.update_adapters(policy)
        assert engine.restarts == 1 and engine._tensor_route is None
        engine.update_adapters(policy)  # files from now on: no second restart
        request = RolloutRequest([5, 6], "attacker", SamplingParams(max_new_tokens=8))
        result = engine.generate([request])[0]
        assert engine.restarts == 1
    signatures = {"attacker": signature(policy, "attacker")}
    assert result.token_ids == expected(policy, request, signatures)[0]
    assert any("took the server down" in r.getMessage() for r in caplog.records)
    with SGLangEngine(settings=settings, tensor_route=route, adapter_sync="tensors") as engine, \
            pytest.raises(SGLangServerError):
        engine.update_adapters(policy)


def test_tensor_route_serializes_one_copy_per_rank():
    """Each tensor-parallel rank deserializes only its own copy (SGLang's CUDA-IPC refcounting), so
    the payload holds `copies` separate serializations, not one blob repeated."""
    calls = []
    route = TensorRoute(lambda tensors: calls.append(1) or f"blob{len(calls)}", "serialized_named_tensors", 2)
    body = route.body("a-v1", {"r": 4}, {"w": torch.zeros(2)})
    assert body["serialized_named_tensors"] == ["blob1", "blob2"] and len(calls) == 2
    single = TensorRoute(lambda tensors: "blob", "serialized_tensors", None).body("a-v1", {"r": 4}, {})
    assert single["serialized_tensors"] == "blob"


# --- failures -------------------------------------------------------------------------------------


def test_protocol_server_death_mid_wave_restarts_once(tmp_path, journal, policy, rng_seed, caplog):
    crash = tmp_path / "crash-once"
    with SGLangEngine(settings=settings_for(tmp_path, journal, FAKE_SGLANG_CRASH_ONCE_FILE=crash),
                      eos_token_ids=EOS) as engine:
        engine.update_adapters(policy)
        first_url = engine.url
        crash.touch()
        requests = mixed_requests(rng_seed, n=6)
        results = engine.generate(requests)
        assert engine.restarts == 1 and engine.url != first_url
    assert any("restarting" in r.getMessage() for r in caplog.records)
    entries = read_journal(journal)
    pids = list(dict.fromkeys(e["pid"] for e in entries))
    assert len(pids) == 2
    after = [(e["route"], e["body"].get("lora_name")) for e in entries if e["pid"] == pids[1]]
    versions = engine.adapter_versions
    assert sorted(after[:2]) == sorted(("/load_lora_adapter", v) for v in versions.values())
    assert after[2][0] == "/generate"
    signatures = {a: signature(policy, a) for a in ("attacker", "defender", None)}
    for request, result in zip(requests, results, strict=True):
        assert result.token_ids == expected(policy, request, signatures)[0]


def test_protocol_server_that_keeps_dying_gives_a_clear_error(tmp_path, journal, policy):
    with SGLangEngine(settings=settings_for(tmp_path, journal, FAKE_SGLANG_CRASH_ALWAYS=1)) as engine:
        engine.update_adapters(policy)
        with pytest.raises(SGLangServerError) as err:
            engine.generate([RolloutRequest([1, 2, 3], "attacker")])
        assert engine.restarts == 1
    message = str(err.value)
    assert "failed again after a restart" in message
    assert "simulated crash in the scheduler" in message and "sglang-server.log" in message


def test_protocol_hung_server_times_out_and_restarts(tmp_path, journal, policy):
    hang = tmp_path / "hang-once"
    with SGLangEngine(settings=settings_for(tmp_path, journal, FAKE_SGLANG_HANG_ONCE_FILE=hang),
                      request_timeout=6) as engine:
        engine.update_adapters(policy)
        hang.touch()
        result = engine.generate([RolloutRequest([9, 9], "defender", SamplingParams(max_new_tokens=6))])[0]
        assert engine.restarts == 1
    assert result.token_ids == fake_generation([9, 9], signature(policy, "defender"),
                                               {"max_new_tokens": 6, "stop_token_ids": []})[0]


def test_protocol_close_stops_the_server_and_removes_adapter_files(tmp_path, journal, policy):
    engine = SGLangEngine(settings=settings_for(tmp_path, journal))
    engine.update_adapters(policy)
    process, directory = engine._server.process, engine.adapter_dir
    engine.close()
    assert process.poll() is not None and not directory.exists()


# --- attaching to servers this engine did not start ------------------------------------------------


def start_fake(tmp_path: Path, journal: Path, **env) -> tuple[subprocess.Popen, str]:
    settings = settings_for(tmp_path, journal, **env)
    port = free_port()
    process = subprocess.Popen(server_command(settings, port), env={**os.environ, **settings.env},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            import urllib.request

            urllib.request.urlopen(url + "/health", timeout=1)
            return process, url
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("fake server did not start")


def test_protocol_attach_pushes_adapters_to_every_worker_and_never_restarts(tmp_path, journal, policy):
    with pytest.raises(SGLangServerError, match="cannot reach the SGLang server"):
        SGLangEngine(url=f"http://127.0.0.1:{free_port()}")
    (a, url_a), (b, url_b) = start_fake(tmp_path, journal), start_fake(tmp_path, journal)
    try:
        engine = SGLangEngine(url=url_a, worker_urls=[url_a, url_b])
        engine.update_adapters(policy)
        loads = [e["pid"] for e in read_journal(journal) if e["route"] == "/load_lora_adapter"]
        assert sorted(loads) == sorted([a.pid, a.pid, b.pid, b.pid])
        assert engine.generate([RolloutRequest([1], "attacker")])[0].token_ids
        a.kill()
        a.wait()
        with pytest.raises(SGLangServerError, match="not started by abs-fast, so it is not restarted"):
            engine.generate([RolloutRequest([1], "attacker")])
        engine.close()
    finally:
        for p in (a, b):
            p.kill()
            p.wait()


def test_protocol_non_owner_rank_switches_names_without_pushing(tmp_path, journal, policy):
    process, url = start_fake(tmp_path, journal)
    try:
        owner = SGLangEngine(url=url, name_tag="run1")
        follower = SGLangEngine(url=url, name_tag="run1", push_adapters=False)
        for _ in range(2):
            owner.update_adapters(policy)
            follower.update_adapters(policy)
            assert follower.adapter_versions == owner.adapter_versions
            request = RolloutRequest([4, 2], "attacker", SamplingParams(max_new_tokens=8))
            assert follower.generate([request])[0].token_ids == owner.generate([request])[0].token_ids
        pushes = [e for e in read_journal(journal) if e["route"] != "/generate"]
        assert len(pushes) == 2 + 2 + 2  # two loads per update, two unloads after the second, all by the owner
        owner.close()
        follower.close()
    finally:
        process.kill()
        process.wait()


def test_protocol_api_keys_for_an_attached_server(tmp_path, journal, policy, caplog):
    api_key, admin_key = f"k-{os.urandom(8).hex()}", f"a-{os.urandom(8).hex()}"
    process, url = start_fake(tmp_path, journal, FAKE_SGLANG_API_KEY=api_key, FAKE_SGLANG_ADMIN_API_KEY=admin_key)
    try:
        keyless = SGLangEngine(url=url)  # /health is open, as in SGLang
        with pytest.raises(SGLangRequestError, match=r"HTTP 401.*set SGLANG_API_KEY") as refused:
            keyless.update_adapters(policy)
        with pytest.raises(SGLangRequestError, match=r"HTTP 401.*SGLANG_ADMIN_API_KEY"):
            SGLangEngine(url=url, api_key=api_key).update_adapters(policy)  # the adapter routes want the admin key
        with pytest.raises(SGLangRequestError, match="HTTP 401"):
            SGLangEngine(url=url, api_key="wrong", admin_api_key=admin_key).generate([RolloutRequest([3])])
        engine = SGLangEngine(url=url, api_key=api_key, admin_api_key=admin_key, eos_token_ids=EOS)
        engine.update_adapters(policy)
        request = RolloutRequest([5, 6, 7], "defender", SamplingParams(max_new_tokens=6))
        tokens, _, _ = expected(policy, request, {"defender": signature(policy, "defender")})
        assert engine.generate([request])[0].token_ids == tokens
        engine.close()
        keyless.close()
    finally:
        process.kill()
        process.wait()
    routes = [e["route"] for e in read_journal(journal)]  # refused requests never reach a handler
    assert routes == ["/load_lora_adapter"] * 2 + ["/generate"] + ["/unload_lora_adapter"] * 2
    for text in [str(refused.value), *(r.getMessage() for r in caplog.records)]:
        assert api_key not in text and admin_key not in text
    with pytest.raises(ValueError, match="attached servers"):
        SGLangEngine(settings=settings_for(tmp_path, journal), api_key=api_key)
    with pytest.raises(ValueError, match="visible to every local user"):
        server_command(ServerSettings(model_path="m", max_lora_rank=8, lora_target_modules=("q_proj",),
                                      extra_args=("--api-key", api_key)), 1)


# --- evaluation and the trainer on an SGLang server ----------------------------------------------------


def _decoded(tokenizer, tokens: list[int], reason: dict) -> str:
    """The engine's text rule for a fake generation (a matched stop id is not part of the text)."""
    return tokenizer.decode(tokens[:-1] if reason["type"] == "stop" else tokens, skip_special_tokens=False)


def test_protocol_eval_and_crossplay_generate_on_sglang(tmp_path, journal, policy, test_data, monkeypatch,
                                                         qwen_tokenizer):
    from safetensors.torch import load_file

    from abs_fast.evaluate.commands import crossplay_command, eval_command

    monkeypatch.setenv("ABS_FAST_BACKEND", "reference")
    api_key, admin_key = f"k-{os.urandom(8).hex()}", f"a-{os.urandom(8).hex()}"
    monkeypatch.setenv("SGLANG_API_KEY", api_key)  # read by the engine builder for an attached server
    monkeypatch.setenv("SGLANG_ADMIN_API_KEY", admin_key)
    attacker_dir, defender_dir = policy.save_adapters(tmp_path / "adapters")
    signatures = {None: 0.0, **{d.name: adapter_signature({k: v.to(torch.bfloat16) for k, v in  # the payload dtype
                                                            load_file(str(d / "adapter_model.safetensors")).items()})
                                for d in (attacker_dir, defender_dir)}}
    process, url = start_fake(tmp_path, journal, FAKE_SGLANG_API_KEY=api_key, FAKE_SGLANG_ADMIN_API_KEY=admin_key)
    overrides = ["rollout_engine=sglang", f"sglang_url={url}", "judge=heuristic"]
    try:
        out, results = eval_command(str(defender_dir), [f"xstest={test_data / 'xstest_prompts.csv'}",
                                                        f"gsm8k={test_data / 'gsm8k_test_subset.jsonl'}"],
                                    overrides=overrides, output=str(tmp_path / "eval"), limit=3, max_new_tokens=6,
                                    progress=False)
        eval_entries = read_journal(journal)
        journal.unlink()
        _, cross = crossplay_command([str(attacker_dir), "base"], [str(defender_dir)], ["builtin"],
                                     overrides=overrides, output=str(tmp_path / "cross"), limit=4, max_new_tokens=6,
                                     progress=False)
        cross_entries = read_journal(journal)
    finally:
        process.kill()
        process.wait()

    # eval: one wave (3 safety prompts, then 3 GSM8K questions each for the defender and the base)
    assert results["engine"] == "sglang"
    assert [e["route"] for e in eval_entries] == ["/load_lora_adapter", "/generate", "/unload_lora_adapter"]
    version = eval_entries[0]["body"]["lora_name"]
    assert version.startswith("defender-") and eval_entries[2]["body"]["lora_name"] == version
    wave = eval_entries[1]["body"]
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(records) == len(wave["input_ids"]) == 3 + 2 * 3
    for record, prompt, params, name in zip(records, wave["input_ids"], wave["sampling_params"], wave["lora_path"],
                                            strict=True):
        assert name == (version if record["played_by"] == "defender" else None)
        assert params["temperature"] == 0.0 and params["max_new_tokens"] == 6
        tokens, _, reason = fake_generation(prompt, signatures["defender" if name else None], params)
        assert record["response"] == _decoded(qwen_tokenizer, tokens, reason)

    # cross-play: the attackers' wave, then the defender's answers to every attack; one load per adapter
    assert cross["engine"] == "sglang" and cross["attackers"] == ["attacker", "base"]
    routes = [e["route"] for e in cross_entries]
    assert routes == ["/load_lora_adapter"] * 2 + ["/generate"] * 2 + ["/unload_lora_adapter"] * 2
    names = {e["body"]["lora_name"].split("-")[0]: e["body"]["lora_name"] for e in cross_entries[:2]}
    assert set(names) == {"attacker_0", "defender_0"}  # the first attacker and defender on the command line
    wave1, wave2 = (e["body"] for e in cross_entries[2:4])
    assert wave1["lora_path"] == [names["attacker_0"]] * 4 + [None] * 4
    assert wave2["lora_path"] == [names["defender_0"]] * 8
    games = [json.loads(line) for line in (tmp_path / "cross" / "games.jsonl").read_text().splitlines()]
    for game, prompt, params in zip(games, wave2["input_ids"], wave2["sampling_params"], strict=True):
        tokens, _, reason = fake_generation(prompt, signatures["defender"], params)
        assert game["response"] == turn_answer(_decoded(qwen_tokenizer, tokens, reason), True)[0]




def test_protocol_trainer_one_generate_per_wave_and_a_push_after_each_step(tmp_path, journal, monkeypatch):
    from abs_fast.train import Trainer, apply_overrides, preset_config, read_metrics

    monkeypatch.setenv("ABS_FAST_BACKEND", "reference")
    process, url = start_fake(tmp_path, journal)
    try:
        config = apply_overrides(preset_config("tiny"), {
            "output": str(tmp_path / "run"), "steps": 2, "rollout_engine": "sglang", "sglang_url": url,
            "quantize": "none", "device": "cpu", "tensorboard": False, "progress": False, "diagnostics_every": 0,
            "rollout_batch_size": 4, "attacker_max_new_tokens": 8, "defender_max_new_tokens": 8, "lora_rank": 4})
        trainer = Trainer(config)
        trainer.train()
        trainer.close()
    finally:
        process.kill()
        process.wait()
    entries = [(e["route"], e["body"]) for e in read_journal(journal)]
    routes = [route for route, _ in entries]
    assert routes == ["/load_lora_adapter"] * 2 + (["/generate"] * 2 + ["/load_lora_adapter"] * 2
                                                   + ["/unload_lora_adapter"] * 2) * 2 + ["/unload_lora_adapter"] * 2
    loaded = [body["lora_name"] for route, body in entries if route == "/load_lora_adapter"]
    unloaded = [body["lora_name"] for route, body in entries if route == "/unload_lora_adapter"]
    # each version is unloaded when the next one is in; close() unloads the last ones from the attached server
    assert unloaded == loaded
    step2_waves = [body for route, body in entries if route == "/generate"][2:]
    names_in_step2 = {name for body in step2_waves for name in body["lora_path"] if name}
    assert names_in_step2 <= set(loaded[2:4]) and names_in_step2
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == 2 and all(r["seconds/sync"] > 0 for r in records)


# --- real-server behaviour: version gate, data parallel, error bodies, ignore_eos, environment -----


def test_protocol_old_sglang_is_refused_unless_its_radix_cache_is_off(tmp_path, journal):
    """Below 0.5.1 the radix cache keys on token ids alone: adapters would share cached prefixes."""
    with pytest.raises(SGLangServerError, match=r"0\.4\.10.*radix cache.*0\.5\.1"):
        SGLangEngine(settings=settings_for(tmp_path, journal, FAKE_SGLANG_VERSION="0.4.10.post2"))
    assert running_servers(tmp_path) == [], "the refused server was left running"
    settings = settings_for(tmp_path, journal, FAKE_SGLANG_VERSION="0.4.10")
    settings.extra_args = ("--disable-radix-cache",)
    with SGLangEngine(settings=settings) as engine:
        assert engine.server_version == "0.4.10"
    with SGLangEngine(settings=settings_for(tmp_path, journal)) as engine:
        assert engine.server_version == "0.5.23" and engine.tp_size == 1


def test_protocol_data_parallel_is_refused(tmp_path, journal, monkeypatch):
    import abs_fast.rollout.sglang as sglang_module

    settings = settings_for(tmp_path, journal)
    for option in ("--dp", "--dp-size=2", "--data-parallel-size"):
        settings.extra_args = (option, "2") if "=" not in option else (option,)
        with pytest.raises(ValueError, match="data-parallel"):
            server_command(settings, 1234)
    settings.extra_args = ()
    ram = tmp_path / "ram"  # where the engine's own adapter directory (normally in /dev/shm) goes
    ram.mkdir()
    monkeypatch.setattr(sglang_module, "ram_directory", lambda: Path(tempfile.mkdtemp(dir=ram)))
    with pytest.raises(SGLangServerError, match="dp_size=2"):
        SGLangEngine(settings=settings_for(tmp_path, journal, FAKE_SGLANG_DP=2))
    assert running_servers(tmp_path) == [], "the refused server was left running"
    assert list(ram.iterdir()) == [], "the refused engine left its adapter directory behind"


def test_protocol_an_http_error_is_the_requests_not_a_restart(tmp_path, journal, policy):
    """A 5xx is an answer: the wave fails with the server's message (OpenAI-style body), the healthy
    server is not restarted."""
    with SGLangEngine(settings=settings_for(tmp_path, journal, FAKE_SGLANG_GENERATE_500="out of KV slots"),
                      adapter_sync="files") as engine:
        engine.update_adapters(policy)
        with pytest.raises(SGLangRequestError, match="HTTP 500: out of KV slots"):
            engine.generate([RolloutRequest([1, 2, 3], "attacker")])
        assert engine.restarts == 0


def test_protocol_an_aborted_request_is_reported_alone(tmp_path, journal, policy):
    """SGLang aborts one request of a batch (finish_reason abort): that result says so, with the
    server's message, and the rest of the wave is kept."""
    requests = [RolloutRequest([99, 1], "attacker"), RolloutRequest([1, 2], "defender"), RolloutRequest([99, 5, 6])]
    with SGLangEngine(settings=settings_for(tmp_path, journal, FAKE_SGLANG_ABORT_FIRST_TOKEN=99),
                      eos_token_ids=EOS) as engine:
        engine.update_adapters(policy)
        results = engine.generate(requests)
        assert engine.restarts == 0
    assert [r.finish_reason for r in (results[0], results[2])] == ["abort", "abort"]
    assert "scheduler dropped it" in results[0].error and results[0].token_ids == []
    signatures = {name: signature(policy, name) for name in ("attacker", "defender", None)}
    assert results[1].token_ids == expected(policy, requests[1], signatures)[0]
    assert len(generate_calls(read_journal(journal))) == 1


def test_protocol_an_abort_with_a_status_fails_the_call_then_each_request_alone(tmp_path, journal, policy):
    """An abort with an HTTP status fails SGLang's whole call: the engine sends the wave's requests one
    by one, reports the aborted ones per request, and does not restart the healthy server."""
    requests = [RolloutRequest([99, 1], "attacker"), RolloutRequest([1, 2], "defender"), RolloutRequest([3, 4])]
    settings = settings_for(tmp_path, journal, FAKE_SGLANG_ABORT_STATUS_FIRST_TOKEN=99)
    with SGLangEngine(settings=settings, eos_token_ids=EOS) as engine:
        engine.update_adapters(policy)
        results = engine.generate(requests)
        assert engine.restarts == 0
        with pytest.raises(SGLangRequestError, match="context length"):  # every request refused: the wave fails
            engine.generate([RolloutRequest([99]), RolloutRequest([99, 3])])
    assert results[0].finish_reason == "abort" and "context length" in results[0].error
    signatures = {name: signature(policy, name) for name in ("attacker", "defender", None)}
    for request, result in zip(requests[1:], results[1:], strict=True):
        assert result.token_ids == expected(policy, request, signatures)[0]
    calls = generate_calls(read_journal(journal))
    assert [len(c["body"]["input_ids"]) for c in calls[:4]] == [3, 1, 1, 1]


def test_protocol_error_bodies_are_read_in_every_shape():
    from abs_fast.rollout.sglang_server import error_text as _error_text

    assert _error_text({"error": "Unauthorized"}) == "Unauthorized"
    assert _error_text({"error": {"message": "bad lora", "code": 400}}) == "bad lora"
    assert _error_text({"detail": "Not Found"}) == "Not Found"
    assert _error_text({"success": False, "error_message": "no such adapter"}) == "no such adapter"
    assert _error_text("plain text") == "plain text"


def test_protocol_ignore_eos_with_stop_ids_is_refused():
    from abs_fast.rollout.sglang import _sampling_dict

    with pytest.raises(ValueError, match="ignore_eos"):
        _sampling_dict(SamplingParams(ignore_eos=True, stop_token_ids=(7,)), EOS)
    assert _sampling_dict(SamplingParams(ignore_eos=True, stop=("x",)), EOS)["stop_token_ids"] == []


def test_protocol_both_names_of_the_original_logprob_switch_are_cleared(tmp_path, journal, monkeypatch):
    from abs_fast.rollout.sglang import server_environment

    monkeypatch.setenv("RETURN_ORIGINAL_LOGPROB", "True")
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")
    settings = settings_for(tmp_path, journal, SGLANG_RETURN_ORIGINAL_LOGPROB="1")
    env = server_environment(settings)
    assert "RETURN_ORIGINAL_LOGPROB" not in env and "SGLANG_RETURN_ORIGINAL_LOGPROB" not in env
    assert env["FAKE_SGLANG_JOURNAL"] == str(journal)


def test_protocol_tensor_route_only_for_a_launched_single_rank_server(tmp_path, journal):
    """Tensors travel as CUDA IPC handles (naming their GPU by UUID): an attached server or tensor
    parallelism get files (auto) or a clear refusal (tensors); a launched server on another visible
    GPU index keeps the route (a torchrun rank's server sees only its own GPU)."""
    route = TensorRoute(lambda tensors: "blob", "serialized_tensors", None)
    with SGLangEngine(settings=settings_for(tmp_path, journal, FAKE_SGLANG_TP=2), tensor_route=route) as engine:
        assert engine._tensor_route is None
    with pytest.raises(ValueError, match="tp_size 2"):
        SGLangEngine(settings=settings_for(tmp_path, journal, FAKE_SGLANG_TP=2), adapter_sync="tensors",
                     tensor_route=route)
    assert running_servers(tmp_path) == [], "the refused server was left running"
    settings = settings_for(tmp_path, journal)
    settings.gpu = 3
    with SGLangEngine(settings=settings, tensor_route=route) as engine:
        assert engine._tensor_route is route
    with SGLangEngine(settings=settings_for(tmp_path, journal), tensor_route=route) as launched, \
            SGLangEngine(url=launched.url, tensor_route=route) as attached:
        assert launched._tensor_route is route and attached._tensor_route is None


def test_protocol_a_remote_server_needs_a_shared_adapter_directory(tmp_path):
    from abs_fast.train import TrainConfig

    with pytest.raises(ValueError, match="sglang_adapter_dir"):
        SGLangEngine(url="http://10.1.2.3:30000")
    with pytest.raises(ValueError, match="sglang_adapter_dir"):
        TrainConfig(model="tiny", rollout_engine="sglang", sglang_url="http://gpu-node:30000").validate()
    TrainConfig(model="tiny", rollout_engine="sglang", sglang_url="http://gpu-node:30000",
                sglang_adapter_dir=str(tmp_path)).validate()
    TrainConfig(model="tiny", rollout_engine="sglang", sglang_url="http://127.0.0.1:30000").validate()


def test_protocol_rank_and_alpha_patterns_are_folded_for_sglangs_loader(rng_seed):
    """SGLang reads one r and one lora_alpha: modules padded to the largest rank, their own scale folded
    into B; every module's B A (times the scale SGLang will apply) is unchanged."""
    from abs_fast.rollout.sglang import fold_patterns

    gen = torch.Generator().manual_seed(rng_seed)
    prefix = "base_model.model.model.layers.0."
    shapes = {"self_attn.q_proj": (4, 8, 6), "mlp.down_proj": (2, 5, 7)}  # rank, out, in
    tensors = {}
    for module, (rank, out, inp) in shapes.items():
        tensors[f"{prefix}{module}.lora_A.weight"] = torch.randn(rank, inp, generator=gen)
        tensors[f"{prefix}{module}.lora_B.weight"] = torch.randn(out, rank, generator=gen)
    for rslora in (False, True):
        config = {"r": 4, "lora_alpha": 8.0, "rank_pattern": {"model.layers.0.mlp.down_proj": 2},
                  "alpha_pattern": {"model.layers.0.mlp.down_proj": 3.0}, "use_rslora": rslora}
        folded, out = fold_patterns(config, tensors)
        assert folded["r"] == 4 and folded["lora_alpha"] == 4 and not folded["rank_pattern"]
        assert not folded["alpha_pattern"] and not folded["use_rslora"]
        for module, (rank, _, _) in shapes.items():
            a, b = tensors[f"{prefix}{module}.lora_A.weight"], tensors[f"{prefix}{module}.lora_B.weight"]
            alpha = 3.0 if "down" in module else 8.0
            want = (b @ a) * alpha / (rank ** 0.5 if rslora else rank)
            a2, b2 = out[f"{prefix}{module}.lora_A.weight"], out[f"{prefix}{module}.lora_B.weight"]
            assert a2.shape[0] == 4 and b2.shape[1] == 4
            torch.testing.assert_close(b2 @ a2 * (folded["lora_alpha"] / folded["r"]), want)
    plain = {"r": 4, "lora_alpha": 8.0, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False}
    assert fold_patterns(plain, tensors) == (plain, tensors)


GIB = 2**30


def _fake_gpu(monkeypatch, free_gib: list[float]) -> list[str]:
    """CUDA as the engine sees it on one 141 GiB GPU: mem_get_info answers `free_gib` in turn; returns
    the log of cache releases and caps."""
    calls = []
    free = iter(free_gib)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (int(next(free) * GIB), 141 * GIB))
    return calls


def test_protocol_the_server_gpu_share_is_measured_and_a_restart_that_cannot_fit_is_refused(tmp_path, journal,
                                                                                           monkeypatch):
    """The first start measures what the server took (80 -> 20 GiB free: 60 GiB) after releasing this
    process's cached blocks; a restart that finds 50 GiB free (the trainer grew) is refused with the
    numbers, one that finds 70 GiB starts."""
    calls = _fake_gpu(monkeypatch, [80, 20, 50, 70, 10])
    with SGLangEngine(settings=settings_for(tmp_path, journal)) as engine:
        assert engine.gpu_free_after_start == 20 * GIB and engine._server.gpu_bytes == 60 * GIB
        assert calls == ["empty_cache", "empty_cache"]
        with pytest.raises(SGLangServerError, match=r"took 60\.0 GiB .* 50\.0 GiB are free now"):
            engine._restart("test")
        engine._restart("test")  # 70 GiB free: fits
        assert engine.restarts == 1 and engine.gpu_free_after_start == 20 * GIB  # measured once


def test_a_trainer_sharing_the_gpu_caps_its_allocator_at_what_the_server_left(monkeypatch):
    from types import SimpleNamespace

    from abs_fast.train.loop import Trainer

    caps = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=100 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 2 * GIB)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, device: caps.append((f, device)))
    trainer = SimpleNamespace(rank_device="cuda:1")
    Trainer._share_gpu_with(trainer, SimpleNamespace(gpu_free_after_start=30 * GIB))
    assert caps == [(pytest.approx(0.32), torch.device("cuda", 1))]
    Trainer._share_gpu_with(trainer, SimpleNamespace(gpu_free_after_start=None))  # attached or CPU: no cap
    assert len(caps) == 1


def test_protocol_guarded_options_are_refused_in_any_spelling_sglang_accepts():
    """SGLang's argparse expands unambiguous prefixes (--hos is --host). Without SGLang's option list,
    any prefix of an option the engine owns or refuses counts as that option; with it, the options
    resolve exactly as argparse resolves them."""
    from abs_fast.rollout.sglang_server import resolve_option, tensor_parallel_size

    base = dict(model_path="m", max_lora_rank=8, lora_target_modules=("q_proj",))
    for args, what in ((("--hos", "0.0.0.0"), "--host"), (("--hos=0.0.0.0",), "--host"), (("--po", "1"), "--port"),
                       (("--api", "k"), "--api-key"), (("--admin-api", "k"), "--admin-api-key"),
                       (("--data-p", "2"), "data-parallel"), (("--enable-lo",), "--enable-lora"),
                       (("--lora-p", "a=b"), "--lora-paths")):
        with pytest.raises(ValueError, match=what):
            server_command(ServerSettings(**base, extra_args=args), 1)
    command = server_command(ServerSettings(**base, extra_args=("--mem-fraction-static", "0.4", "--tp-size", "2")), 1)
    assert command[-4:] == ["--mem-fraction-static", "0.4", "--tp-size", "2"]
    known = ("--host", "--hot-reload", "--port", "--tp-size", "--tensor-parallel-size", "--mem-fraction-static")
    assert resolve_option("--hos", known) == "--host" and resolve_option("--mem", known) == "--mem-fraction-static"
    assert resolve_option("--ho", known) == "--ho"  # ambiguous: argparse refuses it, so the server does not start
    assert tensor_parallel_size(["--tp", "2"]) == 2 and tensor_parallel_size(["--tensor-parallel-size=4"]) == 4
    assert tensor_parallel_size(["--mem-fraction-static", "0.4"]) == 1
    with pytest.raises(ValueError, match="whole number"):
        tensor_parallel_size(["--tp-size", "two"])


def test_protocol_the_server_gets_this_process_gpu_through_an_inherited_mask(monkeypatch):
    """Under SLURM or Kubernetes the trainer sees CUDA_VISIBLE_DEVICES=4,5,6,7: its GPU 1 is the
    machine's 5, and that is what the server it launches must be given."""
    from abs_fast.rollout.sglang_server import visible_gpu

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpu(1) == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert visible_gpu(0) == "4" and visible_gpu(1) == "5"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f0e,GPU-11aa")
    assert visible_gpu(1) == "GPU-11aa"
    with pytest.raises(ValueError, match="not among the 2"):
        visible_gpu(2)


def test_protocol_tensor_parallel_servers_under_torchrun_and_a_missing_interpreter_are_refused(tmp_path,
                                                                                           monkeypatch):
    from abs_fast.train import apply_overrides, preset_config
    from abs_fast.train.build import check_before_loading

    config = apply_overrides(preset_config("tiny"), ["rollout_engine=sglang", f"model={tmp_path}",
                                                     "sglang_args=--tp 2"])
    check_before_loading(config)  # one process may run a tensor-parallel server
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"tensor parallelism 2.*torchrun"):
        check_before_loading(config)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(FileNotFoundError, match="sglang_python"):
        check_before_loading(apply_overrides(config, [f"sglang_python={tmp_path / 'nope' / 'python'}"]))
    python = tmp_path / "venv-python"
    python.write_text("#!/bin/sh\nexec python3 \"$@\"\n")
    python.chmod(0o755)
    settings = ServerSettings(model_path="m", max_lora_rank=8, lora_target_modules=("q_proj",), python=str(python))
    assert server_command(settings, 1)[0] == str(python)


def test_protocol_adapter_files_are_bf16_and_leave_a_small_dev_shm_for_the_run_directory(tmp_path, journal, policy,
                                                                                         monkeypatch, caplog):
    """Files go out in bf16 (half of fp32's bytes); where the RAM directory has less room than two
    versions of every adapter (Docker's 64 MB /dev/shm), they go to the fallback directory (the run's),
    with a warning, and it is removed on close like the RAM directory."""
    import shutil as real_shutil

    from safetensors import safe_open

    import abs_fast.rollout.sglang as sglang_module

    fallback = tmp_path / "run" / "sglang-adapters-rank0"
    with SGLangEngine(settings=settings_for(tmp_path, journal), adapter_sync="files", fallback_dir=fallback) as engine:
        ram = engine.adapter_dir
        engine.update_adapters(policy)
        first = Path(read_journal(journal)[-1]["body"]["lora_path"])
        assert first.parent == ram
        with safe_open(str(first / "adapter_model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
        usage = real_shutil.disk_usage(ram)
        monkeypatch.setattr(sglang_module.shutil, "disk_usage", lambda path: usage._replace(free=64 * 2**10))
        caplog.set_level("WARNING", logger="abs_fast")
        engine.update_adapters(policy)
        second = Path([e for e in read_journal(journal) if e["route"] == "/load_lora_adapter"][-1]["body"]["lora_path"])
        assert second.parent == fallback and (second / "adapter_model.safetensors").is_file()
        assert any("too little for the adapter versions" in r.getMessage() for r in caplog.records)
    assert not fallback.exists() and not ram.exists()
