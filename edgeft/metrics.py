"""Evaluation metrics from decoded generations and per-token log-probabilities. Pure functions: no model.

Names a profile's `eval.metrics` may list (see edgeft.config.EvalConfig):
  exact_match  share of examples whose greedy continuation is exactly the reference. The build measures
               it on token ids: the generated tokens, including EOS, equal the completion's tokens (the
               definition the device runner uses too); `exact_match` below is the same test on any
               sequences (token-id lists or strings, no normalisation).
  token_f1     SQuAD-style bag-of-tokens F1 per example, averaged (see `normalize_tokens`).
  rouge_l      ROUGE-L F-measure per example (longest common subsequence), averaged; computed by Google's
               `rouge-score` package.
  perplexity   exp(mean negative log-likelihood per token) over the completion tokens, teacher-forced
               (the prompt is context, not scored).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from typing import Iterable, Sequence

METRICS = ("exact_match", "token_f1", "rouge_l", "perplexity")
TEXT_METRICS = ("token_f1", "rouge_l")  # computed from decoded generations

_PUNCT = re.compile(r"[^\w\s]|_", re.UNICODE)


def exact_match(predictions: Sequence, references: Sequence) -> float:
    """Share of predictions equal to their reference (strings or token-id lists), no normalisation."""
    _check(predictions, references)
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


def normalize_tokens(text: str) -> list[str]:
    """Lowercased (after NFKC), every punctuation character turned into a separator, split on whitespace.

    Unlike SQuAD's normaliser, punctuation separates words instead of being deleted (so JSON and code
    such as {"alert":"ok"} give `alert ok`, not `alertok`) and articles (a, an, the) are kept: in a
    short answer they may be the answer."""
    return _PUNCT.sub(" ", unicodedata.normalize("NFKC", text).lower()).split()


def f1(prediction: str, reference: str) -> float:
    """Bag-of-tokens F1 of one pair: 2PR/(P+R) over the normalised tokens they share (with multiplicity).
    Both empty after normalisation: 1.0; only one empty: 0.0 (SQuAD's convention)."""
    pred, ref = normalize_tokens(prediction), normalize_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean per-example bag-of-tokens F1 (see `f1`)."""
    _check(predictions, references)
    return sum(f1(p, r) for p, r in zip(predictions, references)) / len(references)


_ROUGE = None


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean per-example ROUGE-L F-measure from `rouge_score.rouge_scorer.RougeScorer(["rougeL"])`.

    Note its default tokenizer: text is lowercased and everything but ASCII letters and digits becomes a
    separator, so punctuation never counts and text in other scripts (Chinese, Cyrillic, ...) has no
    tokens at all and scores 0. No stemming. A prediction identical to its reference scores 1.0 even
    when it has no such tokens (the package would give 0)."""
    global _ROUGE
    _check(predictions, references)
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    total = 0.0
    for prediction, reference in zip(predictions, references):
        total += 1.0 if prediction == reference else _ROUGE.score(reference, prediction)["rougeL"].fmeasure
    return total / len(references)


def perplexity(token_logprobs: Iterable[float]) -> float:
    """exp(mean NLL) from the natural-log probabilities the model gave each scored token."""
    total, count = 0.0, 0
    for logprob in token_logprobs:
        total -= float(logprob)
        count += 1
    return perplexity_from_nll(total, count)


def perplexity_from_nll(total_nll: float, count: int) -> float:
    """exp(total_nll / count): a summed natural-log NLL over `count` tokens. Raises on no tokens."""
    if count <= 0:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(total_nll / count)


def text_metrics(names: Iterable[str], predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """The text metrics among `names` (token_f1, rouge_l), by name."""
    functions = {"token_f1": token_f1, "rouge_l": rouge_l}
    return {name: functions[name](predictions, references) for name in names if name in functions}


def generation_metrics(names: Iterable[str], generated: Sequence[list[int]], references: Sequence[list[int]],
                       tokenizer) -> dict[str, float]:
    """exact_match on token ids (always), plus the text metrics in `names` on the decoded strings."""
    results = {"exact_match": exact_match(generated, references)}
    wanted = [m for m in TEXT_METRICS if m in names]
    if wanted:
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        results.update(text_metrics(wanted, [decode(g) for g in generated], [decode(r) for r in references]))
    return results


def _check(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no examples to score")
