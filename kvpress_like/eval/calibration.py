"""Measuring and fitting context-calibrated compression (:mod:`kvpress_like.calibration`) on generated tasks.

``kvpress-like calibrate`` calls :func:`calibrate`; its result is the calibration file that ``ratio="auto"`` reads
(:func:`kvpress_like.calibration.load_calibration`). The samples are generated with seeds from
:data:`CALIBRATION_SEED`, disjoint from the evaluation seeds (small numbers, 0 by default).
"""

from __future__ import annotations

import copy
import platform
import time

import torch
from transformers import DynamicCache

from ..cache import CACHE_KWARG, CompressedLayer, kept_fraction
from ..calibration import FORMAT, ScoreRecorder, fit_quality_model, model_fingerprint, recorded_scores
from ..context import press as press_context
from ..pipeline import encode_prompt
from ..press import Press
from .fidelity import token_nll
from .tasks import generate_samples

CALIBRATION_SEED = 1_000_003  # evaluation uses small seeds (0 by default); calibration samples never overlap them
CALIBRATION_TASKS = ("niah_single_1", "niah_single_2", "niah_multikey_1", "niah_multivalue", "vt", "fwe", "qa_1")
RETENTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
QUALITY_PROXY = "NLL(answer | full cache) / NLL(answer | compressed cache)"


def answer_ids_of(tokenizer, answers) -> torch.Tensor:
    """``[1, a]``: the tokens of the reference answer(s) as the model would write them (``" a, b"``)."""
    return tokenizer(" " + ", ".join(answers), add_special_tokens=False, return_tensors="pt")["input_ids"]


def stack_padded(caches) -> DynamicCache:
    """One cache whose batch rows are ``caches``: one-row caches of the same context, each layer a plain dense layer
    or a :class:`~kvpress_like.cache.CompressedLayer`. Each layer's rows are padded to the longest with invalid
    slots, which attention under a press (or the registered ``kvpress_like_*`` attention) never reads.

    Raises:
        ValueError: the rows of a layer have seen different numbers of tokens, or a cache has more than one row.
    """
    out = DynamicCache()
    out.layers = []
    for i in range(len(caches[0].layers)):
        layers = [c.layers[i] for c in caches]
        if any(layer.keys.shape[0] != 1 for layer in layers):
            raise ValueError("stack_padded stacks one-row caches")
        longest = max(layer.keys.shape[2] for layer in layers)
        keys, values, valid, seen = [], [], [], set()
        for layer in layers:
            k, v = layer.keys, layer.values
            compressed = isinstance(layer, CompressedLayer)
            mask = layer.valid if compressed else torch.ones(1, k.shape[2], dtype=torch.bool, device=k.device)
            seen.add(layer.logical_length if compressed else k.shape[2])
            pad = longest - k.shape[2]
            keys.append(torch.nn.functional.pad(k, (0, 0, 0, pad)))
            values.append(torch.nn.functional.pad(v, (0, 0, 0, pad)))
            valid.append(torch.nn.functional.pad(mask, (0, pad), value=False))
        if len(seen) != 1:
            raise ValueError(f"rows of layer {i} have seen different numbers of tokens: {sorted(seen)}")
        out.layers.append(CompressedLayer(torch.cat(keys), torch.cat(values), torch.cat(valid), seen.pop()))
    return out


def answer_nlls(model, cache, prompt_ids: torch.Tensor, answer_ids: torch.Tensor) -> list[float]:
    """Mean NLL of ``answer_ids`` ``[1, a]`` teacher-forced after ``prompt_ids`` ``[1, q]``, for every batch row of
    ``cache`` (rows: the same context, e.g. compressed in different ways by :func:`stack_padded`). The cache is left
    as it was (the forward runs on a copy). Run it inside ``press(...)`` for padded or ragged caches."""
    device = next(model.parameters()).device
    rows = cache.layers[0].keys.shape[0]
    ids = torch.cat([prompt_ids, answer_ids], dim=1).to(device).expand(rows, -1)
    logits = model(input_ids=ids, **{CACHE_KWARG: copy.deepcopy(cache)}, use_cache=True).logits
    start, targets = prompt_ids.shape[1] - 1, answer_ids[0].to(device)
    return [float(token_nll(logits[row, start:-1], targets).mean()) for row in range(rows)]


def calibration_points(model, tokenizer, presses: list[Press], lengths, samples: int, seed: int = CALIBRATION_SEED,
                       tasks=CALIBRATION_TASKS, retentions=RETENTIONS, progress: bool = True) -> dict[str, list]:
    """Measured quality of each press at every retention on generated calibration samples.

    For each sample one prefill records every press's scores in every layer and the context's NLL; the full cache is
    then compressed at each retention from those scores (a prefill does not depend on the ratio: layers are
    compressed after their attention), and the answer's NLL is measured on it. Quality is ``QUALITY_PROXY``.

    Returns:
        Per press name, one dict per (sample, retention): ``task``, ``length``, ``index``, ``retention``,
        ``kept_fraction``, ``quality``, ``nll_full``, ``nll_press`` and the context features of
        :meth:`~kvpress_like.calibration.ScoreRecord.features` (``context_nll``, ``log_length``, score
        statistics).
    """
    recorder = ScoreRecorder.of({p.name: p for p in presses})
    device = next(model.parameters()).device
    work = [(task, length, i, s) for length in lengths for task in tasks
            for i, s in enumerate(generate_samples(task, tokenizer, length, samples, seed=seed))]
    try:
        from tqdm.auto import tqdm

        work = tqdm(work, desc="calibrate", unit="sample", disable=not progress)
    except ImportError:
        pass
    points = {name: [] for name in recorder.labels}
    with torch.no_grad(), press_context(model, recorder):
        for task, length, index, sample in work:
            context_ids, suffix_ids = encode_prompt(tokenizer, sample.context, sample.question, sample.answer_prefix)
            context_ids, suffix_ids = context_ids.to(device), suffix_ids.to(device)
            answer_ids = answer_ids_of(tokenizer, sample.answers).to(device)
            full = DynamicCache(config=model.config)
            model(input_ids=context_ids, **{CACHE_KWARG: full}, use_cache=True, logits_to_keep=1)
            record = recorded_scores(full)  # what this prefill recorded (left on its cache, not on the recorder)
            for name in record.labels:  # one batched forward per press: row 0 full, then every retention
                caches = [copy.deepcopy(full)]
                for retention in retentions:
                    caches.append(copy.deepcopy(full))
                    record.compress_at(name, caches[-1], 1.0 - retention)
                nll_full, *nlls = answer_nlls(model, stack_padded(caches), suffix_ids, answer_ids)
                features = {k: _rounded(v) for k, v in record.features(name, context_ids.shape[1]).items()}
                for retention, cache, nll_press in zip(retentions, caches[1:], nlls):
                    points[name].append({"task": task, "length": length, "index": index, "retention": retention,
                                         "kept_fraction": _rounded(kept_fraction(cache)),
                                         "nll_full": _rounded(nll_full), "nll_press": _rounded(nll_press),
                                         "quality": _rounded(nll_full / max(nll_press, 1e-6)), **features})
    return points


def _rounded(x: float) -> float:
    return float(f"{x:.6g}")


def calibrate(model, tokenizer, press_names, lengths=(1024, 2048), samples: int = 3, seed: int = CALIBRATION_SEED,
              over_weight: float = 4.0, model_name: str = "", command: str = "", tasks=None,
              progress: bool = True) -> dict:
    """Fit the quality model of each press on generated calibration tasks.

    Returns:
        The calibration file's content (:func:`kvpress_like.calibration.load_calibration` reads it): ``format``,
        ``model`` (``name``, ``weights_sha256``), ``fit`` (the settings, ``command``, the environment and the
        time taken) and, per press, ``alpha``, ``beta``, the press's configuration and the measured ``points``.
    """
    import transformers

    from .. import __version__
    from ..registry import create_press

    start = time.perf_counter()
    tasks = CALIBRATION_TASKS if tasks is None else tuple(tasks)
    presses = [create_press(name) for name in press_names]
    points = calibration_points(model, tokenizer, presses, lengths, samples, seed, tasks=tasks, progress=progress)
    result = {"format": FORMAT,
              "model": {"name": model_name, "weights_sha256": model_fingerprint(model)},
              "fit": {"command": command, "lengths": list(lengths), "samples_per_task": samples, "seed": seed,
                      "tasks": list(tasks), "retentions": list(RETENTIONS), "over_weight": over_weight,
                      "quality_proxy": QUALITY_PROXY, "kvpress_like": __version__, "torch": torch.__version__,
                      "transformers": transformers.__version__, "machine": platform.machine(),
                      "threads": torch.get_num_threads()},
              "presses": {}}
    for p in presses:
        measured = points[p.name]
        fitted = fit_quality_model([q["context_nll"] for q in measured], [q["kept_fraction"] for q in measured],
                                   [q["quality"] for q in measured], over_weight=over_weight)
        result["presses"][p.name] = {"alpha": fitted.alpha, "beta": fitted.beta, "press": p.to_dict(),
                                     "points": measured}
    result["fit"]["seconds"] = round(time.perf_counter() - start, 1)
    return result
