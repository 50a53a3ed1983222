"""Decode throughput with a compressed cache versus the full cache, on the embedded SmolLM2-135M.

For each ratio (0 = the full cache, no press) a ``--length``-token random context is prefilled once, then ``--steps``
greedy single-token steps are timed (the prefill is not); the cache is cropped back after each repeat and the best
of ``--repeats`` is kept. Decoding runs inside ``with press(model, p)``, as it must for compressed caches.

Usage::

    python benchmarks/decode_throughput.py                          # 8192 tokens, ratios 0 0.5 0.75, compactor
    python benchmarks/decode_throughput.py --length 1024 --steps 8 --press knorm   # a quick check
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from contextlib import nullcontext

import torch
import transformers
from transformers import DynamicCache

import kvpress_like
from kvpress_like.cache import CACHE_KWARG, cache_bytes
from kvpress_like.eval.model import load_model


def tokens_per_second(model, p, ids: torch.Tensor, steps: int, repeats: int) -> tuple[float, int]:
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), kvpress_like.press(model, p) if p is not None else nullcontext():
        model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
        size = cache_bytes(cache)
        best = float("inf")
        for _ in range(repeats):
            token = ids[:, -1:]
            start = time.perf_counter()
            for _ in range(steps):
                logits = model(input_ids=token, **{CACHE_KWARG: cache}, use_cache=True).logits
                token = logits[:, -1].argmax(-1, keepdim=True)
            best = min(best, time.perf_counter() - start)
            cache.crop(-steps)
    return steps / best, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    parser.add_argument("--press", default="compactor")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; torch "
          f"{torch.__version__}, transformers {transformers.__version__}, kvpress-like {kvpress_like.__version__}")
    model, _ = load_model("default")
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
    rows = []
    for ratio in args.ratios:
        p = kvpress_like.create_press(args.press, ratio=ratio) if ratio > 0 else None
        rate, size = tokens_per_second(model, p, ids, args.steps, args.repeats)
        rows.append((ratio, rate, size))
        print(f"ratio {ratio}: {rate:.2f} tokens/s, cache {size / 2**20:.1f} MiB", flush=True)
    full = rows[0][1] if rows[0][0] == 0 else None
    print(f"\n| {args.press} ratio | cache | tokens/s | vs full cache |\n|---:|---:|---:|---:|")
    for ratio, rate, size in rows:
        speedup = f"{rate / full:.2f}x" if full else "–"
        print(f"| {ratio:g} | {size / 2**20:.1f} MiB | {rate:.2f} | {speedup} |")


if __name__ == "__main__":
    main()
