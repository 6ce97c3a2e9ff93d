"""The format check of docs/GAME.md section 2, for both roles."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["FormatCheck", "check_format", "turn_answer"]

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"


class FormatCheck(NamedTuple):
    """reasoning: the text before `</think>` (None when there is none); answer: the text passed on:
    the content of the first `<answer>...</answer>` pair, stripped, even when a rule is broken and
    even when it is empty (as upstream Self-RedTeam passes it on); the whole response,
    stripped, only when there is no such pair; violated: whether any format rule is broken."""

    reasoning: str | None
    answer: str
    violated: bool


def _extract_answer(text: str) -> str | None:
    start = text.find(ANSWER_OPEN)
    if start < 0:
        return None
    end = text.find(ANSWER_CLOSE, start + len(ANSWER_OPEN))
    if end < 0:
        return None
    return text[start + len(ANSWER_OPEN):end].strip()


def check_format(text: str) -> FormatCheck:
    """A response (the text after the pre-filled `<think>`) violates the format when any holds:
    it contains `<think>`; `</think>`, `<answer>`, `</answer>` do not appear exactly once each;
    they are out of order; anything but white space stands between `</think>` and `<answer>` or
    after `</answer>`; the reasoning or the answer is empty."""
    close = text.find(THINK_CLOSE)
    reasoning = text[:close].strip() if close >= 0 else None
    answer = _extract_answer(text)
    violated = (
        THINK_OPEN in text
        or any(text.count(tag) != 1 for tag in (THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE))
    )
    if not violated:
        open_, end = text.find(ANSWER_OPEN), text.find(ANSWER_CLOSE)
        violated = (
            not close < open_ < end
            or text[close + len(THINK_CLOSE):open_].strip() != ""
            or text[end + len(ANSWER_CLOSE):].strip() != ""
            or not reasoning
            or not answer
        )
    if answer is None:  # no <answer>...</answer> pair to pass on (then the format is violated)
        answer = text.strip()
    return FormatCheck(reasoning, answer, violated)


def turn_answer(text: str, reasoning: bool) -> tuple[str, bool | None]:
    """(the answer a turn passes on, format violated): the <answer> part with the reasoning format
    (see FormatCheck), the whole stripped text (and None) without it."""
    if not reasoning:
        return text.strip(), None
    _, answer, violated = check_format(text)
    return answer, violated
