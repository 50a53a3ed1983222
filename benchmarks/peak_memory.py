"""Peak memory of prefill + decoding with and without a press, on the embedded SmolLM2-135M.

Each configuration runs in its own subprocess (so the peak RSS is its own): load the model, prefill a ``--length``
random-token context, decode ``--steps`` greedy tokens inside ``with press(model, p)``. Reported:

* peak RSS during prefill + decoding (sampled every 2 ms by a thread; the model's load has its own, larger peak,
  which is why ``ru_maxrss`` is not used) and its increase over the RSS right after loading the model;
* peak KV-cache bytes (``kvpress_like.cache_bytes``, read right after every attention's cache update, before the
  press cuts the layer back, so the full layer of the prefill is counted) and the cache bytes at the end;
* ratios to the run without a press.

Usage::

    python benchmarks/peak_memory.py                                   # 8192 tokens, 64 steps, ratio 0.5
    python benchmarks/peak_memory.py --length 1024 --steps 8           # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from contextlib import nullcontext

CONFIGS = {
    "no press": None,
    "compactor": {"press": "compactor"},
    "snapkv": {"press": "snapkv"},
    "knorm": {"press": "knorm"},
    "compactor + head_adaptive": {"press": "compactor", "allocator": "head_adaptive"},
    "compactor, chunked prefill (1024)": {"press": "compactor", "chunk_size": 1024},
}


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(config: dict | None, length: int, steps: int, ratio: float) -> dict:
    import torch
    from transformers import DynamicCache

    import kvpress_like
    from kvpress_like.cache import CACHE_KWARG, cache_bytes
    from kvpress_like.eval.model import load_model

    model, _ = load_model("default")
    after_load = rss_mib()
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    config = dict(config or {})
    chunk_size = config.pop("chunk_size", None)
    p = kvpress_like.create_press(config.pop("press"), ratio=ratio, **config) if config else None
    peak = {"kv": 0, "cache": None}

    def grab(module, args, kwargs):
        peak["cache"] = kwargs.get("cache", kwargs.get("past_key_values"))

    def measure(module, args, output):
        if peak["cache"] is not None:
            peak["kv"] = max(peak["kv"], cache_bytes(peak["cache"]))

    attentions = [layer.self_attn for layer in model.model.layers]
    handles = [a.register_forward_pre_hook(grab, with_kwargs=True) for a in attentions]
    handles += [a.register_forward_hook(measure) for a in attentions]  # registered first: runs before the press's
    sampled = {"max": rss_mib(), "stop": False}

    def sample_rss():
        while not sampled["stop"]:
            sampled["max"] = max(sampled["max"], rss_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    with torch.no_grad():
        if chunk_size:
            cache = kvpress_like.chunked_prefill(model, p, ids, chunk_size=chunk_size)
        else:
            cache = DynamicCache(config=model.config)
        with kvpress_like.press(model, p) if p is not None else nullcontext():
            if not chunk_size:
                model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
            token = ids[:, -1:]
            for _ in range(steps):
                token = model(input_ids=token, **{CACHE_KWARG: cache}, use_cache=True).logits[:, -1].argmax(-1, True)
    sampled["stop"] = True
    sampler.join()
    for handle in handles:
        handle.remove()
    return {"peak_rss": sampled["max"], "after_load": after_load,
            "peak_kv": peak["kv"], "final_kv": cache_bytes(cache)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help="names of CONFIGS to run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child), args.length, args.steps, args.ratio)))
        return
    import torch
    import transformers

    import kvpress_like

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, kvpress-like {kvpress_like.__version__}; {args.length:,} tokens, "
          f"{args.steps} decode steps, ratio {args.ratio}")
    results = {}
    for name in args.configs:
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(CONFIGS[name]), "--length",
                              str(args.length), "--steps", str(args.steps), "--ratio", str(args.ratio)],
                             capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]}", flush=True)
    base = results.get("no press")
    print("\n| configuration | peak RSS | RSS over loaded model | peak KV | final KV | peak KV vs no press "
          "| RSS increase vs no press |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        grow = r["peak_rss"] - r["after_load"]
        vs_kv = f"{r['peak_kv'] / base['peak_kv']:.3f}" if base else "–"
        vs_rss = f"{grow / (base['peak_rss'] - base['after_load']):.3f}" if base else "–"
        print(f"| {name} | {r['peak_rss']:.0f} MiB | {grow:.0f} MiB | {r['peak_kv'] / 2**20:.1f} MiB "
              f"| {r['final_kv'] / 2**20:.1f} MiB | {vs_kv} | {vs_rss} |")


if __name__ == "__main__":
    main()
