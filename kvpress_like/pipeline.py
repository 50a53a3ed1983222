"""The transformers pipeline task ``kv-press-text-generation``: compress a context once, answer questions on it.

    from transformers import pipeline
    import kvpress_like  # registers the task
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    pipe(context, question="...", press=CompactorPress(ratio=0.5))["answer"]

Only the context is compressed (query-agnostic) unless ``compress_questions=True``. Several questions reuse one
compressed context: after each answer the cache is cropped back to its compressed-context state (no second
prefill).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from transformers import AutoModelForCausalLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .cache import CACHE_KWARG, cache_bytes, full_cache_bytes, kept_fraction, prefill
from .checks import check_int
from .context import active_press
from .context import press as press_context
from .press import Press, applied_ratio

TASK = "kv-press-text-generation"


def split_prompt(tokenizer, context: str, question: str, answer_prefix: str = "") -> tuple[str, str, bool]:
    """Split a prompt into the context part (compressed) and the rest (question, assistant prefix, answer prefix).

    With a chat template the user message is ``context + "\\n\\n" + question`` and the templated text is cut right
    after the context; without one the prompt is ``context + "\\n\\nQuestion: ...\\nAnswer:"``.

    Returns:
        ``(prefix, suffix, templated)``: ``prefix + suffix`` is the whole prompt text.
    """
    if getattr(tokenizer, "chat_template", None):
        user = f"{context}\n\n{question}"
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
        start = text.find(user)
        if start >= 0:
            cut = start + len(context)
            return text[:cut], text[cut:] + answer_prefix, True
    return context, f"\n\nQuestion: {question}\nAnswer:{' ' + answer_prefix if answer_prefix else ''}", False


def encode_prompt(tokenizer, context: str, question: str, answer_prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """``(context_ids, suffix_ids)``, each ``[1, n]``: the tokens of :func:`split_prompt`'s two parts."""
    prefix, suffix, templated = split_prompt(tokenizer, context, question, answer_prefix)
    context_ids = tokenizer(prefix, add_special_tokens=not templated)["input_ids"]
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    if not context_ids or not suffix_ids:
        raise ValueError("the context and the question must both be non-empty after tokenization")
    return torch.tensor([context_ids]), torch.tensor([suffix_ids])


def encode_question(tokenizer, question: str, answer_prefix: str = "") -> torch.Tensor:
    """``[1, q]``: the ids that follow a context, :func:`encode_prompt`'s ``suffix_ids``, without the context at hand
    (e.g. for a cache loaded with :func:`~kvpress_like.saved_cache.load_cache`). They do not depend on the context:
    the suffix is tokenized on its own."""
    return encode_prompt(tokenizer, "context", question, answer_prefix)[1]


def answer_on_cache(model, cache, context_ids: torch.Tensor, suffix_ids: torch.Tensor, max_new_tokens: int):
    """Greedy answer to ``suffix_ids`` ``[1, q]`` on a cache holding ``context_ids`` ``[1, S]`` (compressed or
    not), leaving the cache as it was (the context only). Returns the generated ids ``[n]``.

    Run it inside ``with press(model, p)`` when the cache holds ragged or padded compressed layers. The cache is
    cropped back to the context afterwards; when the installed press compresses while decoding (which cropping
    cannot undo) the answer is decoded on a copy of the cache instead.
    """
    context_length = cache.get_seq_length()
    if context_length != context_ids.shape[1]:
        raise ValueError(f"the cache has seen {context_length} tokens but context_ids has {context_ids.shape[1]}")
    installed = active_press(model)
    on_copy = installed is not None and installed.acts_while_decoding
    work = copy.deepcopy(cache) if on_copy else cache
    for layer in work.layers:  # sliding-window layers must remember evicted states to be cropped back
        if hasattr(layer, "activate_past_recording"):
            layer.activate_past_recording()
    prompt = torch.cat([context_ids, suffix_ids.to(context_ids.device)], dim=1)
    output = model.generate(prompt, attention_mask=torch.ones_like(prompt), **{CACHE_KWARG: work},
                            max_new_tokens=max_new_tokens, do_sample=False)
    if not on_copy:
        cache.crop(context_length - cache.get_seq_length())
    return output[0, prompt.shape[1]:]


class KVPressTextGenerationPipeline(Pipeline):
    """Answer one or several questions about a long context whose KV cache is compressed by a press.

    Call arguments:
        context (str): the long text (compressed).
        question (str) or questions (list[str]): asked after the context.
        press (Press | None): the press; ``None`` keeps the full cache, unless a press is already installed on the
            model (``with press(model, p): pipe(...)``): that press then compresses, and is the one reported.
        answer_prefix (str): text the answer starts with (also fed to the model).
        max_new_tokens (int): decoding budget per question (default 50).
        compress_questions (bool): compress the question together with the context (query-aware); each question
            then needs its own prefill.
        return_cache_stats (bool): also return ``cache_stats`` (bytes of the full context cache, bytes after
            compression, kept fraction, and the ratio applied: for ``ratio="auto"`` presses, the one chosen).

    Returns:
        ``{"answer": str}`` for one ``question``, ``{"answers": [str, ...]}`` for ``questions``; plus
        ``"cache_stats"`` on request.
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False

    def _sanitize_parameters(self, question=None, questions=None, press=None, answer_prefix="", max_new_tokens=50,
                             compress_questions=False, return_cache_stats=False, **kwargs):
        if kwargs:
            raise TypeError(f"{TASK} got unexpected arguments: {', '.join(sorted(kwargs))}")
        if question is not None and questions is not None:
            raise ValueError("pass either question= (a string) or questions= (a list of strings), not both")
        qs = None if question is None and questions is None else ([question] if question is not None else questions)
        if qs is not None and (isinstance(qs, str) or not qs or not all(isinstance(q, str) and q for q in qs)):
            raise ValueError("question must be a non-empty string and questions a non-empty list of them")
        if press is not None and not isinstance(press, Press):
            raise TypeError(f"press must be a kvpress_like Press or None; got {type(press).__name__}")
        check_int("max_new_tokens", max_new_tokens, minimum=1)
        preprocess = {"questions": qs, "answer_prefix": answer_prefix, "compress_questions": bool(compress_questions)}
        forward = {"press": press, "max_new_tokens": max_new_tokens}
        post = {"single": question is not None, "return_cache_stats": bool(return_cache_stats)}
        return preprocess, forward, post

    def preprocess(self, context, questions, answer_prefix, compress_questions):
        if questions is None:
            raise ValueError(f"{TASK} needs question= (a string) or questions= (a list of strings)")
        if not isinstance(context, str) or not context:
            raise ValueError("context must be a non-empty string")
        parts = [encode_prompt(self.tokenizer, context, q, answer_prefix) for q in questions]
        if compress_questions:  # the question joins the compressed part; only the assistant prefix remains
            return {"prefills": [torch.cat([c, s[:, :-1]], dim=1) for c, s in parts],
                    "suffixes": [s[:, -1:] for _, s in parts]}
        return {"prefills": [parts[0][0]], "suffixes": [s for _, s in parts]}

    def _forward(self, inputs, press, max_new_tokens):
        prefills, suffixes = inputs["prefills"], inputs["suffixes"]
        answers, stats, cache = [], None, None
        applied = press if press is not None else active_press(self.model)  # a press installed around the call
        with press_context(self.model, press) if press is not None else nullcontext():
            for i, suffix in enumerate(suffixes):
                prefill_ids = prefills[i] if len(prefills) > 1 else prefills[0]
                if cache is None or len(prefills) > 1:  # one prefill per distinct compressed part
                    cache = prefill(self.model, prefill_ids)
                    stats = stats or {"bytes_after": cache_bytes(cache), "kept_fraction": kept_fraction(cache),
                                      "context_tokens": prefill_ids.shape[1],
                                      "ratio": applied_ratio(applied, cache)}
                answers.append(answer_on_cache(self.model, cache, prefill_ids, suffix, max_new_tokens))
        return {"answers": answers, "stats": stats}

    def postprocess(self, outputs, single, return_cache_stats):
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs["answers"]]
        result = {"answer": texts[0]} if single else {"answers": texts}
        if return_cache_stats:
            stats = dict(outputs["stats"])
            stats["bytes_before"] = full_cache_bytes(self.model.config, stats["context_tokens"], batch_size=1,
                                                     dtype=self.model.dtype)
            result["cache_stats"] = stats
        return result


def register() -> None:
    """Register the ``kv-press-text-generation`` task with transformers (done when this module is imported, which
    ``import kvpress_like`` arranges for as soon as ``transformers.pipelines`` is imported)."""
    if TASK not in PIPELINE_REGISTRY.supported_tasks:
        PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=KVPressTextGenerationPipeline,
                                            pt_model=AutoModelForCausalLM)


register()
