"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, which puts this folder on the
import path). torch is imported lazily: ``peak_memory.py`` measures in fresh worker processes."""

from __future__ import annotations

import os
import platform


def load_average() -> float:
    """1-minute load average (NaN where unavailable): above the thread count, other processes compete for the cores."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def machine_line(threads: int | None = None) -> str:
    """One line naming the machine, the versions and torch's thread count (set to ``threads`` first if given)."""
    import torch
    import transformers

    import kvpress_like

    if threads:
        torch.set_num_threads(threads)
    return (f"machine: {platform.platform()} | {platform.processor() or platform.machine()} | {os.cpu_count()} CPUs | "
            f"python {platform.python_version()} | torch {torch.__version__} | transformers "
            f"{transformers.__version__} | kvpress-like {kvpress_like.__version__} | threads {torch.get_num_threads()} "
            f"| load average {load_average():.2f}")


def parse_press(spec: str) -> tuple[str, dict]:
    """``"name:key=value,key=value"`` -> ``(name, kwargs)``; values are Python literals, else strings."""
    from kvpress_like.cli import parse_press_args

    name, _, rest = spec.partition(":")
    try:
        return name, parse_press_args([item for item in rest.split(",") if item])
    except ValueError as error:
        raise SystemExit(f"press {spec!r}: {error}") from None


def context_ids(kind: str, length: int, vocab_size: int, tokenizer, seed: int):
    """``[1, length]`` context token ids: random (ids >= 100, no special tokens) or the start of the essays."""
    import torch

    if kind == "random":
        return torch.randint(100, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    from kvpress_like.eval.sample import haystack_text, truncate_to_tokens

    text = truncate_to_tokens(tokenizer, haystack_text(), length + 8)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :length]
    if ids.shape[1] < length:
        raise SystemExit(f"the essay text has only {ids.shape[1]} tokens, fewer than --length {length}")
    return ids


def status_field(name: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (Linux) in bytes."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(name)
