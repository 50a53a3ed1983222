"""Peak memory of a 32k-token prefill under every press, on a tiny random Llama (no download, no real weights).

Each press runs in its own subprocess (so one run's allocations cannot hide another's peak). The worker builds a
3-layer Llama (hidden 64, 4 query heads, 2 KV heads, head dim 16) from a config, warms up on a short prefill, resets
the kernel's peak-RSS counter when it can (``/proc/self/clear_refs``), then prefills ``--length`` random tokens with
the press at ``--ratio`` (only the last position's logits are computed). Reported per press:

* ``peak RSS``: the process's peak resident set size (``VmHWM`` from ``/proc/self/status``; ``ru_maxrss`` elsewhere);
* ``prefill peak``: peak RSS minus the RSS just before the prefill (what the prefill itself added at its peak);
* ``kept cache``: bytes of the KV cache after the prefill (``kvpress_like.cache_bytes``) and as a fraction of the
  uncompressed cache;
* the prefill's wall time.

The first row, ``none``, is the same prefill without a press. A scorer that built an ``S x S`` tensor would show up
at once: at 32k tokens one fp32 ``S x S`` matrix per head is 4 GiB.

Usage::

    python benchmarks/memory_32k.py                      # every registered press, 32768 tokens, ratio 0.5
    python benchmarks/memory_32k.py --presses compactor snapkv --length 16384
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

from common import status_field

from kvpress_like.cache import CACHE_KWARG

MIB = 1024 * 1024


def rss_now() -> int:
    """Current resident set size in bytes."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return status_field("VmRSS")


def rss_peak() -> int:
    """Peak resident set size in bytes since start (or since the last :func:`reset_peak`)."""
    try:
        return status_field("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def tiny_llama(layers: int, length: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(length, 4096))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def worker(name: str, length: int, ratio: float, layers: int) -> dict:
    """One prefill of ``length`` tokens with press ``name`` (``"none"`` = no press); returns the measurements."""
    import torch
    from transformers import DynamicCache

    import kvpress_like

    model = tiny_llama(layers, length)
    ids = torch.randint(1, 128, (1, length), generator=torch.Generator().manual_seed(0))
    p = None if name == "none" else kvpress_like.create_press(name, ratio=ratio)

    def run(tokens):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            if p is None:
                model(input_ids=tokens, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
            else:
                with kvpress_like.press(model, p):
                    model(input_ids=tokens, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
        return cache

    run(ids[:, :256])  # warm-up: kernels, allocator
    before = rss_now()
    peak_was_reset = reset_peak()
    start = time.perf_counter()
    cache = run(ids)
    seconds = time.perf_counter() - start
    peak = rss_peak()
    cfg = model.config
    full = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4 * length * layers
    return {"press": name, "seconds": seconds, "rss_before": before, "peak_rss": peak, "peak_reset": peak_was_reset,
            "cache_bytes": kvpress_like.cache_bytes(cache), "full_cache_bytes": full}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=32768, help="context length (tokens)")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of the KV pairs removed")
    parser.add_argument("--layers", type=int, default=3, help="decoder layers of the tiny Llama")
    parser.add_argument("--presses", nargs="+", default=None, help="press names (default: every registered press)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.length, args.ratio, args.layers)))
        return

    import torch
    import transformers

    import kvpress_like

    names = args.presses
    if not names:  # every registered press that takes a prefill ratio (a decoding-time press has none)
        names = []
        for name in kvpress_like.list_presses():
            try:
                kvpress_like.create_press(name, ratio=args.ratio)
            except (TypeError, ValueError) as error:
                print(f"skipped press {name!r} (not a prefill press with a ratio): {error}")
                continue
            names.append(name)
    print(f"machine: {platform.platform()} | python {platform.python_version()} | torch {torch.__version__} | "
          f"transformers {transformers.__version__} | threads {torch.get_num_threads()}")
    print(f"model: tiny random Llama, {args.layers} layers, hidden 64, 4 query / 2 KV heads, head dim 16, fp32, sdpa; "
          f"prefill {args.length} tokens, ratio {args.ratio}; one subprocess per press\n")
    header = (f"| {'press':<20} | prefill s | peak RSS MiB | prefill peak MiB | kept cache MiB | kept / full |")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|", flush=True)
    for name in ["none", *names]:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--length", str(args.length),
               "--ratio", str(args.ratio), "--layers", str(args.layers)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
            print(f"| {name:<20} | failed (exit {proc.returncode}): {tail[0]}", flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        added = r["peak_rss"] - r["rss_before"]
        print(f"| {name:<20} | {r['seconds']:9.2f} | {r['peak_rss'] / MIB:12.0f} | {added / MIB:16.0f} | "
              f"{r['cache_bytes'] / MIB:14.2f} | {r['cache_bytes'] / r['full_cache_bytes']:11.3f} |", flush=True)
        if not r["peak_reset"]:
            print(f"  (note: peak RSS of {name} could not be reset after warm-up; it includes the warm-up)")


if __name__ == "__main__":
    main()
