"""A dense fidelity metric that needs no answer parsing.

After a context of Paul Graham essays, the prompt asks the model to repeat a passage from deep inside it and gives
the passage's first words; the target is the rest of the passage. With the full cache a model copies it (low
negative log-likelihood); once the passage's entries are evicted it cannot, so the gap between keeping and losing
the span is large. Reported per sample:

* ``nll_full`` / ``nll_press``: mean per-token NLL (nats) of the target with the full and the compressed cache;
* ``kl``: mean over the positions that predict target tokens of KL(full ‖ press) between the next-token
  distributions (nats), teacher-forced on the same tokens.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..cache import CACHE_KWARG
from ..context import press as press_context
from ..pipeline import kept_fraction
from ..press import Press
from .sample import haystack_text, truncate_to_tokens

LEAD_TOKENS = 8


@dataclass(frozen=True)
class CopySample:
    """A context, a prompt asking to repeat one of its passages (with the passage's first words), and the target.

    Attributes:
        context: about ``length`` tokens of essay text (compressed).
        prompt: follows the context, never compressed; ends with the passage's first words.
        target: the rest of the passage (whose NLL is measured).
        depth: where the passage starts, as a fraction of the context's tokens.
        n_tokens: tokens of ``context``.
    """

    context: str
    prompt: str
    target: str
    depth: float
    n_tokens: int


@dataclass(frozen=True)
class FidelityResult:
    nll_full: float
    nll_press: float
    kl: float
    kept_fraction: float


def copy_sample(tokenizer, length: int, depth: float = 0.5, span_tokens: int = 32, seed: int = 0) -> CopySample:
    """A copy-continuation sample of about ``length`` context tokens; the passage starts at ``depth``.

    Raises:
        ValueError: ``depth`` outside [0, 1), or ``length`` too small for the passage.
    """
    if not 0.0 <= depth < 1.0:
        raise ValueError(f"depth must be in [0, 1); got {depth!r}")
    if length < 4 * (span_tokens + LEAD_TOKENS):
        raise ValueError(f"length must be at least {4 * (span_tokens + LEAD_TOKENS)} tokens for a {span_tokens}-token "
                         f"passage; got {length}")
    text = haystack_text()
    start = random.Random(f"copy:{seed}").randrange(len(text) // 2)
    start = text.find(". ", start) + 2  # begin at a sentence
    context = truncate_to_tokens(tokenizer, text[start:], length)
    offsets = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    first = min(int(depth * len(offsets)), len(offsets) - span_tokens - LEAD_TOKENS - 1)
    while first > 0 and not context[offsets[first][0] - 1].isspace():  # start the passage at a word
        first -= 1
    split = offsets[first + LEAD_TOKENS - 1][1]  # the lead ends with its last token; the target takes what follows
    lead = context[offsets[first][0]:split]
    target = context[split:offsets[first + LEAD_TOKENS + span_tokens - 1][1]]
    prompt = f"\n\nRepeat, word for word, the passage of the text above that begins with \"{lead}\":\n\n{lead}"
    return CopySample(context=context, prompt=prompt, target=target, depth=first / len(offsets),
                      n_tokens=len(offsets))


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position NLL ``[t]`` (nats) of ``targets`` ``[t]`` under ``logits`` ``[t, V]``."""
    return F.cross_entropy(logits.float(), targets.to(logits.device), reduction="none")


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p ‖ q) ``[t]`` (nats) between the softmax distributions of ``[t, V]`` logits."""
    log_p, log_q = F.log_softmax(logits_p.float(), -1), F.log_softmax(logits_q.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0.0)


def _continuation_logits(model, p: Press | None, context_ids, follow_ids):
    """Logits ``[n, V]`` over ``follow_ids`` ``[1, n]`` teacher-forced after a cache of ``context_ids``, and the kept
    fraction of that cache."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press_context(model, p) if p is not None else nullcontext():
        model(input_ids=context_ids, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
        kept = kept_fraction(cache)
        logits = model(input_ids=follow_ids, **{CACHE_KWARG: cache}, use_cache=True).logits[0]
    return logits, kept


def compare(full: torch.Tensor, pressed: torch.Tensor, n_prompt: int, target_ids: torch.Tensor,
            kept: float) -> FidelityResult:
    """Fidelity from the logits ``[q + t, V]`` over prompt and target (teacher-forced) with the full and the compressed
    cache; ``target_ids`` is ``[1, t]`` and the prompt has ``n_prompt = q`` tokens."""
    predicting = slice(n_prompt - 1, n_prompt - 1 + target_ids.shape[1])  # positions predicting a target token
    full, pressed = full[predicting], pressed[predicting]
    return FidelityResult(nll_full=float(token_nll(full, target_ids[0]).mean()),
                          nll_press=float(token_nll(pressed, target_ids[0]).mean()),
                          kl=float(kl_divergence(full, pressed).mean()), kept_fraction=kept)


def encode(tokenizer, sample: CopySample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(context_ids, prompt_ids, target_ids)``, each ``[1, n]``: the context with the tokenizer's special tokens,
    prompt and target without."""
    def ids(text: str, special: bool) -> torch.Tensor:
        return torch.tensor([tokenizer(text, add_special_tokens=special)["input_ids"]])

    return ids(sample.context, True), ids(sample.prompt, False), ids(sample.target, False)


def fidelity_ids(model, p: Press, context_ids: torch.Tensor, prompt_ids: torch.Tensor,
                 target_ids: torch.Tensor) -> FidelityResult:
    """Fidelity of press ``p`` on token ids (each ``[1, n]``): the context is compressed, prompt and target are not."""
    device = next(model.parameters()).device
    context_ids, prompt_ids, target_ids = (t.to(device) for t in (context_ids, prompt_ids, target_ids))
    follow = torch.cat([prompt_ids, target_ids], dim=1)
    full, _ = _continuation_logits(model, None, context_ids, follow)
    pressed, kept = _continuation_logits(model, p, context_ids, follow)
    return compare(full, pressed, prompt_ids.shape[1], target_ids, kept)


def fidelity(model, tokenizer, p: Press, sample: CopySample) -> FidelityResult:
    """:func:`fidelity_ids` on a :class:`CopySample` tokenized with ``tokenizer`` (see :func:`encode`)."""
    return fidelity_ids(model, p, *encode(tokenizer, sample))
