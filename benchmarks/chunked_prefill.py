"""Chunked prefill with compression on the embedded SmolLM2-135M: peak KV memory and needle accuracy.

Part 1 prefills a ``--long``-token context (32,768 by default, random tokens) in chunks of ``--chunk-size`` with
Compactor at ``--ratio`` (0.75), recording the KV cache's bytes after every decoder layer of every chunk; it reports
the peak against the full cache of the same context (computed, since a one-shot 32k prefill would hold it all).

Part 2 compares chunked with one-shot compression on the needle-in-a-haystack sample at ``--length`` (4,096)
tokens, several depths, each ratio: the question is asked after compression (query-agnostic).

Usage::

    python benchmarks/chunked_prefill.py                       # both parts
    python benchmarks/chunked_prefill.py --skip-long           # only the needle comparison
    python benchmarks/chunked_prefill.py --long 4096 --depths 0.5 --ratios 0.75   # a quick check
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import transformers

import kvpress_like
from kvpress_like.cache import cache_bytes
from kvpress_like.chunked import chunked_prefill
from kvpress_like.eval.model import full_cache_bytes, load_model
from kvpress_like.eval.sample import build_sample
from kvpress_like.pipeline import answer_on_cache, encode_prompt


def peak_kv(model, p, ids, chunk_size):
    """Peak cache bytes of a chunked prefill, read right after each attention's cache update (before the layer is
    cut back to its budget: these hooks run before the press's), the final bytes and the seconds."""
    layers = [layer.self_attn for layer in model.model.layers]
    state = {"peak": 0, "cache": None}

    def grab_cache(module, args, kwargs):
        state["cache"] = kwargs.get("cache", kwargs.get("past_key_values"))

    def measure(module, args, output):
        if state["cache"] is not None:
            state["peak"] = max(state["peak"], cache_bytes(state["cache"]))

    handles = [layer.register_forward_pre_hook(grab_cache, with_kwargs=True) for layer in layers]
    handles += [layer.register_forward_hook(measure) for layer in layers]
    try:
        start = time.perf_counter()
        cache = chunked_prefill(model, p, ids, chunk_size=chunk_size)
        seconds = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    return state["peak"], cache_bytes(cache), seconds


def needle_found(model, tokenizer, p, sample, chunk_size, max_new_tokens=24) -> bool:
    context_ids, suffix_ids = encode_prompt(tokenizer, sample.context, sample.question)
    with torch.no_grad():
        if chunk_size is None:
            cache = transformers.DynamicCache(config=model.config)
            with kvpress_like.press(model, p):
                model(input_ids=context_ids, cache=cache, use_cache=True, logits_to_keep=1)
        else:
            cache = chunked_prefill(model, p, context_ids, chunk_size=chunk_size)
        answer = answer_on_cache(model, cache, context_ids, suffix_ids, max_new_tokens)
    return sample.answer in tokenizer.decode(answer, skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", type=int, default=32768, help="tokens of the long context (part 1)")
    parser.add_argument("--chunk-size", type=int, default=2048, help="chunk size of part 1")
    parser.add_argument("--ratio", type=float, default=0.75, help="ratio of part 1")
    parser.add_argument("--skip-long", action="store_true", help="skip part 1")
    parser.add_argument("--length", type=int, default=4096, help="needle context tokens (part 2)")
    parser.add_argument("--needle-chunk-size", type=int, default=1024, help="chunk size of part 2")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75], help="ratios of part 2")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--press", default="compactor")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, kvpress-like {kvpress_like.__version__}")
    model, tokenizer = load_model("default")

    if not args.skip_long:
        ids = torch.randint(0, model.config.vocab_size, (1, args.long), generator=torch.Generator().manual_seed(0))
        p = kvpress_like.create_press(args.press, ratio=args.ratio)
        peak, final, seconds = peak_kv(model, p, ids, args.chunk_size)
        full = full_cache_bytes(model.config, args.long)
        print(f"\n## {args.long:,}-token chunked prefill, {args.press} ratio {args.ratio}, chunks of {args.chunk_size}")
        print("| full cache (computed) | peak KV during prefill | peak / full | final KV | final / full | seconds |")
        print("|---:|---:|---:|---:|---:|---:|")
        print(f"| {full / 2**20:.1f} MiB | {peak / 2**20:.1f} MiB | {peak / full:.3f} | {final / 2**20:.1f} MiB "
              f"| {final / full:.3f} | {seconds:.0f} |", flush=True)

    samples = [build_sample(tokenizer, length=args.length, depth=d) for d in args.depths]
    print(f"\n## needle at {args.length:,} tokens, depths {args.depths}, {args.press}, query-agnostic")
    print(f"| ratio | one-shot | chunked ({args.needle_chunk_size}) |\n|---:|---:|---:|")
    for ratio in args.ratios:
        p = kvpress_like.create_press(args.press, ratio=ratio)
        one_shot = sum(needle_found(model, tokenizer, p, s, None) for s in samples)
        chunked = sum(needle_found(model, tokenizer, p, s, args.needle_chunk_size) for s in samples)
        print(f"| {ratio} | {one_shot}/{len(samples)} | {chunked}/{len(samples)} |", flush=True)


if __name__ == "__main__":
    main()
