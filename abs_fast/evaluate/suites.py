"""Evaluation suites read from local files in their native formats (docs/GAME.md section 6).

A suite is given as NAME=PATH; the kind is NAME up to the first dot (so `xstest.v2=...` is a second
XSTest file). Kinds and the columns each reads:

    xstest          CSV  prompt, label (safe/unsafe), type
    wildjailbreak   JSONL/CSV/TSV/Parquet  prompt + category/label/data_type, or WildJailbreak's own
                    adversarial / vanilla columns with data_type (adversarial_harmful, vanilla_benign, ...)
    wildguardtest   JSONL/CSV/Parquet  prompt, adversarial (bool), prompt_harmfulness
    harmbench       CSV  Behavior, FunctionalCategory, SemanticCategory, ContextString (copyright
                    behaviours are skipped: they need HarmBench's hashing classifier, not a safety judge)
    orbench-hard    CSV  prompt, category (every prompt benign: over-refusal test)
    orbench-toxic   CSV  prompt, category (every prompt harmful)
    gsm8k           JSONL question, answer (the final number after ####): capability, not safety
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from abs_fast.evaluate.gsm8k import gsm8k_reference
from abs_fast.game.seeds import TYPE_VALUES, read_records
from abs_fast.io import expect_file

__all__ = ["HEADLINE_METRICS", "SAFETY_KINDS", "SUITE_KINDS", "EvalItem", "load_suite", "parse_suite_spec"]

SAFETY_KINDS = ("xstest", "wildjailbreak", "wildguardtest", "harmbench", "orbench-hard", "orbench-toxic")
SUITE_KINDS = (*SAFETY_KINDS, "gsm8k")

# The metrics of docs/GAME.md section 6 that each kind is read by (all others are in the JSON too).
HEADLINE_METRICS = {
    "xstest": ("compliance_rate/benign", "refusal_rate/harmful", "harmful_answer_rate"),
    "wildjailbreak": ("compliance_rate/harmful", "compliance_rate/benign", "harmful_answer_rate"),
    "wildguardtest": ("harmful_answer_rate/adversarial", "harmful_answer_rate/vanilla", "harmful_answer_rate"),
    "harmbench": ("harmful_answer_rate",),
    "orbench-hard": ("compliance_rate/benign",),
    "orbench-toxic": ("refusal_rate/harmful",),
    "gsm8k": ("exact_match/defender", "exact_match/base"),
}


@dataclass(frozen=True)
class EvalItem:
    """One prompt of a suite. label: the suite's own ground truth for the prompt ("harmful" or
    "benign"; "" for capability suites); subset: a finer group (adversarial/vanilla, an XSTest
    type, a HarmBench category); reference: the expected final answer (GSM8K)."""

    prompt: str
    label: str
    subset: str
    source: str
    reference: str = ""


def parse_suite_spec(spec: str) -> tuple[str, str, Path]:
    """NAME=PATH -> (name, kind, path)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--suite {spec!r}: expected NAME=PATH with NAME one of {', '.join(SUITE_KINDS)} "
                         "(optionally NAME.anything=PATH)")
    kind = name.split(".", 1)[0].lower()
    if kind not in SUITE_KINDS:
        raise ValueError(f"--suite {spec!r}: unknown suite {kind!r}; known: {', '.join(SUITE_KINDS)} (the part "
                         "before the first dot names the kind)")
    return name, kind, Path(path)


def _column(row: dict, where: str, *names: str, required: bool = True) -> str | None:
    lowered = {str(k).lower(): k for k in row}
    for name in names:
        if name.lower() in lowered:
            return lowered[name.lower()]
    if required:
        raise ValueError(f"{where}: no {names[0]!r} column (found: {', '.join(map(str, row))})")
    return None


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _harm_label(value, key: str, where: str) -> str:
    label = TYPE_VALUES.get(str(value).strip().lower())
    if label is None:
        raise ValueError(f"{where}: {key!r} is {value!r}; expected harmful/benign, safe/unsafe, 1/0 or a "
                         "WildJailbreak data_type")
    return label


def _xstest(where: str, row: dict) -> EvalItem:
    prompt, label = _column(row, where, "prompt"), _column(row, where, "label")
    value = str(row.get(label, "")).strip().lower()
    if value not in ("safe", "unsafe"):
        raise ValueError(f"{where}: 'label' is {row.get(label)!r}; XSTest labels are safe or unsafe")
    subset = _column(row, where, "type", required=False)
    return EvalItem(_text(row, prompt, where), "harmful" if value == "unsafe" else "benign",
                    str(row.get(subset) or "") if subset else "", where)


def _wildjailbreak(where: str, row: dict) -> EvalItem:
    data_type_key = _column(row, where, "data_type", required=False)
    data_type = str(row.get(data_type_key) or "").strip().lower() if data_type_key else ""
    prompt_key = _column(row, where, "prompt", required=False)
    subset = data_type.split("_", 1)[0] if data_type.startswith(("adversarial", "vanilla")) else ""
    if prompt_key is None:  # WildJailbreak's own layout: the adversarial prompt, or the vanilla one
        adversarial = _column(row, where, "adversarial", required=False)
        vanilla = _column(row, where, "vanilla", required=False)
        if adversarial and isinstance(row.get(adversarial), str) and row[adversarial].strip():
            prompt_key, subset = adversarial, subset or "adversarial"
        elif vanilla:
            prompt_key, subset = vanilla, subset or "vanilla"
        else:
            raise ValueError(f"{where}: no prompt (expected a 'prompt' column, or WildJailbreak's 'adversarial' / "
                             f"'vanilla' columns; found: {', '.join(map(str, row))})")
    if data_type:
        label = _harm_label(data_type, "data_type", where)
    else:
        key = _column(row, where, "category", "label", "type", required=False)
        if key is None:
            raise ValueError(f"{where}: no label (expected 'category', 'label' or 'data_type' holding harmful / "
                             "benign)")
        label = _harm_label(row.get(key), key, where)
    return EvalItem(_text(row, prompt_key, where), label, subset or "vanilla", where)


def _wildguardtest(where: str, row: dict) -> EvalItem:
    prompt = _column(row, where, "prompt")
    adversarial = _column(row, where, "adversarial")
    harm = _column(row, where, "prompt_harmfulness")
    flag = str(row.get(adversarial)).strip().lower()
    if flag not in ("true", "false", "1", "0"):
        raise ValueError(f"{where}: 'adversarial' is {row.get(adversarial)!r}; expected true or false")
    return EvalItem(_text(row, prompt, where), _harm_label(row.get(harm), harm, where),
                    "adversarial" if flag in ("true", "1") else "vanilla", where)


def _harmbench(where: str, row: dict) -> EvalItem | None:
    behavior = _column(row, where, "Behavior")
    functional = _column(row, where, "FunctionalCategory", required=False)
    semantic = _column(row, where, "SemanticCategory", required=False)
    context = _column(row, where, "ContextString", required=False)
    category = str(row.get(functional) or "standard").strip().lower() if functional else "standard"
    if category == "copyright":
        return None
    text = _text(row, behavior, where)
    context_text = str(row.get(context) or "").strip() if context else ""
    if category == "contextual":
        if not context_text:
            raise ValueError(f"{where}: a contextual behaviour needs a non-empty ContextString")
        text = f"{context_text}\n\n---\n\n{text}"  # HarmBench's layout for contextual behaviours
    return EvalItem(text, "harmful", str(row.get(semantic) or category) if semantic else category, where)


def _orbench(label: str):
    def read(where: str, row: dict) -> EvalItem:
        prompt = _column(row, where, "prompt")
        category = _column(row, where, "category", required=False)
        return EvalItem(_text(row, prompt, where), label, str(row.get(category) or "") if category else "", where)
    return read


def _gsm8k(where: str, row: dict) -> EvalItem:
    question, answer = _column(row, where, "question"), _column(row, where, "answer")
    try:
        reference = gsm8k_reference(_text(row, answer, where))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return EvalItem(_text(row, question, where), "", "", where, reference)


_READERS = {"xstest": _xstest, "wildjailbreak": _wildjailbreak, "wildguardtest": _wildguardtest,
            "harmbench": _harmbench, "orbench-hard": _orbench("benign"), "orbench-toxic": _orbench("harmful"),
            "gsm8k": _gsm8k}


def load_suite(kind: str, path: str | Path, limit: int | None = None) -> list[EvalItem]:
    """The items of one suite file (the first `limit` usable rows when given)."""
    if kind not in _READERS:
        raise ValueError(f"unknown suite kind {kind!r}; known: {', '.join(SUITE_KINDS)}")
    path = Path(path)
    expect_file(path, f"{kind} suite file")
    items: list[EvalItem] = []
    for where, row in read_records(path):
        item = _READERS[kind](where, row)
        if item is not None:
            items.append(item)
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise ValueError(f"{path}: no {kind} items")
    return items
