"""Decode throughput on a compressed KV cache versus the full cache, on the embedded SmolLM2-135M-Instruct.

One ``--length``-token context (random tokens, or Paul Graham essay text with ``--context essay``) is prefilled once
per configuration: the full cache (no press; ratio 0) and every press of ``--presses`` at every non-zero ratio of
``--ratios``. The prefill is not timed as part of the benchmark (its time is printed for information). Then
``--steps`` greedy single-token decoding steps are timed per configuration, inside ``with press(model, p)`` as a
compressed (dense-with-valid-mask or ragged per-head) cache needs; the first step feeds the prefill's greedy token.
After every timed run the cache is cropped back (``cache.crop(-steps)``) to exactly the post-prefill state, so no
configuration is prefilled twice. Configurations alternate within each of ``--repeats`` rounds and the best
(shortest) run of each is kept, the measurement least disturbed by other processes. Each configuration first gets
an untimed warm-up of 2 steps.

``--clock cpu`` times with the process's CPU time (``time.process_time``) instead of the wall clock: with
``--threads 1`` that is the computation itself, little disturbed by other processes on a shared machine (as
``fastkv_prefill.py`` does); quote those ratios when the machine is busy.

Reported: tokens/s, ms per token, the speed-up over the full cache (measured in the same run), the KV bytes after
prefill (``kvpress_like.cache_bytes``) and the 1-minute load average. Unless ``--no-split``, one more (instrumented,
untimed-for-the-table) decoding run per configuration splits a step's time into: the attention modules (of which:
the press's hooks, of which building the per-layer attention mask; the cache update, i.e. ``Cache.update``, which
appends the new token (and, for a ragged layer under eager attention, builds the padded view); the attention kernel,
i.e. the function in ``ALL_ATTENTION_FUNCTIONS`` as wrapped by the press (under sdpa it attends over a ragged layer's
flat storage itself); the rest: q/k/v/o projections, RoPE, reshapes), the MLPs, the model-level causal mask
(``create_causal_mask``), the LM head and everything else (embedding, norms, residuals, Python overhead). The
instrumentation wraps those functions with ``time.perf_counter`` (a few microseconds per call).

A press is a name with optional keyword arguments: ``compactor``, ``knorm`` (a cheap scorer: the decode speed does
not depend on the scorer, only on how many entries are kept and how they are stored),
``compactor:allocator=head_adaptive`` (per-head budgets, stored as ragged layers).

Usage::

    python benchmarks/decode_throughput.py          # 8192 tokens; compactor, knorm, ragged compactor at 0.5 and 0.75
    python benchmarks/decode_throughput.py --length 512 --steps 8 --presses knorm --ratios 0 0.5   # a quick check
    python benchmarks/decode_throughput.py --length 16384 --presses compactor --ratios 0 0.5 0.75 0.9 --threads 1

Run it alone: decoding a 135M model is memory-bandwidth-bound and other processes on the same cores distort the
numbers (the ``load`` column, well above the thread count, says so); ``--threads 1`` is less sensitive.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from common import context_ids, load_average, machine_line, parse_press
from transformers import DynamicCache

import kvpress_like
from kvpress_like.cache import CACHE_KWARG, CompressedLayer, RaggedLayer, cache_bytes
from kvpress_like.eval.model import load_model

MIB = 2**20
DEFAULT_PRESSES = ["compactor", "knorm", "compactor:allocator=head_adaptive"]


@dataclass
class Config:
    """One decoding configuration: a prefilled cache and the press it was compressed with (``None``: full cache)."""

    label: str
    ratio: float
    press: object | None
    cache: DynamicCache | None = None
    first_token: torch.Tensor | None = None
    length: int = 0
    kv_bytes: int = 0
    storage: str = ""
    prefill_s: float = 0.0
    times: list[float] = field(default_factory=list)
    split: dict[str, float] = field(default_factory=dict)

    def installed(self, model):
        return kvpress_like.press(model, self.press) if self.press is not None else nullcontext()


def prefill(model, config: Config, ids: torch.Tensor) -> None:
    config.cache = DynamicCache(config=model.config)
    gc.collect()
    start = time.perf_counter()
    with torch.no_grad(), config.installed(model):
        logits = model(input_ids=ids, **{CACHE_KWARG: config.cache}, use_cache=True, logits_to_keep=1).logits
    config.prefill_s = time.perf_counter() - start
    config.first_token = logits[:, -1].argmax(-1, keepdim=True)
    config.length = config.cache.get_seq_length()
    config.kv_bytes = cache_bytes(config.cache)
    kinds = {type(layer).__name__ for layer in config.cache.layers}
    config.storage = "+".join(sorted(kinds))


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]  # what greedy_steps times with (--clock)


def greedy_steps(model, config: Config, steps: int) -> float:
    """Seconds of ``steps`` greedy single-token forwards on ``config``'s cache from its first token (no crop)."""
    token = config.first_token
    start = clock()
    for _ in range(steps):
        logits = model(input_ids=token, **{CACHE_KWARG: config.cache}, use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
    return clock() - start


def decode(model, config: Config, steps: int) -> float:
    """Seconds of ``steps`` greedy decoding steps on ``config``'s cache, which is then cropped back."""
    with torch.no_grad(), config.installed(model):
        seconds = greedy_steps(model, config, steps)
    config.cache.crop(-steps)
    if config.cache.get_seq_length() != config.length:
        raise RuntimeError(f"{config.label}: crop left {config.cache.get_seq_length()} tokens, not {config.length}")
    return seconds


# --------------------------------------------------------------------------------------------- time split per step
class Split:
    """Accumulates wall time per named part while patched functions and hooked modules run."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn):
        seconds = self.seconds

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start

        return timed

    def hook_module(self, name: str, module, stack: ExitStack) -> None:
        starts = []

        def pre(*_args, **_kwargs):
            starts.append(time.perf_counter())

        def post(*_args, **_kwargs):
            self.seconds[name] += time.perf_counter() - starts.pop()

        # prepend: starts before any hook already installed (the press's); post registered last: ends after them
        stack.callback(module.register_forward_pre_hook(pre, prepend=True).remove)
        stack.callback(module.register_forward_hook(post).remove)


@contextmanager
def patched(obj, name: str, value):
    """Temporarily set ``obj.name = value`` (restoring the exact previous state, including absence)."""
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


def split_step(model, config: Config, steps: int) -> dict[str, float]:
    """Milliseconds per decoding step spent in each part (see the module docstring), from one instrumented run."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from kvpress_like import context as press_context

    split = Split()
    impl = model.config._attn_implementation
    modeling = sys.modules[type(model.model).__module__]
    cache_type = type(config.cache)
    with ExitStack() as stack, torch.no_grad():
        # patched before the press is entered, so the hooks it registers are the timed methods
        stack.enter_context(patched(press_context.LayerHooks, "before",
                                    split.wrap("press hooks", press_context.LayerHooks.before)))
        stack.enter_context(patched(press_context.LayerHooks, "after",
                                    split.wrap("press hooks", press_context.LayerHooks.after)))
        for cls in (CompressedLayer, RaggedLayer):
            stack.enter_context(patched(cls, "attention_mask", split.wrap("layer mask", cls.attention_mask)))
        stack.enter_context(patched(cache_type, "update", split.wrap("cache update", cache_type.update)))
        if hasattr(modeling, "create_causal_mask"):
            stack.enter_context(patched(modeling, "create_causal_mask",
                                        split.wrap("model mask", modeling.create_causal_mask)))
        stack.enter_context(config.installed(model))
        # after the press is entered: its sdpa wrapper (which attends over ragged layers itself) is what is timed
        attention_fn = ALL_ATTENTION_FUNCTIONS[impl]
        had_local = impl in ALL_ATTENTION_FUNCTIONS._local_mapping
        ALL_ATTENTION_FUNCTIONS[impl] = split.wrap("attention kernel", attention_fn)
        if had_local:
            stack.callback(ALL_ATTENTION_FUNCTIONS.__setitem__, impl, attention_fn)
        else:
            stack.callback(ALL_ATTENTION_FUNCTIONS.__delitem__, impl)
        for layer in model.model.layers:
            split.hook_module("attention module", layer.self_attn, stack)
            split.hook_module("mlp", layer.mlp, stack)
        split.hook_module("lm head", model.lm_head, stack)
        total = greedy_steps(model, config, steps)
    config.cache.crop(-steps)
    s = split.seconds
    parts = {
        "step": total,
        "attention module": s["attention module"],
        "press hooks": s["press hooks"],
        "layer mask": s["layer mask"],
        "cache update": s["cache update"],
        "attention kernel": s["attention kernel"],
        "proj/RoPE/rest": s["attention module"] - s["press hooks"] - s["cache update"] - s["attention kernel"],
        "mlp": s["mlp"],
        "model mask": s["model mask"],
        "lm head": s["lm head"],
    }
    parts["other"] = total - s["attention module"] - s["mlp"] - s["model mask"] - s["lm head"]
    return {name: 1000 * value / steps for name, value in parts.items()}


# ----------------------------------------------------------------------------------------------------- the driver
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=8192, help="context tokens (default 8192)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5, 0.75],
                        help="fractions of the KV pairs removed; 0 = the full cache, which is always run as the "
                             "reference (default: 0 0.5 0.75)")
    parser.add_argument("--presses", "--press", nargs="+", default=DEFAULT_PRESSES,
                        help="press[:key=value,...] (default: compactor knorm compactor:allocator=head_adaptive)")
    parser.add_argument("--steps", type=int, default=64, help="greedy decoding steps timed per run (default 64)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds; the best run is kept (default 2)")
    parser.add_argument("--context", choices=("random", "essay"), default="random", help="context text")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-split", dest="split", action="store_false",
                        help="skip the instrumented run that splits a step's time into parts")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall clock, or the process's CPU time (use with --threads 1 on a busy machine)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]

    if args.threads:
        torch.set_num_threads(args.threads)
    if any(not 0 <= r < 1 for r in args.ratios):
        raise SystemExit("--ratios must be in [0, 1)")
    presses = [(spec, *parse_press(spec)) for spec in args.presses]
    for _spec, name, kwargs in presses:  # fail early on an unknown press or argument
        kvpress_like.create_press(name, ratio=0.5, **kwargs)

    print(machine_line(), flush=True)
    start = time.perf_counter()
    model, tokenizer = load_model("default")
    print(f"model: embedded SmolLM2-135M-Instruct (float32, {model.config._attn_implementation}), loaded in "
          f"{time.perf_counter() - start:.1f} s; context: {args.length} {args.context} tokens; {args.steps} greedy "
          f"steps per run, best of {args.repeats} alternating rounds, {args.clock} clock", flush=True)
    ids = context_ids(args.context, args.length, model.config.vocab_size, tokenizer, args.seed)

    configs = [Config("full cache (no press)", 0.0, None)]
    for ratio in sorted({r for r in args.ratios if r > 0}):
        for spec, name, kwargs in presses:
            configs.append(Config(f"{spec} @ {ratio:g}", ratio, kvpress_like.create_press(name, ratio=ratio, **kwargs)))
    for config in configs:
        prefill(model, config, ids)
        decode(model, config, min(2, args.steps))  # warm-up
        print(f"prefilled {config.label}: {config.prefill_s:.1f} s, KV {config.kv_bytes / MIB:.1f} MiB "
              f"({config.storage})", flush=True)
    for round_ in range(args.repeats):
        for config in configs:
            config.times.append(decode(model, config, args.steps))
        print(f"round {round_ + 1}/{args.repeats}: " + ", ".join(
            f"{c.label} {args.steps / c.times[-1]:.2f} tok/s" for c in configs) + f" (load {load_average():.1f})",
              flush=True)

    full = configs[0]
    full_rate = args.steps / min(full.times)
    print(f"\n## decode throughput: {args.length} {args.context} tokens, {args.steps} greedy steps, best of "
          f"{args.repeats}, {args.clock} clock\n")
    header = "| configuration | KV MiB | KV / full | storage | tokens/s | ms/token | speed-up vs full | load |"
    print(header)
    print("|---|" + "---:|" * 2 + "---|" + "---:|" * 4)
    for config in configs:
        rate = args.steps / min(config.times)
        print(f"| {config.label} | {config.kv_bytes / MIB:.1f} | {config.kv_bytes / full.kv_bytes:.3f} | "
              f"{config.storage} | {rate:.2f} | {1000 / rate:.1f} | {rate / full_rate:.2f}x | {load_average():.1f} |")

    if args.split:
        for config in configs:
            config.split = split_step(model, config, args.steps)
        names = list(configs[0].split)
        print(f"\n## time split per decoding step (ms, one instrumented run of {args.steps} steps each; 'press hooks' "
              "includes 'layer mask'; the attention module = press hooks + cache update + attention kernel + "
              "proj/RoPE/rest)\n")
        print("| configuration | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for config in configs:
            print(f"| {config.label} | " + " | ".join(f"{config.split[n]:.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
