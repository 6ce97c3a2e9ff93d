"""SGLang's own code judges what abs-fast sends it. Run by tests/test_sglang_contract.py in a
subprocess whose path holds the pinned SGLang (scripts/sglang-contract-env.sh): each check builds
what the client builds (with the client's own functions) and hands it to SGLang's classes, parser
and serializer. Prints one JSON object: {check name: {"ok": bool, "detail": str}}.

Usage: python probe.py EXPECTED_SGLANG_VERSION
"""

from __future__ import annotations

import json
import sys
import traceback

RESULTS: dict[str, dict] = {}


def check(function):
    try:
        detail = function() or ""
        RESULTS[function.__name__] = {"ok": True, "detail": str(detail)}
    except Exception:
        RESULTS[function.__name__] = {"ok": False, "detail": traceback.format_exc()[-4000:]}
    return function


def _import_torchvision() -> None:
    """torchvision's PyPI wheel is built for CUDA torch: on a CPU torch its C ops do not load, and
    torchvision then registers fake kernels for two ops it never declared (nms, qnms), which fails.
    Declare those two schemas (never called) and import it again; SGLang's multimodal modules only
    need its Python parts at import time."""
    import torch

    try:
        import torchvision
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        for op in ("nms", "qnms"):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401


try:
    _import_torchvision()
    from sglang.srt.managers import io_struct
except Exception:  # the environment is there but SGLang does not import: the tests say why
    print(json.dumps({"_import": {"ok": False, "detail": traceback.format_exc()[-4000:]}}))
    sys.exit(0)

import pydantic  # noqa: E402
import torch  # noqa: E402

from abs_fast.model import load_policy, load_qwen25_tokenizer  # noqa: E402
from abs_fast.model.adapters import peft_adapter_state, write_peft_adapter  # noqa: E402
from abs_fast.model.tiny import qwen2_config  # noqa: E402
from abs_fast.rollout import RolloutRequest, SamplingParams  # noqa: E402
from abs_fast.rollout.sglang import (  # noqa: E402
    TensorRoute,
    fold_patterns,
    generate_payload,
    load_adapter_body,
    read_output,
    unload_adapter_body,
)
from abs_fast.rollout.sglang_server import ServerSettings, server_command, server_environment  # noqa: E402

EOS = (151645,)
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _over_http(body: dict) -> bytes:
    """What travels: the client's JSON encoding of the body."""
    return json.dumps(body).encode("utf-8")


def _fields(cls) -> set[str]:
    import dataclasses

    import msgspec

    if isinstance(cls, type) and issubclass(cls, msgspec.Struct):
        return {f.name for f in msgspec.structs.fields(cls)}
    return {f.name for f in dataclasses.fields(cls)}


def _parse(cls, body: dict):
    """The body as SGLang's HTTP server parses it (FastAPI's pydantic validation of the route's
    request class); keys SGLang does not know would be dropped silently, so they are an error here."""
    unknown = set(body) - _fields(cls)
    if unknown:
        raise AssertionError(f"{cls.__name__} has no field(s) {sorted(unknown)}: SGLang would drop them")
    return pydantic.TypeAdapter(cls).validate_json(_over_http(body))


def _requests() -> list[RolloutRequest]:
    return [RolloutRequest([1, 2, 3], "attacker", SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=7,
                                                                 stop_token_ids=(7,))),
            RolloutRequest([4, 5], "defender", SamplingParams(temperature=0.0, max_new_tokens=5)),
            RolloutRequest([6], None, SamplingParams(temperature=0.7, top_k=20, max_new_tokens=9,
                                                     stop=("</answer>",))),
            RolloutRequest([8, 9], "base", SamplingParams(max_new_tokens=3, ignore_eos=True))]


@check
def version():
    import sglang

    assert sglang.__version__ == sys.argv[1], f"installed sglang {sglang.__version__}, expected {sys.argv[1]}"
    return sglang.__version__


@check
def generate_request():
    """The wave's /generate body through GenerateReqInput (with its batch normalisation), the HTTP
    contract gate, and each sampling dict through SamplingParams(**d).normalize/verify."""
    from sglang.srt.entrypoints.api_contract import generate_contract_error
    from sglang.srt.sampling.sampling_params import TOP_K_ALL
    from sglang.srt.sampling.sampling_params import SamplingParams as SGLangSampling

    tokenizer = load_qwen25_tokenizer()
    requests = _requests()
    versions = {"attacker": "attacker-t-v1", "defender": "defender-t-v1"}
    payload = generate_payload(requests, versions, EOS)
    error = generate_contract_error(json.loads(_over_http(payload)))
    assert error is None, f"SGLang's /generate contract refuses the body: {error}"
    request = _parse(io_struct.GenerateReqInput, payload)
    request.normalize_batch_and_arguments()
    assert request.batch_size == len(requests) and not request.is_single, (request.batch_size, request.is_single)
    assert request.rid == payload["rid"], request.rid
    assert request.lora_path == ["attacker-t-v1", "defender-t-v1", None, None], request.lora_path
    assert request.input_ids == [list(r.prompt_ids) for r in requests]
    assert request.return_logprob in (True, [True] * len(requests)), request.return_logprob
    for item, (sampling, ours) in enumerate(zip(request.sampling_params, requests, strict=True)):
        params = SGLangSampling(**sampling)
        params.normalize(tokenizer)
        params.verify(151936)
        want_stop = set(ours.sampling.stop_token_ids) | (set() if ours.sampling.ignore_eos else set(EOS))
        assert set(params.stop_token_ids or ()) == want_stop, (item, params.stop_token_ids)
        assert params.ignore_eos == ours.sampling.ignore_eos and params.max_new_tokens == ours.sampling.max_new_tokens
        assert params.top_p == ours.sampling.top_p, (item, params.top_p)
        if ours.sampling.temperature == 0:  # SGLang's greedy is top-k 1 at temperature 1: the log-probs the
            assert (params.temperature, params.top_k) == (1.0, 1)  # client reports are at temperature 1
        else:
            assert params.temperature == ours.sampling.temperature, (item, params.temperature)
            assert params.top_k == (ours.sampling.top_k or TOP_K_ALL), (item, params.top_k)
        assert params.stop_strs == list(ours.sampling.stop), (item, params.stop_strs)
        assert params.skip_special_tokens is False and params.no_stop_trim is False
    return f"{len(requests)} requests, contract gate passed"


@check
def adapter_routes():
    """/load_lora_adapter and /unload_lora_adapter bodies through SGLang's request classes."""
    load = _parse(io_struct.LoadLoRAAdapterReqInput, load_adapter_body("attacker-t-v2", "/dev/shm/x/attacker-t-v2"))
    assert (load.lora_name, load.lora_path, load.pinned) == ("attacker-t-v2", "/dev/shm/x/attacker-t-v2", False)
    assert load.lora_id is None  # SGLang's tokenizer manager assigns it
    unload = _parse(io_struct.UnloadLoRAAdapterReqInput, unload_adapter_body("attacker-t-v1"))
    assert unload.lora_name == "attacker-t-v1"


def _patterned_adapter(generator) -> tuple[dict, dict]:
    """A PEFT adapter over the tiny model's 2 layers with a rank pattern, an alpha pattern and rsLoRA."""
    prefix = "base_model.model.model.layers.{}.{}.{}.lora_{}.weight"
    config = qwen2_config("tiny")
    shapes = {"q_proj": (config.num_attention_heads * 16, 64), "k_proj": (config.num_key_value_heads * 16, 64),
              "v_proj": (config.num_key_value_heads * 16, 64), "o_proj": (64, 64),
              "gate_proj": (config.intermediate_size, 64), "up_proj": (config.intermediate_size, 64),
              "down_proj": (64, config.intermediate_size)}
    ranks = {"model.layers.1.mlp.down_proj": 2, "model.layers.0.self_attn.k_proj": 6}
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module, (out, inp) in shapes.items():
            block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            rank = ranks.get(f"model.layers.{layer}.{block}.{module}", 4)
            tensors[prefix.format(layer, block, module, "A")] = torch.randn(rank, inp, generator=generator)
            tensors[prefix.format(layer, block, module, "B")] = torch.randn(out, rank, generator=generator)
    peft = {"peft_type": "LORA", "r": 4, "lora_alpha": 8.0, "target_modules": list(MODULES), "use_rslora": True,
            "rank_pattern": ranks, "alpha_pattern": {"model.layers.0.mlp.up_proj": 3.0}, "bias": "none",
            "task_type": "CAUSAL_LM"}
    return peft, tensors


def _delta(config: dict, tensors: dict, key_a: str) -> torch.Tensor:
    """PEFT's product for one module: scale * B @ A, with PEFT's pattern and rsLoRA rules."""
    from abs_fast.model.adapters import _pattern_value

    module = key_a[len("base_model.model."): -len(".lora_A.weight")]
    a, b = tensors[key_a].double(), tensors[key_a.replace("lora_A", "lora_B")].double()
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
    rank = a.shape[0]
    return b @ a * (alpha / (rank ** 0.5 if config.get("use_rslora") else rank))


def _sglang_adapter(config: dict, tensors: dict | None, path: str | None = None):
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.lora.lora import LoRAAdapter
    from sglang.srt.lora.lora_config import LoRAConfig

    if path is not None:  # SGLang reads adapter_config.json; its weight loader needs a running server's
        from safetensors.torch import load_file  # global args, so the safetensors file is read here

        lora_config = LoRAConfig(path=path)
        tensors = load_file(f"{path}/adapter_model.safetensors")
    else:
        lora_config = LoRAConfig(config_dict=config)
    adapter = LoRAAdapter("probe", lora_config, qwen2_config("tiny"), LoadConfig(), lora_backend=None)
    adapter.initialize_weights_from_tensors(tensors)
    return adapter


def _check_products(adapter, config: dict, tensors: dict, folded: dict, folded_tensors: dict) -> None:
    """SGLang's scaling times the folded B @ A equals PEFT's product of the original adapter, for
    every module; SGLang's normalisation stacked q/k/v and gate/up."""
    for key_a in (k for k in tensors if k.endswith("lora_A.weight")):
        key_b = key_a.replace("lora_A", "lora_B")
        theirs = folded_tensors[key_b].double() @ folded_tensors[key_a].double() * adapter.scaling
        want = _delta(config, tensors, key_a)  # fp32 tensors: rounding of the folded B, relative to the largest
        torch.testing.assert_close(theirs, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    assert adapter.scaling == folded["lora_alpha"] / folded["r"]
    names = set().union(*(layer.weights for layer in adapter.layers))
    for fused in ("qkv_proj.lora_A", "gate_up_proj.lora_A", "o_proj.lora_A", "down_proj.lora_B"):
        assert any(fused in name for name in names), (fused, sorted(names)[:8])


@check
def adapter_files_with_patterns():
    """The PEFT directory the file route writes (patterns folded) is read by SGLang's LoRAConfig and
    LoRAAdapter loader, whose products equal PEFT's for every module."""
    import tempfile

    generator = torch.Generator().manual_seed(0)
    config, tensors = _patterned_adapter(generator)
    folded, folded_tensors = fold_patterns(config, tensors)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_peft_adapter(f"{tmp}/adapter", folded, folded_tensors)
        adapter = _sglang_adapter(folded, None, path=str(path))
        assert adapter.config.r == adapter.config.lora_alpha == 6  # padded to the largest rank, scale folded
        _check_products(adapter, config, tensors, folded, folded_tensors)
    try:  # the control: the same adapter unfolded is read wrong (one r and one alpha) or refused
        _check_products(_sglang_adapter(config, tensors), config, tensors, config, tensors)
    except Exception as err:
        return f"unfolded, SGLang's loader gets it wrong: {type(err).__name__}"
    raise AssertionError("SGLang read the patterned adapter right without folding: fold_patterns is not needed")


@check
def adapter_files_from_a_policy():
    """A trained policy's adapter, as the engine writes it, through SGLang's loader."""
    import tempfile

    policy = load_policy("tiny", quantize=None, adapters=("attacker",), rank=4, seed=1)
    with torch.no_grad():
        for p in policy.adapter_parameters("attacker"):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    config, tensors = fold_patterns(*peft_adapter_state(policy.target_layers(), "attacker", policy.source))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_peft_adapter(f"{tmp}/attacker-t-v1", config, tensors)
        adapter = _sglang_adapter(config, None, path=str(path))
        _check_products(adapter, config, tensors, config, tensors)
    return f"{len(tensors)} tensors"


@check
def tensor_route():
    """The in-memory route as the client builds it for TP 1 and 2: the body through
    LoadLoRAAdapterFromTensorsReqInput, each rank's payload through SGLang's normaliser and its
    allow-listed deserializer, the tensors through SGLang's LoRA loader; torch's reductions are
    patched as SGLang patches them (CUDA handles name their device by UUID)."""
    from sglang.srt.utils.common import MultiprocessingSerializer, normalize_serialized_named_tensor_payload
    from torch.multiprocessing import reductions

    generator = torch.Generator().manual_seed(3)
    config, tensors = _patterned_adapter(generator)
    folded, folded_tensors = fold_patterns(config, tensors)
    for tp_size in (1, 2):
        route = TensorRoute.detect(tp_size)
        assert route is not None, "TensorRoute.detect found no route in this sglang"
        assert (route.field_name, route.copies) == ("serialized_named_tensors", tp_size)
        body = route.body("defender-t-v3", folded, folded_tensors)
        request = _parse(io_struct.LoadLoRAAdapterFromTensorsReqInput, body)
        assert len(request.serialized_named_tensors) == tp_size and request.config_dict == folded
        for rank in range(tp_size):
            received = MultiprocessingSerializer.deserialize(
                normalize_serialized_named_tensor_payload(request.serialized_named_tensors[rank]))
            assert set(received) == set(folded_tensors)
            for key, value in folded_tensors.items():
                assert torch.equal(received[key], value), key
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

    assert route.patch is monkey_patch_torch_reductions  # applied before CUDA tensors are pickled
    assert reductions.reduce_tensor.__name__ != "_reduce_tensor_modified"  # not for CPU tensors (it breaks them)
    adapter = _sglang_adapter(folded, received)
    _check_products(adapter, config, tensors, folded, folded_tensors)


@check
def server_arguments():
    """The launch argv through SGLang's own server-args parser."""
    import argparse

    from sglang.srt.server_args import ServerArgs

    settings = ServerSettings(model_path="/models/qwen", max_lora_rank=16, lora_target_modules=MODULES,
                              tokenizer_path="/models/tok", dtype="bfloat16", seed=7,
                              extra_args=("--mem-fraction-static", "0.4"))
    argv = server_command(settings, 31234)
    assert argv[1:3] == ["-m", "sglang.launch_server"], argv[:3]
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(argv[3:])
    assert (args.model_path, args.host, args.port) == ("/models/qwen", "127.0.0.1", 31234)
    assert args.enable_lora and args.max_lora_rank == 16 and args.max_loras_per_batch == settings.loras_per_batch()
    assert set(args.lora_target_modules) == set(MODULES), args.lora_target_modules
    assert (args.dtype, args.random_seed, args.tokenizer_path) == ("bfloat16", 7, "/models/tok")
    assert args.mem_fraction_static == 0.4
    fields = _fields(ServerArgs)
    for name in ("tp_size", "dp_size", "disable_radix_cache"):  # what read_server_info reads back
        assert name in fields, name


@check
def guarded_options_as_sglang_reads_them():
    """Every spelling SGLang's argparse accepts for an option the engine owns or refuses (argparse
    expands unambiguous prefixes: --hos means --host) is refused in extra_args; the tensor-parallel
    size is read as SGLang reads it."""
    import argparse

    from sglang.srt.server_args import ServerArgs

    from abs_fast.rollout.sglang_server import tensor_parallel_size

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    defaults = vars(parser.parse_args(["--model-path", "m"]))
    values = {"--host": "0.0.0.0", "--port": "1", "--api-key": "k", "--admin-api-key": "k", "--dp-size": "2",
              "--data-parallel-size": "2", "--lora-paths": "a=b"}
    refused = 0
    for option, value in values.items():
        dest = next((a.dest for a in parser._actions if option in a.option_strings), None)
        if dest is None:
            continue
        for cut in range(3, len(option) + 1):
            written = option[:cut]
            try:
                parsed = vars(parser.parse_args(["--model-path", "m", written, value]))
            except SystemExit:
                continue  # ambiguous or unknown to SGLang: the server would refuse to start
            if parsed[dest] == defaults[dest]:
                continue
            settings = ServerSettings(model_path="m", max_lora_rank=8, lora_target_modules=MODULES,
                                      extra_args=(written, value))
            try:
                server_command(settings, 1)
            except ValueError:
                refused += 1
                continue
            raise AssertionError(f"{written} {value} means {option} to SGLang but was let through")
    for argv, size in ((["--tp", "2"], 2), (["--tp-size=4"], 4), (["--tensor-parallel-size", "8"], 8)):
        expected = parser.parse_args(["--model-path", "m", *argv]).tp_size
        assert tensor_parallel_size(argv) == expected == size, (argv, expected)
    assert refused > len(values)
    return f"{refused} spellings refused"


@check
def server_routes_and_environment():
    """The routes the client calls exist in SGLang's HTTP server, and the original-log-prob switch it
    clears is the name SGLang reads."""
    import importlib.util
    from pathlib import Path

    from sglang.srt.environ import envs

    source = Path(importlib.util.find_spec("sglang.srt.entrypoints.http_server").origin).read_text()
    for route in ("/generate", "/health", "/load_lora_adapter", "/unload_lora_adapter",
                  "/load_lora_adapter_from_tensors", "/get_server_info"):
        assert f'"{route}"' in source, route
    names = {name for name in dir(envs) if "ORIGINAL_LOGPROB" in name}
    assert names, "SGLang reads no ORIGINAL_LOGPROB variable"
    environment = server_environment(ServerSettings(model_path="m", max_lora_rank=4, lora_target_modules=MODULES,
                                                    env={name: "1" for name in names}))
    assert not names & set(environment), names & set(environment)
    return sorted(names)


@check
def finish_reasons():
    """Outputs carrying SGLang's own finish reasons (stop on a token or a string, length, abort) read
    as the client reads them."""
    from sglang.srt.managers.schedule_batch import FINISH_ABORT, FINISH_LENGTH, FINISH_MATCHED_STR, FINISH_MATCHED_TOKEN

    request = RolloutRequest([1, 2])

    def output(reason, tokens):
        return {"text": "", "output_ids": tokens, "meta_info": {
            "id": "r", "finish_reason": reason.to_json(), "prompt_tokens": 2,
            "output_token_logprobs": [[-0.5, t, None] for t in tokens]}}

    stop = read_output(0, request, output(FINISH_MATCHED_TOKEN(matched=EOS[0]), [11, EOS[0]]))
    assert (stop.finish_reason, stop.matched_stop, stop.token_ids) == ("stop", EOS[0], [11, EOS[0]])
    text = read_output(0, request, output(FINISH_MATCHED_STR(matched="</answer>"), [11]))
    assert (text.finish_reason, text.matched_stop) == ("stop", "</answer>")
    length = read_output(0, request, output(FINISH_LENGTH(length=3), [11, 12, 13]))
    assert length.finish_reason == "length" and length.logprobs == [-0.5] * 3
    abort = read_output(0, request, output(FINISH_ABORT(message="out of memory", status_code=None), []))
    assert abort.finish_reason == "abort" and "out of memory" in abort.error


print(json.dumps(RESULTS))
