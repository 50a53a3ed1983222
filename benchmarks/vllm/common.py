"""Shared set-up of the vLLM scripts (run them with the vLLM venv's python; see setup_venv.sh).

vLLM 0.32 has no GGUF loader any more (its ``LoadConfig`` formats are safetensors / pt / tensorizer / ...), so the
embedded SmolLM2-135M-Instruct GGUF file is converted once by transformers (``load_default_model``, which saves a
safetensors copy with the tokenizer and chat template) and vLLM serves that directory offline. The copy lives in its
own cache directory (``KVPRESS_LIKE_CACHE`` below) because its stamp records the venv's transformers version: sharing
the main environment's directory would make the two environments re-convert the file in turn.
"""

from __future__ import annotations

import os
from pathlib import Path

VENV_CACHE = Path(os.environ.get("VIRTUAL_ENV", "/work/vllm-venv")) / "kvpress_like_cache"


def set_cpu_env(threads: int = 1, kv_space_gib: int = 1) -> None:
    """Environment for vLLM's CPU build on a shared 2-core machine; call before importing vllm.

    Args:
        threads: OpenMP threads of the worker (bound to cores ``0..threads-1``).
        kv_space_gib: ``VLLM_CPU_KVCACHE_SPACE``, the KV cache's size in GiB.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("KVPRESS_LIKE_CACHE", str(VENV_CACHE))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0" if threads == 1 else f"0-{threads - 1}"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_space_gib)


def model_dir() -> Path:
    """The directory of the converted embedded model (created on the first call, about a minute)."""
    from kvpress_like.eval.model import DEFAULT_GGUF_FILE, converted_model_dir, default_model_dir, load_default_model

    target = converted_model_dir(default_model_dir() / DEFAULT_GGUF_FILE, __import__("torch").float32)
    if not (target / "model.safetensors").is_file():
        load_default_model()
    return target


def niah_prompts(tokenizer, length: int, n: int, seed: int = 0) -> list[tuple[str, tuple[str, ...]]]:
    """``n`` single-needle prompts (chat template applied) of about ``length`` tokens, with their expected answers."""
    from kvpress_like.eval.tasks import generate_samples

    prompts = []
    for sample in generate_samples("niah_single_2", tokenizer, length, n, seed=seed):
        user = f"{sample.context}\n\n{sample.question}"
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
        prompts.append((text + sample.answer_prefix, sample.answers))
    return prompts
