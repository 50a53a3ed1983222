"""Peak memory of a long prefill plus greedy decoding, per press, on the embedded SmolLM2-135M-Instruct.

Every configuration runs in its own fresh subprocess, so each peak is that run's alone. The worker loads the model,
warms up on a short prefill + 2 decode steps with the same configuration, then prefills a ``--length``-token context
(random tokens, or Paul Graham essay text with ``--context essay``; only the last position's logits are computed)
and decodes ``--steps`` greedy tokens, with the press installed (``with press(model, p)``) for both. Measured:

* ``peak RSS``: the kernel's peak resident set size of the prefill + decoding alone. The worker resets the peak
  counter after the warm-up (``/proc/self/clear_refs``, Linux >= 4.0) and reads ``VmHWM``; where that is not possible
  it samples ``VmRSS`` every 2 ms from a thread (the table marks such values with ``~``). ``RSS added`` is that peak
  minus the RSS at the reset, i.e. right after the model load and the (small) warm-up: what the context, its KV cache
  and the activations added at their peak. The RSS right after the load is printed too, but it is not used as the
  base: under memory pressure from other processes the kernel may drop file-backed pages (shared libraries) between
  the load and the run, which once made "peak minus RSS after load" negative; a drop of file-backed RSS during the
  run itself is reported under the table.
* ``ru_maxrss``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end. On Linux resetting ``VmHWM`` resets it as
  well, so it is a cross-check of ``peak RSS``; where the reset failed it is the whole process's lifetime peak,
  model load included. The load's own peak (``ru_maxrss`` before the reset; it de-quantizes the GGUF file) is printed
  under the table.
* ``tensor peak``: the peak of bytes held by CPU tensors allocated during the prefill + decoding, as seen by torch's
  CPU allocator (``torch.profiler.profile(profile_memory=True)``: every allocation and free is recorded, the running
  sum is taken in time order; the model's weights, allocated before, are not counted). It covers the KV cache, the
  activations, the press's scores and temporaries, including buffers that kernels allocate internally; it does not
  see allocator fragmentation, the Python heap, or (rarely) allocations made by OpenMP worker threads. The profiler
  needs a second prefill + decoding (so it cannot inflate the RSS measurement); ``--no-tensor-peak`` skips it. The
  same run gives the tensor peak of the decoding phase alone (``decode tensor peak``).
* ``KV peak``: the largest ``kvpress_like.cache_bytes(cache)`` seen right after any attention's cache update and
  before the press cuts that layer back (so the one full layer of the prefill is included); ``KV prefill``: the cache
  bytes after the prefill (compressed); ``KV end``: after the last decoding step. ``cache_bytes`` counts keys,
  values and the index metadata of compressed layers (valid masks, per-head lengths).
* ratios to the ``none`` configuration (no press, full cache), measured in the same invocation.

A configuration is ``none`` or a press name with optional keyword arguments: ``compactor``,
``compactor:allocator=head_adaptive`` (per-head budgets, stored as ragged layers), ``snapkv:window=32``;
``chunk_size=N`` is not a press argument but prefills in chunks of ``N`` tokens with ``kvpress_like.chunked_prefill``
(the context's last token is then fed as the first decoding step, as chunked prefill returns no logits).

Usage::

    python benchmarks/peak_memory.py                                   # 8192 tokens, 64 steps, ratio 0.5
    python benchmarks/peak_memory.py --length 512 --steps 8 --configs none knorm   # a quick check
    python benchmarks/peak_memory.py --context essay --ratio 0.75
    python benchmarks/peak_memory.py --configs none compactor compactor:chunk_size=1024 --length 16384

Memory does not depend on the machine's load the way times do, but the prefill and decode times printed alongside
do; run it alone for those.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import threading
import time
from contextlib import nullcontext

from common import context_ids, load_average, machine_line, parse_press, status_field

MIB = 2**20
DEFAULT_CONFIGS = ["none", "compactor", "snapkv", "knorm", "compactor:allocator=head_adaptive"]


# ----------------------------------------------------------------------------------------------------- memory probes
def rss_now() -> int:
    """Current resident set size in bytes."""
    try:
        return status_field("VmRSS")
    except (OSError, KeyError):
        import psutil

        return psutil.Process().memory_info().rss


def _file_rss() -> int | None:
    """File-backed resident bytes (``RssFile``), ``None`` where unavailable."""
    try:
        return status_field("RssFile")
    except (OSError, KeyError):
        return None


def ru_maxrss() -> int:
    """Lifetime peak RSS of this process in bytes (``ru_maxrss`` is in kB on Linux, bytes on macOS)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter ``VmHWM`` (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        status_field("VmHWM")
        return True
    except (OSError, KeyError):
        return False


class RssSampler:
    """Fallback peak-RSS probe: samples ``VmRSS`` every 2 ms from a daemon thread (may miss short spikes)."""

    def __init__(self):
        self.peak, self._stop = rss_now(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_now())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_now())


def tensor_peaks(prof) -> dict:
    """Peak running sum of CPU allocator bytes recorded by ``prof`` (``profile_memory=True``, sum taken from the
    profile's start), overall and within the ``record_function("decode")`` range (whose start value, the bytes live
    when decoding began, is returned too)."""
    events = prof.profiler.kineto_results.events()
    memory = sorted(((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"
                     and str(e.device_type()).endswith("CPU")), key=lambda pair: pair[0])
    decode = [(e.start_ns(), e.end_ns()) for e in events if e.name() == "decode"]
    begin, end = decode[0] if decode else (None, None)
    live = peak = 0
    decode_start = decode_peak = None
    for stamp, nbytes in memory:
        if begin is not None and decode_start is None and stamp >= begin:
            decode_start = decode_peak = live
        live += nbytes
        peak = max(peak, live)
        if decode_start is not None and stamp <= end:
            decode_peak = max(decode_peak, live)
    return {"tensor_peak": peak, "tensor_end": live, "decode_tensor_peak": decode_peak,
            "decode_tensor_start": decode_start, "memory_events": len(memory)}


# ----------------------------------------------------------------------------------------------------- the worker
def parse_config(spec: str) -> tuple[str | None, dict, int | None]:
    """``"name:key=value,key=value"`` -> ``(press name or None for "none", press kwargs, chunk size or None)``."""
    name, kwargs = parse_press(spec)
    chunk_size = kwargs.pop("chunk_size", None)
    if name == "none":
        if kwargs or chunk_size:
            raise SystemExit(f"configuration {spec!r}: 'none' takes no arguments")
        return None, {}, None
    return name, kwargs, chunk_size


def prefill_and_decode(model, p, chunk_size, ids, steps: int, annotate: bool = False):
    """Prefill ``ids`` with press ``p`` (``None``: no press), then decode ``steps`` greedy tokens with it installed.

    Returns ``(cache, kv bytes after prefill, prefill seconds, decode seconds)``. ``annotate`` wraps the two phases
    in profiler ranges named ``prefill`` and ``decode``.
    """
    import torch
    from transformers import DynamicCache

    import kvpress_like
    from kvpress_like.cache import CACHE_KWARG, cache_bytes

    def phase(name):
        return torch.profiler.record_function(name) if annotate else nullcontext()

    with torch.no_grad():
        start = time.perf_counter()
        with phase("prefill"):
            if chunk_size:
                cache = kvpress_like.chunked_prefill(model, p, ids[:, :-1], chunk_size=chunk_size)
                token = ids[:, -1:]
            else:
                cache = DynamicCache(config=model.config)
                with kvpress_like.press(model, p) if p is not None else nullcontext():
                    logits = model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1).logits
                token = logits[:, -1].argmax(-1, keepdim=True)
                del logits
        prefill_seconds = time.perf_counter() - start
        kv_prefill = cache_bytes(cache)
        start = time.perf_counter()
        with phase("decode"), kvpress_like.press(model, p) if p is not None else nullcontext():
            for _ in range(steps):
                logits = model(input_ids=token, **{CACHE_KWARG: cache}, use_cache=True).logits
                token = logits[:, -1].argmax(-1, keepdim=True)
                del logits
        decode_seconds = time.perf_counter() - start
    return cache, kv_prefill, prefill_seconds, decode_seconds


class KVProbe:
    """Largest ``cache_bytes`` right after each attention's cache update, before a press compresses that layer.

    Its forward hooks are registered before any press is installed, so they run before the press's own hooks.
    """

    def __init__(self, model):
        from kvpress_like.cache import cache_bytes, cache_in

        self.peak, self._cache = 0, None
        attentions = [layer.self_attn for layer in model.model.layers]

        def grab(module, args, kwargs):
            self._cache = cache_in(kwargs)

        def measure(module, args, output):
            if self._cache is not None:
                self.peak = max(self.peak, cache_bytes(self._cache))

        self.handles = [a.register_forward_pre_hook(grab, with_kwargs=True) for a in attentions]
        self.handles += [a.register_forward_hook(measure) for a in attentions]

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self._cache = None


def worker(spec: str, args) -> dict:
    """One configuration in this (fresh) process; returns its measurements."""
    import torch

    import kvpress_like
    from kvpress_like.cache import cache_bytes
    from kvpress_like.eval.model import full_cache_bytes, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    name, kwargs, chunk_size = parse_config(spec)
    p = kvpress_like.create_press(name, ratio=args.ratio, **kwargs) if name else None
    if chunk_size and p is None:
        raise SystemExit("chunk_size needs a press")
    model, tokenizer = load_model("default")
    gc.collect()
    after_load = rss_now()
    load_peak = ru_maxrss()
    ids = context_ids(args.context, args.length, model.config.vocab_size, tokenizer, args.seed)

    warm = ids[:, : min(256, args.length)]  # kernels, allocator pools, lazy imports of the press
    prefill_and_decode(model, p, min(chunk_size, 128) if chunk_size else None, warm, 2)
    gc.collect()
    probe = KVProbe(model)
    exact = reset_peak()
    before_run, file_before = rss_now(), _file_rss()
    with nullcontext() if exact else RssSampler() as sampler:
        cache, kv_prefill, prefill_s, decode_s = prefill_and_decode(model, p, chunk_size, ids, args.steps)
    peak_rss = status_field("VmHWM") if exact else sampler.peak
    probe.remove()
    result = {
        "config": spec, "after_load": after_load, "load_peak": load_peak, "before_run": before_run,
        "peak_rss": peak_rss, "peak_rss_exact": exact, "ru_maxrss": ru_maxrss(), "kv_peak": probe.peak,
        "file_rss_before": file_before, "file_rss_after": _file_rss(),
        "kv_prefill": kv_prefill, "kv_end": cache_bytes(cache), "prefill_s": prefill_s, "decode_s": decode_s,
        "full_kv": full_cache_bytes(model.config, ids.shape[1]), "tokens": ids.shape[1],
        "kept_tokens": cache.get_seq_length(),
    }
    del cache
    gc.collect()
    if args.tensor_peak:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            cache, *_ = prefill_and_decode(model, p, chunk_size, ids, args.steps, annotate=True)
            del cache
        result.update(tensor_peaks(prof))
    return result


# ----------------------------------------------------------------------------------------------------- the driver
def mib(value) -> str:
    return "–" if value is None else f"{value / MIB:.1f}"


def ratio(value, base) -> str:
    return "–" if value is None or not base else f"{value / base:.3f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Each configuration runs in a fresh subprocess; see the module docstring.")
    parser.add_argument("--length", type=int, default=8192, help="context tokens (default 8192)")
    parser.add_argument("--steps", type=int, default=64, help="greedy decoding steps (default 64)")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of the context's KV pairs removed")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                        help="'none' or press[:key=value,...] (default: none compactor snapkv knorm "
                             "compactor:allocator=head_adaptive)")
    parser.add_argument("--context", choices=("random", "essay"), default="random", help="context text")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-tensor-peak", dest="tensor_peak", action="store_false",
                        help="skip the profiled second run that measures the tensor peak")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return
    for spec in args.configs:
        parse_config(spec)  # fail early on a malformed configuration

    print(machine_line(args.threads), flush=True)
    print(f"model: embedded SmolLM2-135M-Instruct (float32, sdpa); context: {args.length} {args.context} tokens, "
          f"{args.steps} greedy decoding steps, ratio {args.ratio}; one fresh subprocess per configuration", flush=True)
    results = {}
    for spec in args.configs:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec, "--length", str(args.length),
               "--steps", str(args.steps), "--ratio", str(args.ratio), "--context", args.context,
               "--seed", str(args.seed)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if not args.tensor_peak:
            cmd.append("--no-tensor-peak")
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{spec}: failed (exit {proc.returncode}): {tail}", flush=True)
            continue
        results[spec] = r = json.loads(lines[-1][len("RESULT "):])
        r["load"] = load_average()
        print(f"{spec}: done in {time.perf_counter() - start:.0f} s (prefill {r['prefill_s']:.1f} s, decode "
              f"{r['decode_s']:.1f} s, load average {r['load']:.2f})", flush=True)
    if not results:
        return

    base = results.get("none")
    grow = {spec: r["peak_rss"] - r["before_run"] for spec, r in results.items()}
    print(f"\n## peak memory: {args.length} {args.context} tokens + {args.steps} decoding steps, ratio {args.ratio} "
          "(MiB; 'vs none' = this / the no-press run)\n")
    header = ("| configuration | peak RSS | RSS added | vs none | ru_maxrss | tensor peak | vs none "
              "| decode tensor peak | KV peak | KV prefill | KV end | vs none | load |")
    print(header)
    print("|---|" + "---:|" * (header.count("|") - 2))
    for spec, r in results.items():
        mark = "" if r["peak_rss_exact"] else "~"
        print(f"| {spec} | {mark}{mib(r['peak_rss'])} | {mark}{mib(grow[spec])} | "
              f"{ratio(grow[spec], grow.get('none'))} | {mib(r['ru_maxrss'])} | {mib(r.get('tensor_peak'))} | "
              f"{ratio(r.get('tensor_peak'), base and base.get('tensor_peak'))} | "
              f"{mib(r.get('decode_tensor_peak'))} | {mib(r['kv_peak'])} | {mib(r['kv_prefill'])} | "
              f"{mib(r['kv_end'])} | {ratio(r['kv_end'], base and base['kv_end'])} | {r['load']:.1f} |")
    print()
    for spec, r in results.items():
        dropped = (r["file_rss_before"] or 0) - (r["file_rss_after"] or 0)
        print(f"{spec}: RSS after model load {mib(r['after_load'])} MiB (load peak {mib(r['load_peak'])} MiB), at the "
              f"reset {mib(r['before_run'])} MiB; uncompressed cache of {r['tokens']} tokens {mib(r['full_kv'])} MiB"
              + (f"; WARNING: file-backed RSS fell by {mib(dropped)} MiB during the run (memory pressure), "
                 "RSS added is understated" if dropped > 16 * MIB else ""))
    if not all(r["peak_rss_exact"] for r in results.values()):
        print("~ = peak RSS sampled every 2 ms (the kernel's peak counter could not be reset), may miss short spikes.")
    print("peak RSS: the prefill + decoding alone (VmHWM reset after the warm-up); RSS added: peak RSS minus the RSS "
          "at that reset; ru_maxrss: getrusage at the end (the reset resets it too on Linux). tensor peak: bytes held "
          "by CPU tensors allocated during the run, from torch.profiler memory events (second run); decode tensor "
          "peak: same, within the decoding loop, counting the cache held when decoding began. KV: "
          "kvpress_like.cache_bytes (KV peak = before each layer's compression).")


if __name__ == "__main__":
    main()
