"""KVzip press: query-agnostic scores from the attention the model pays to its cache while repeating the context.

Paper: Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", arXiv 2505.23416.
After the context's prefill, the model is fed a *reconstruction input* against the cached context: a repeat
instruction ("Repeat the previous context exactly."), the assistant header of the chat template, then the context's
own tokens (teacher forcing). The context is split into chunks of ``chunk_size`` tokens and each chunk gets its own
reconstruction input; from the second chunk on the instruction asks to repeat "the part ... starting with" the last
``overlap`` tokens of the previous chunk. For every layer and KV head, the score of a cached context entry ``j`` is the
largest attention weight it receives from the chunk's reconstruction queries, over the query heads of its GQA group::

    S[l, h, j] = max over g in group(h), i in reconstruction queries of softmax(q_i k^T * scaling)[j]

The reconstruction forward reuses the prefilled cache (the context is never prefilled a second time); its own entries
are removed from the cache afterwards, so the cache holds only the (compressed) context with its logical length.
Scores are computed in blocks of queries against the context keys (at most ``_SCORE_ELEMENTS`` fp32 weights at a time):
no ``S x S`` matrix is built. Scores are attention probabilities, comparable across heads and layers, so any
allocator applies: ``head_adaptive`` (AdaKV, the paper's non-uniform head budgets within a layer) and ``kvcompose``
store per-head or per-layer budgets as real, smaller cache layers (ragged per-head layers where heads differ).

Departures from the paper and its official code (snu-mllab/KVzip):

* Normaliser: the softmax is the one the model computes, over every cached context entry and the causal part of the
  reconstruction input. The official code renormalises over a subset (system prompt, the chunk's own entries and the
  reconstruction input), leaving the other chunks out.
* Protected tokens: the first ``n_sink`` (4) context tokens are always kept; the official code instead never evicts
  the whole system prompt, which this press cannot tell apart from the context. The whole prefill (chat-template
  header included) is reconstructed and scored.
* Budgets: the default allocator is ``uniform`` (the paper's "pair-uniform", so that the press keeps dense layers like
  every other default). The paper's default ``pair`` level, one threshold over all layers and heads, is not offered;
  ``allocator="head_adaptive"`` (non-uniform head budgets within a layer) or ``"kvcompose"`` (non-uniform layer
  budgets) come closest and are the recommended settings (docs/presses.md gives what was observed). The
  context-independent head-level variant is not implemented.
* The chunk size defaults to 2048 tokens (2000 in the official code); the weights are computed in fp32 (model dtype
  in the official code).
* The repeat instruction is tokenized with the model's tokenizer, found in ``tokenizer`` or else in the model's
  ``config.name_or_path`` (local files only). Without one, a warning is issued and the reconstruction input is the
  context chunk alone (no instruction, no template header).
* Models whose compressible layers use sliding-window attention are refused (the reconstruction queries cannot see
  the context beyond the window). Non-compressed sliding-window layers (Gemma3) are restored after the extra forward.

Cost: one extra forward over about ``S + ceil(S / chunk_size) * prompt`` tokens, each chunk attending to the whole
cached context, plus the scoring matmuls; ``benchmarks/scoring_overhead.py`` measures it against Compactor's.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..cache import CACHE_KWARG, cache_in, full_keys_values
from ..checks import check_int
from ..press import LayerContext, Press

_SCORE_ELEMENTS = 1 << 22  # fp32 attention weights held at once while scoring one layer (16 MB)
_MARKER = "\u2063kvzip\u2063"  # stands for the context when the chat template is applied to the instruction


def reconstruction_scores(queries: torch.Tensor, keys: torch.Tensor, key_valid: torch.Tensor,
                          query_valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """Largest attention weight each context entry receives from the reconstruction queries.

    The reconstruction input (``R`` tokens) follows the ``N`` cached context entries: query ``i`` attends to every
    real context entry and to the real reconstruction entries ``0..i`` (causal), as in the model's forward.

    Args:
        queries: ``[B, H_q, R, D]`` post-RoPE queries of the reconstruction input.
        keys: ``[B, H_kv, N + R, D]`` post-RoPE keys: the cached context, then the reconstruction input.
        key_valid: ``[B, N + R]`` bool, ``False`` on padding entries.
        query_valid: ``[B, R]`` bool, ``False`` on padding queries (they give no score).
        scaling: the attention's logit scale (``module.scaling``, usually ``D ** -0.5``).

    Returns:
        ``[B, H_kv, N]`` fp32: for each context entry the max over the ``H_q / H_kv`` query heads of its group and over
        the real queries of the softmax weight (0 on padding entries and when no query is real).
    """
    b, h_q, r, d = queries.shape
    h_kv, total = keys.shape[1], keys.shape[2]
    n = total - r
    if total < r or h_q % h_kv:
        raise ValueError(f"keys [B, H_kv, N + R, D] {tuple(keys.shape)} do not fit queries {tuple(queries.shape)}")
    groups = h_q // h_kv
    k_ctx, k_rep = keys[:, :, :n].float().transpose(-1, -2), keys[:, :, n:].float().transpose(-1, -2)  # [B, H_kv, D, *]
    q = (queries.float() * scaling).reshape(b, h_kv, groups, r, d)
    ctx_padding = None if bool(key_valid[:, :n].all()) else ~key_valid[:, None, None, :n]
    repeat_pos = torch.arange(r, device=keys.device)
    block = max(1, min(r, _SCORE_ELEMENTS // max(1, b * h_q * total)))
    best = torch.full((b, h_kv, n), -math.inf, dtype=torch.float32, device=keys.device)
    for start in range(0, r, block):
        stop = min(r, start + block)
        c = stop - start
        qb = q[:, :, :, start:stop].reshape(b, h_kv, groups * c, d)  # rows: (group member, query)
        ctx = torch.matmul(qb, k_ctx)  # [B, H_kv, G * c, N] logits of the context entries
        if ctx_padding is not None:
            ctx.masked_fill_(ctx_padding, -math.inf)
        rep = torch.matmul(qb, k_rep).view(b, h_kv, groups, c, r)  # logits of the reconstruction entries
        allowed = key_valid[:, None, n:] & (repeat_pos[None, :] <= repeat_pos[start:stop, None])[None]  # [B, c, R]
        rep.masked_fill_(~allowed[:, None, None], -math.inf)
        lse = torch.logaddexp(ctx.logsumexp(-1).view(b, h_kv, groups, c), rep.logsumexp(-1))  # softmax normaliser
        # a padding query, or one that sees no real entry, gives no score
        lse = lse.masked_fill(~query_valid[:, None, None, start:stop] | (lse == -math.inf), math.inf)
        ctx -= lse.view(b, h_kv, groups * c, 1)  # log of the softmax weights of the context entries
        best = torch.maximum(best, ctx.amax(dim=2))
    return best.exp()  # exp(-inf) = 0 where no real query saw a real entry


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _tokenizer_for(model: nn.Module, path: str | None):
    """The tokenizer at ``path`` (an error if it cannot be loaded), else the one in the model's
    ``config.name_or_path`` if it loads from local files, else ``None``."""
    if path is not None:
        try:
            return _load_tokenizer(path)
        except Exception as error:  # noqa: BLE001 - any loading failure is reported with the path
            raise ValueError(f"KVzipPress: cannot load a tokenizer from {path!r} (local files only): "
                             f"{error}") from error
    name = getattr(model.config, "name_or_path", "") or ""
    if not name:
        return None
    try:
        return _load_tokenizer(name)
    except Exception:  # noqa: BLE001 - no usable tokenizer next to the model: the caller warns
        return None


def prompt_parts(tokenizer, instruction: str) -> tuple[list[int], list[int]]:
    """Token ids ``(head, postfix)`` around a repeat instruction that follows the context in the same user turn.

    ``head`` is ``"\\n\\n" + instruction``; ``postfix`` is what the chat template puts after the user message (end of
    turn and assistant header), or ``"\\n"`` without a chat template. The reconstruction input of a chunk is
    ``head [+ overlap tokens] + postfix + chunk``.
    """
    head = "\n\n" + instruction
    postfix = "\n"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": _MARKER + head}], tokenize=False,
                                             add_generation_prompt=True)
        at = text.find(_MARKER + head)
        if at >= 0:
            postfix = text[at + len(_MARKER + head):]
    encode = functools.partial(tokenizer, add_special_tokens=False)
    return encode(head)["input_ids"], encode(postfix)["input_ids"]


def reconstruction_inputs(ids: torch.Tensor, valid: torch.Tensor, chunk_size: int, first: tuple[list[int], list[int]],
                          later: tuple[list[int], list[int]], overlap: int):
    """Left-padded reconstruction inputs, one per chunk of ``chunk_size`` real context tokens.

    Args:
        ids: ``[B, N]`` context token ids; valid: ``[B, N]`` bool (``False`` on padding).
        first, later: ``(head, postfix)`` ids of the first chunk's instruction and of the later chunks' one.
        overlap: last tokens of the previous chunk inserted between ``later``'s head and postfix.

    Returns:
        list of ``(input_ids [B, R], input_valid [B, R], span [B, N] bool)``: ``span`` marks the context entries
        whose scores this chunk gives. A row without tokens in a chunk gets the instruction alone (``span`` empty).
    """
    rows = [ids[b][valid[b]].tolist() for b in range(ids.shape[0])]
    n_chunks = max(1, max(math.ceil(len(r) / chunk_size) for r in rows))
    rank = valid.long().cumsum(-1) - 1
    out = []
    for c in range(n_chunks):
        seqs = []
        for tokens in rows:
            chunk = tokens[c * chunk_size:(c + 1) * chunk_size]
            head, postfix = first if c == 0 else later
            tail = [] if c == 0 else tokens[max(0, c * chunk_size - overlap):c * chunk_size]
            seqs.append(head + tail + postfix + chunk)
        r = max(len(s) for s in seqs)
        input_ids = torch.zeros(len(seqs), r, dtype=torch.long, device=ids.device)
        input_valid = torch.zeros(len(seqs), r, dtype=torch.bool, device=ids.device)
        for b, seq in enumerate(seqs):
            if seq:
                input_ids[b, r - len(seq):] = torch.tensor(seq, dtype=torch.long)
                input_valid[b, r - len(seq):] = True
        span = valid & (rank >= c * chunk_size) & (rank < (c + 1) * chunk_size)
        out.append((input_ids, input_valid, span))
    return out


@dataclass
class KVzipPress(Press):
    """Scores each cached context entry by the attention it receives while the model repeats the context.

    Args:
        ratio, allocator, n_sink, window: as :class:`~kvpress_like.press.Press` (``n_sink`` 4, ``window`` 0).
        chunk_size: context tokens reconstructed per extra forward (2048).
        instruction: the repeat instruction of the first chunk.
        continuation: the instruction of later chunks, followed by the last ``overlap`` tokens of the previous chunk.
        overlap: tokens of the previous chunk quoted in ``continuation`` (8).
        tokenizer: local directory of the model's tokenizer; ``None`` looks in the model's ``config.name_or_path``.

    Compression happens after the whole prefill forward (like a model-scope allocator, every compressible layer's full
    cache is held until then). Needs ``input_ids`` (not ``inputs_embeds``) in the prefill.
    """

    name: ClassVar[str] = "kvzip"
    needs: ClassVar[frozenset[str]] = frozenset({"second_forward"})  # scores from a second forward (scorer.NEEDS)
    defers_selection: ClassVar[bool] = True
    is_plain_scorer: ClassVar[bool] = False  # scores come from a second forward (install, select)
    n_sink: int = 4
    chunk_size: int = 2048
    instruction: str = "Repeat the previous context exactly."
    continuation: str = "Repeat the part of the previous context exactly, starting with"
    overlap: int = 8
    tokenizer: str | None = None

    def __post_init__(self, compression_ratio=None):
        super().__post_init__(compression_ratio)
        check_int("chunk_size", self.chunk_size, minimum=1)  # context tokens per reconstruction forward
        check_int("overlap", self.overlap)
        for field_name in ("instruction", "continuation"):
            if not isinstance(getattr(self, field_name), str):
                raise TypeError(f"{field_name} must be a string; got {getattr(self, field_name)!r}")
        if self.tokenizer is not None and not isinstance(self.tokenizer, str):
            raise TypeError(f"tokenizer must be a local directory (str) or None; got {self.tokenizer!r}")

    def score(self, ctx: LayerContext) -> torch.Tensor:
        raise ValueError("KVzip scores come from an extra reconstruction forward after the whole prefill; they cannot "
                         "be computed from one layer's prefill. Use the press with press(model, KVzipPress(...))")

    def select(self, ctx: LayerContext):
        raise ValueError("KVzipPress selects after the reconstruction forward of the whole model, not one layer at a "
                         "time; use it with press(model, KVzipPress(...))")

    def layer_scores(self, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
        """During the prefill only the protected mask is known: returns an empty placeholder for the scores (filled
        by the reconstruction forward before selection) and the ``[B, S]`` protected mask."""
        return torch.empty(0), self.protected_mask(ctx.valid)

    def install(self, model: nn.Module, scope) -> list:
        """Hook the decoder: after each compressed prefill forward, run the reconstruction forwards on the cache,
        score every compressible layer, remove the reconstruction entries, then select with the allocator."""
        from ..registry import architecture_for

        arch = architecture_for(model.config)
        sliding = [i for i in scope.layers if arch.sliding_window(model.config, i) is not None]
        if sliding:
            raise ValueError(f"KVzipPress cannot compress sliding-window layers (layers {sliding} of this model): the "
                             "reconstruction queries would not see the context beyond the window")
        tokenizer = _tokenizer_for(model, self.tokenizer)
        if tokenizer is None:
            warnings.warn("KVzipPress: no tokenizer found for this model (pass tokenizer=<local dir>); the "
                          "reconstruction input is each context chunk alone, without the repeat instruction",
                          stacklevel=2)
            first = later = ([], [])
        else:
            first, later = prompt_parts(tokenizer, self.instruction), prompt_parts(tokenizer, self.continuation)
        base = model.get_decoder() if hasattr(model, "get_decoder") else model
        layers = arch.decoder_layers(model)
        attentions = {idx: arch.attention(layers[idx]) for idx in scope.layers}
        state = {"running": False, "kwargs": None, "scores": {}, "span": None, "queries_valid": None}

        def keep_inputs(module, args, kwargs):
            if scope.in_owner_thread() and not state["running"]:
                ids = kwargs.get("input_ids", args[0] if args else None)
                state["kwargs"] = (ids, kwargs.get("position_ids"))

        def score_layer(idx):
            def hook(module, args, kwargs, output):
                if not state["running"] or not scope.in_owner_thread():
                    return None
                kwargs = arch.attention_inputs(args, kwargs)
                cos, sin = kwargs["position_embeddings"]
                q = arch.pre_rope_queries(module, kwargs["hidden_states"])
                q, _ = arch.apply_rope(q, q[:, :1], cos, sin)  # one dummy key head, not a copy
                keys, _ = full_keys_values(cache_in(kwargs).layers[idx])
                valid = torch.cat([scope.pending[idx][2], state["queries_valid"]], dim=-1)
                chunk = reconstruction_scores(q, keys, valid, state["queries_valid"], arch.scaling(module))
                state["scores"][idx] = torch.where(state["span"][:, None, :], chunk, state["scores"][idx])
                return None

            return hook

        def finish(module, args, kwargs, output):
            if state["running"] or not scope.in_owner_thread() or not scope.pending or scope.cache is None:
                return None
            try:
                with torch.no_grad():
                    self._reconstruct(base, scope, state, first, later)
                    scope.finalize(scope.cache, self.ratio)
            finally:
                state.update(running=False, kwargs=None, scores={}, span=None, queries_valid=None)
                scope.pending.clear()
                scope.cache = None
            return None

        handles = [base.register_forward_pre_hook(keep_inputs, with_kwargs=True),
                   base.register_forward_hook(finish, with_kwargs=True)]
        handles += [attn.register_forward_hook(score_layer(idx), with_kwargs=True) for idx, attn in attentions.items()]
        return handles

    def _reconstruct(self, base: nn.Module, scope, state: dict, first, later) -> None:
        """Run the reconstruction forwards on ``scope.cache`` and put each layer's masked scores in ``scope.pending``;
        the cache is left exactly as the prefill left it."""
        ids, positions = state["kwargs"] if state["kwargs"] is not None else (None, None)
        if ids is None:
            raise ValueError("KVzipPress needs input_ids (not inputs_embeds) in the prefill to reconstruct the context")
        cache = scope.cache
        _, protected, valid = scope.pending[scope.layers[-1]]
        if ids.shape != valid.shape:
            raise ValueError(f"KVzipPress: input_ids {tuple(ids.shape)} do not match the prefilled cache "
                             f"{tuple(valid.shape)}")
        n = ids.shape[1]
        if positions is None:
            positions = torch.arange(n, device=ids.device).expand(ids.shape[0], n)
        next_position = positions.expand(ids.shape[0], n).masked_fill(~valid, -1).amax(-1) + 1  # [B]
        saved = [dict(layer.__dict__) for layer in cache.layers]
        h_kv = full_keys_values(cache.layers[scope.layers[0]])[0].shape[1]
        state["scores"] = {i: torch.zeros(ids.shape[0], h_kv, n, device=ids.device) for i in scope.layers}
        state["running"] = True
        try:
            for input_ids, input_valid, span in reconstruction_inputs(ids, valid, self.chunk_size, first, later,
                                                                      self.overlap):
                state["span"], state["queries_valid"] = span, input_valid
                rank = input_valid.long().cumsum(-1) - 1
                pos = torch.where(input_valid, next_position[:, None] + rank, torch.ones_like(rank))
                mask = torch.cat([valid, input_valid], dim=-1).long()
                base(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                     **{CACHE_KWARG: cache})
                for layer, before in zip(cache.layers, saved):  # drop the reconstruction entries
                    layer.__dict__.clear()
                    layer.__dict__.update(before)
        finally:
            state["running"] = False
            for layer, before in zip(cache.layers, saved):
                layer.__dict__.clear()
                layer.__dict__.update(before)
        for idx in scope.layers:
            _, protected, layer_valid = scope.pending[idx]
            scores = state["scores"][idx]
            scores = scores.masked_fill(protected[:, None, :], math.inf).masked_fill(~layer_valid[:, None, :],
                                                                                      -math.inf)
            scope.pending[idx] = (scores, protected, layer_valid)
