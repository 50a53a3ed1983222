"""The evaluation grid behind ``kvpress-like eval``: presses × ratios × tasks × lengths × samples on one model.

Every sample of the grid is one *cell*. A cell prefills its prompt's compressed part under the press, then answers
greedily on the compressed cache and is scored as RULER scores the task (:mod:`kvpress_like.eval.metrics`). The
full cache (press ``"full"``, ratio 0) is always evaluated on the same samples, as the reference.

Two modes:

* ``query_agnostic`` (default): only the context is compressed; the question comes after compression.
* ``query_aware``: the question is part of the compressed prefill; only the assistant's answer prefix follows.

The task ``fidelity`` is the dense metric of :mod:`kvpress_like.eval.fidelity`: the NLL of a continuation that
copies a span from deep inside the context, and the KL divergence of next-token distributions between the full and
the compressed cache (no answer parsing).

Results are appended to ``results.jsonl`` (one JSON object per cell) as they come; a cell already in the file is
skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from ..cache import CACHE_KWARG, kept_fraction, prefill
from ..checks import check_int
from ..context import press as press_context
from ..pipeline import answer_on_cache, encode_prompt
from ..press import Press

FULL = "full"
MODES = ("query_agnostic", "query_aware")
FIDELITY = "fidelity"
RESULTS_FILE = "results.jsonl"
PLOT_FILE = "score_vs_kept.png"


@dataclass(frozen=True)
class PressSpec:
    """A press of the grid: a registry name plus parameters, written ``name`` or ``name:key=value,key=value``."""

    label: str
    name: str
    params: tuple[tuple[str, object], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> PressSpec:
        from ..registry import parse_press_params

        name, _, rest = spec.partition(":")
        try:
            params = parse_press_params([item for item in rest.split(",") if item]) if rest else {}
        except ValueError as error:
            raise ValueError(f"press spec {spec!r}: a parameter {error}") from error
        return cls(spec, name, tuple(sorted(params.items())))

    def create(self, ratio: float) -> Press:
        from ..registry import create_press

        return create_press(self.name, ratio=ratio, **dict(self.params))


def cell_key(model: str, press: str, ratio: float, task: str, length: int, mode: str, index: int, seed: int) -> str:
    """The identity of one cell in ``results.jsonl`` (what resuming compares)."""
    return json.dumps([model, press, round(float(ratio), 6), task, length, mode, index, seed])


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of ``path``, one per line (none if it does not exist); a torn line (an interrupted write) is
    ignored."""
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def load_results(path: Path) -> dict[str, dict]:
    """Records of ``path`` (JSON lines) by :func:`cell_key`; a torn last line (an interrupted write) is ignored."""
    return {record["key"]: record for record in read_jsonl(path)}


def evaluate_task_sample(model, tokenizer, p: Press | None, sample, mode: str, max_new_tokens: int | None) -> dict:
    """Answer one task sample on a cache compressed by ``p`` (``None``: the full cache) and score the answer.

    Returns:
        ``score`` (in [0, 1]), ``prediction``, ``kept_fraction`` and ``context_tokens`` (tokens prefilled).
    """
    from .metrics import score

    context_ids, suffix_ids = split_prompt(tokenizer, sample, mode, next(model.parameters()).device)
    budget = max_new_tokens or sample.max_new_tokens
    with torch.no_grad(), press_context(model, p) if p is not None else nullcontext():
        cache = prefill(model, context_ids)
        kept = kept_fraction(cache)
        answer_ids = answer_on_cache(model, cache, context_ids, suffix_ids, budget)
    prediction = tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
    return {"score": score(sample.metric, prediction, sample.answers), "prediction": prediction,
            "answers": list(sample.answers), "kept_fraction": kept, "context_tokens": context_ids.shape[1]}


def evaluate_fidelity_sample(model, tokenizer, p: Press | None, sample) -> dict:
    """NLL of the copied span with the full and the compressed cache, and their next-token KL divergence."""
    from .fidelity import fidelity

    if p is None:
        return {"score": None, "nll_full": None, "nll_press": None, "kl": 0.0, "kept_fraction": 1.0}
    result = fidelity(model, tokenizer, p, sample)
    return {"score": None, "nll_full": result.nll_full, "nll_press": result.nll_press, "kl": result.kl,
            "kept_fraction": result.kept_fraction}


class SharedPrefill:
    """Evaluates every pending cell of one sample from a single prefill where it can.

    A prefill does not depend on the ratio (layers are compressed after their own attention), so one prefill of the
    sample's compressed part records every press's scores in every layer (see
    :class:`kvpress_like.calibration.ScoreRecorder`; the scores are left on the prefilled cache, not on the recorder),
    then each (press, ratio) cell compresses a copy of the full cache from those scores: the same kept entries as its
    own prefill, at a fraction of the cost. Presses that select
    by themselves (ChunkKV) get their own prefill per cell. A press whose scores depend on the ratio (Compactor with
    ``blending=None``) records one set of scores per ratio.
    """

    def __init__(self, model, specs: list[PressSpec], ratios: Iterable[float] = ()):
        from ..calibration import ScoreRecorder

        self.model = model
        presses = {}
        for spec in specs:
            p = spec.create(0.0)
            if not p.is_plain_scorer:  # it selects by itself: its own prefill per cell
                continue
            if spec.create(0.5).score_depends_on_ratio:
                presses.update({_scorer_key(spec.label, r): spec.create(r) for r in ratios if r > 0})
            else:
                presses[spec.label] = p
        self.recorder = ScoreRecorder.of(presses) if presses else None

    def _shares(self, label: str, ratio: float) -> bool:
        labels = self.recorder.labels if self.recorder is not None else ()
        return label == FULL or label in labels or _scorer_key(label, ratio) in labels

    def cache_for(self, full, label: str, ratio: float):
        """A copy of the ``full`` cache prefilled under :attr:`recorder`, compressed by press ``label`` at ``ratio``
        from the scores recorded on it (``full``: uncompressed)."""
        import copy

        from ..calibration import recorded_scores

        cache = copy.deepcopy(full)
        if label != FULL and ratio > 0:
            record = recorded_scores(full)
            record.compress_at(label if label in record.labels else _scorer_key(label, ratio), cache, ratio)
        return cache

    def evaluate(self, tokenizer, task: str, sample, pending, mode: str, max_new_tokens: int | None):
        """``[((label, ratio), (result, seconds)), ...]`` for the ``pending`` ``(label, ratio, spec)`` cells."""
        shared = [c for c in pending if self.recorder is not None and self._shares(c[0], c[1])]
        out = []
        for label, ratio, spec in pending:
            if (label, ratio, spec) in shared:
                continue
            start = time.perf_counter()
            p = spec.create(ratio) if ratio > 0 else None
            if task == FIDELITY:
                result = evaluate_fidelity_sample(self.model, tokenizer, p, sample)
            else:
                result = evaluate_task_sample(self.model, tokenizer, p, sample, mode, max_new_tokens)
            out.append(((label, ratio), (result, time.perf_counter() - start)))
        if shared:
            out += self._evaluate_shared(tokenizer, task, sample, shared, mode, max_new_tokens)
        return out

    def _evaluate_shared(self, tokenizer, task, sample, cells, mode, max_new_tokens):
        from .fidelity import compare, encode

        model, out = self.model, []
        device = next(model.parameters()).device
        start = time.perf_counter()
        if task == FIDELITY:
            context_ids, prompt_ids, target_ids = (t.to(device) for t in encode(tokenizer, sample))
            follow = torch.cat([prompt_ids, target_ids], dim=1)
        else:
            context_ids, suffix_ids = split_prompt(tokenizer, sample, mode, device)
        with torch.no_grad(), press_context(model, self.recorder):
            full = prefill(model, context_ids)
            if task == FIDELITY:
                full_logits = model(input_ids=follow, **{CACHE_KWARG: self.cache_for(full, FULL, 0.0)}).logits[0]
            shared_seconds = (time.perf_counter() - start) / len(cells)  # the prefill's cost, split over the cells
            if task != FIDELITY:
                return out + self._answer_cells(tokenizer, sample, cells, full, context_ids, suffix_ids,
                                                max_new_tokens or sample.max_new_tokens, shared_seconds)
            for label, ratio, _ in cells:
                start = time.perf_counter()
                cache = self.cache_for(full, label, ratio)
                kept = kept_fraction(cache)
                if label == FULL:
                    result = {"score": None, "nll_full": None, "nll_press": None, "kl": 0.0, "kept_fraction": 1.0}
                else:
                    logits = model(input_ids=follow, **{CACHE_KWARG: cache}).logits[0]
                    fid = compare(full_logits, logits, prompt_ids.shape[1], target_ids, kept)
                    result = {"score": None, "nll_full": fid.nll_full, "nll_press": fid.nll_press, "kl": fid.kl,
                              "kept_fraction": kept}
                out.append(((label, ratio), (result, time.perf_counter() - start + shared_seconds)))
        return out


    def _answer_cells(self, tokenizer, sample, cells, full, context_ids, suffix_ids, budget, shared_seconds):
        """Greedy answers of task ``cells`` on copies of ``full``; cells whose caches stack (every layer a dense
        compressed layer of the same shape) are decoded together as the rows of one batch, which gives each row the
        answer it gets alone (greedy decoding; rows do not interact)."""
        from .metrics import score

        caches = [self.cache_for(full, label, ratio) for label, ratio, _ in cells]
        out = [None] * len(cells)
        for group in stackable_groups(caches):
            start = time.perf_counter()
            kept = [kept_fraction(caches[i]) for i in group]
            if len(group) == 1:
                answers = [answer_on_cache(self.model, caches[group[0]], context_ids, suffix_ids, budget)]
            else:
                answers = answer_rows(self.model, stack_caches([caches[i] for i in group]), context_ids, suffix_ids,
                                      budget)
            seconds = (time.perf_counter() - start) / len(group) + shared_seconds
            for i, answer_ids, fraction in zip(group, answers, kept):
                prediction = tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
                result = {"score": score(sample.metric, prediction, sample.answers), "prediction": prediction,
                          "answers": list(sample.answers), "kept_fraction": fraction,
                          "context_tokens": context_ids.shape[1]}
                out[i] = ((cells[i][0], cells[i][1]), (result, seconds))
        return out


def stackable_groups(caches) -> list[list[int]]:
    """Indices of ``caches`` grouped so that each group stacks into one batch (:func:`stack_caches`): every layer a
    one-row dense compressed layer, the same shapes and lengths across the group. Other caches form groups of one."""
    groups: dict = {}
    for i, cache in enumerate(caches):
        keys = tuple(layer.row_stack_key() if hasattr(layer, "row_stack_key") else None for layer in cache.layers)
        groups.setdefault(keys if None not in keys else ("alone", i), []).append(i)
    return list(groups.values())


def stack_caches(caches) -> DynamicCache:
    """One cache whose batch rows are the rows of ``caches`` (a group of :func:`stackable_groups`)."""
    out = DynamicCache()
    out.layers = [type(layers[0]).stack_rows(list(layers)) for layers in zip(*(c.layers for c in caches))]
    return out


def answer_rows(model, cache, context_ids: torch.Tensor, suffix_ids: torch.Tensor, budget: int) -> list[torch.Tensor]:
    """Greedy answers ``[n_i]`` to ``suffix_ids`` ``[1, q]`` for every row of ``cache`` (each row holding
    ``context_ids`` ``[1, S]``, compressed its own way), decoded as one batch; each answer ends at its first end
    token, as decoding that row alone would."""
    rows = cache.layers[0].keys.shape[0]
    prompt = torch.cat([context_ids, suffix_ids.to(context_ids.device)], dim=1).expand(rows, -1)
    output = model.generate(prompt, attention_mask=torch.ones_like(prompt), **{CACHE_KWARG: cache},
                            max_new_tokens=budget, do_sample=False)[:, prompt.shape[1]:]
    stop = model.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, list) else [stop])
    answers = []
    for row in output:
        ends = [i for i, token in enumerate(row.tolist()) if token in stop]
        answers.append(row[: ends[0] + 1] if ends else row)
    return answers


def _scorer_key(label: str, ratio: float) -> str:
    """Name of the recorded scores of press ``label`` at ``ratio`` (for presses whose scores depend on it)."""
    return f"{label}@{ratio:g}"


def split_prompt(tokenizer, sample, mode: str, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(compressed part, rest)`` of a task sample's prompt in ``mode`` (one of ``MODES``), each ``[1, n]``."""
    context_ids, suffix_ids = encode_prompt(tokenizer, sample.context, sample.question, sample.answer_prefix)
    if mode == "query_aware":  # the question joins the compressed part; only the last prompt token follows
        context_ids, suffix_ids = torch.cat([context_ids, suffix_ids[:, :-1]], dim=1), suffix_ids[:, -1:]
    return context_ids.to(device), suffix_ids.to(device)


def check_grid(presses, ratios, tasks, lengths, samples, mode) -> list[PressSpec]:
    """Check an evaluation grid before any model is loaded; returns the parsed press specs.

    Raises:
        ValueError: an unknown press or task, a press that cannot be built with its parameters, a ratio outside
            [0, 1), a length below 64, a non-positive sample count or an unknown mode.
    """
    from ..registry import list_presses
    from .tasks import TASKS

    specs = [PressSpec.parse(spec) for spec in presses]
    known = list_presses()
    unknown = [spec.name for spec in specs if spec.name not in known and spec.name != FULL]
    if unknown:
        raise ValueError(f"unknown press(es) {unknown}; registered: {', '.join(sorted(known))}")
    for spec in specs:
        spec.create(0.5)  # bad parameters fail now, not after hours of evaluation
    if not ratios or any(not 0.0 <= r < 1.0 for r in ratios):
        raise ValueError(f"ratios must be a non-empty list of numbers in [0, 1); got {list(ratios)}")
    bad = [t for t in tasks if t not in TASKS and t != FIDELITY]
    if not tasks or bad:
        raise ValueError(f"unknown task(s) {bad}; known: {', '.join((*TASKS, FIDELITY))}")
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 64 for n in lengths):
        raise ValueError(f"lengths must be ints >= 64 (tokens); got {list(lengths)}")
    check_int("samples", samples, minimum=1)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    return specs


def _samples(task: str, tokenizer, length: int, n: int, seed: int) -> list:
    if task == FIDELITY:
        from .fidelity import copy_sample

        depths = [0.1 + 0.8 * (i + 0.5) / n for i in range(n)]  # spread the copied span over the context
        return [copy_sample(tokenizer, length, depth=d, seed=seed + i) for i, d in enumerate(depths)]
    from .tasks import generate_samples

    return generate_samples(task, tokenizer, length, n, seed=seed)


def run_eval(
    model,
    tokenizer,
    *,
    presses: Iterable[str],
    ratios: Iterable[float],
    tasks: Iterable[str],
    lengths: Iterable[int],
    samples: int,
    output_dir: str | Path,
    mode: str = "query_agnostic",
    seed: int = 0,
    model_name: str = "default",
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Evaluate every cell of the grid not yet in ``output_dir/results.jsonl`` and return all the grid's records.

    Args:
        model: a supported causal LM in eval mode.
        tokenizer: its tokenizer (lengths are counted in its tokens).
        presses: press specs (``"compactor"``, ``"snapkv:window=32"``, ``"compactor:allocator=head_adaptive"``).
        ratios: compression ratios in [0, 1).
        tasks: names from :data:`kvpress_like.eval.tasks.TASKS`, or ``"fidelity"``.
        lengths: prompt lengths in tokens.
        samples: samples per task and length.
        output_dir: where ``results.jsonl`` lives (created if needed).
        mode: ``"query_agnostic"`` or ``"query_aware"``.
        seed: seed of the generated samples.
        model_name: recorded with each cell (cells of another model are not reused).
        max_new_tokens: decoding budget; ``None`` uses each task's own.
        progress: show a progress bar over the grid (stderr).

    Raises:
        ValueError: an unknown press, task or mode, a bad ratio, length or sample count.
    """
    presses, ratios, tasks, lengths = list(presses), [float(r) for r in ratios], list(tasks), list(lengths)
    specs = check_grid(presses, ratios, tasks, lengths, samples, mode)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    path = output / RESULTS_FILE
    done = load_results(path)
    configs = [(FULL, 0.0, None)] + [(s.label, r, s) for s in specs for r in ratios]
    shared = SharedPrefill(model, specs, ratios)
    total = len(lengths) * len(tasks) * samples * len(configs)
    bar = _progress_bar(total, progress)
    records = []
    try:
        with path.open("a", encoding="utf-8") as sink:
            for length in lengths:
                for task in tasks:
                    task_samples = None
                    for index in range(samples):
                        keys = {c[:2]: cell_key(model_name, *c[:2], task, length, mode, index, seed) for c in configs}
                        for label, ratio, _ in configs:
                            if keys[label, ratio] in done:
                                records.append(done[keys[label, ratio]])
                                bar.update(1)
                        pending = [c for c in configs if keys[c[:2]] not in done]
                        if not pending:
                            continue
                        if task_samples is None:  # generated only when a cell of this task needs running
                            task_samples = _samples(task, tokenizer, length, samples, seed)
                        bar.set_postfix_str(f"{task} {length} #{index}", refresh=False)
                        cells = shared.evaluate(tokenizer, task, task_samples[index], pending, mode, max_new_tokens)
                        for (label, ratio), (result, seconds) in cells:
                            key = keys[label, ratio]
                            record = {"key": key, "model": model_name, "press": label, "ratio": ratio, "task": task,
                                      "length": length, "mode": mode, "index": index, "seed": seed, **result,
                                      "seconds": round(seconds, 3)}
                            sink.write(json.dumps(record) + "\n")
                            sink.flush()
                            done[key] = record
                            records.append(record)
                            bar.update(1)
    finally:
        bar.close()
    return records


def _progress_bar(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with the [eval] extra
        return _NoBar()
    return tqdm(total=total, desc="eval", unit="cell", disable=not enabled)


class _NoBar:
    def update(self, n=1): ...

    def set_postfix_str(self, s, refresh=True): ...

    def close(self): ...


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


def summarize(records: list[dict], by_task: bool = True) -> list[dict]:
    """One row per (press, ratio, length, task) (``by_task=False``: all tasks together, ``task`` ``"all"``).

    Returns:
        Dicts with ``press``, ``ratio``, ``length``, ``task``, ``score`` (mean over task cells, in [0, 1]; NaN
        without task cells), ``ci_low``/``ci_high`` (its 95 % interval: Wilson when every score is 0 or 1, else a
        bootstrap), ``relative`` (score / the full cache's on the same cells), ``kept_fraction``, ``kl`` and
        ``delta_nll`` (fidelity cells, NaN without), ``cells``.
    """
    from .stats import mean_interval

    groups = defaultdict(list)
    for record in records:
        task = record["task"] if by_task else "all"
        groups[(record["press"], record["ratio"], record["length"], task)].append(record)
    rows = []
    for (label, ratio, length, task), cells in groups.items():
        tasks = [c for c in cells if c["task"] != FIDELITY]
        fid = [c for c in cells if c["task"] == FIDELITY and c.get("nll_press") is not None]
        pairs = {(c["task"], c["index"]) for c in tasks}
        full_score = _mean(c["score"] for c in groups.get((FULL, 0.0, length, task), [])
                           if (c["task"], c["index"]) in pairs)
        score = _mean(c["score"] for c in tasks)
        low, high = mean_interval([c["score"] for c in tasks]) if tasks else (math.nan, math.nan)
        rows.append({
            "press": label, "ratio": ratio, "length": length, "task": task, "score": score, "ci_low": low,
            "ci_high": high, "relative": score / full_score if full_score and not math.isnan(full_score) else math.nan,
            "kept_fraction": _mean(c["kept_fraction"] for c in cells),
            "kl": _mean(c["kl"] for c in fid) if fid else (0.0 if label == FULL else math.nan),
            "delta_nll": _mean(c["nll_press"] - c["nll_full"] for c in fid) if fid else
            (0.0 if label == FULL else math.nan),
            "cells": len(cells),
        })
    rows.sort(key=lambda row: (row["length"], row["task"], row["press"] != FULL, row["press"], row["ratio"]))
    return rows


def _cell(value, fmt: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def format_table(rows: list[dict]) -> str:
    """A markdown table of :func:`summarize`'s rows. The KL and ΔNLL columns (next-token KL divergence and answer
    NLL change against the full cache) appear only when some row has ``fidelity`` cells."""
    fidelity = any(row["press"] != FULL and not math.isnan(row["kl"]) for row in rows)
    extra = " KL | ΔNLL |" if fidelity else ""
    lines = ["| length | task | press | ratio | kept | score | 95 % CI | vs full |" + extra + " n |",
             "|---:|---|---|---:|---:|---:|---|---:|" + ("---:|---:|" if fidelity else "") + "---:|"]
    for row in rows:
        ci = f"[{_cell(100 * row['ci_low'], '.1f')}, {_cell(100 * row['ci_high'], '.1f')}]"
        if math.isnan(row["ci_low"]):
            ci = "–"
        line = (f"| {row['length']} | {row['task']} | {row['press']} | {row['ratio']:g} "
                f"| {_cell(row['kept_fraction'], '.3f')} | {_cell(100 * row['score'], '.1f')} | {ci} "
                f"| {_cell(100 * row['relative'], '.0f')}% |")
        if fidelity:
            line += f" {_cell(row['kl'], '.3f')} | {_cell(row['delta_nll'], '+.3f')} |"
        lines.append(line + f" {row['cells']} |")
    return "\n".join(lines)


def paired_rows(records: list[dict], reference: str) -> list[dict]:
    """Each press's score minus ``reference``'s on the same samples, per length, task and ratio.

    The reference is taken at the same ratio (or at ratio 0 when it is the full cache). Returns dicts with ``press``,
    ``ratio``, ``length``, ``task`` and the fields of :class:`~kvpress_like.eval.stats.PairedDifference`.
    """
    from .stats import paired_difference

    scores = defaultdict(dict)
    for r in records:
        if r["task"] != FIDELITY and r.get("score") is not None:
            scores[(r["press"], r["ratio"], r["length"], r["task"])][r["index"]] = r["score"]
    rows = []
    for (label, ratio, length, task), mine in sorted(scores.items()):
        if label in (reference, FULL):
            continue
        theirs = scores.get((reference, 0.0 if reference == FULL else ratio, length, task), {})
        shared = sorted(set(mine) & set(theirs))
        if shared:
            diff = paired_difference([mine[i] for i in shared], [theirs[i] for i in shared])
            rows.append({"press": label, "ratio": ratio, "length": length, "task": task, **vars(diff)})
    return rows


def paired_table(records: list[dict], reference: str) -> str:
    """A markdown table of :func:`paired_rows`: differences in points with 95 % bootstrap intervals."""
    lines = [f"| length | task | press | ratio | minus {reference} (points) | 95 % CI | only this | only ref | n |",
             "|---:|---|---|---:|---:|---|---:|---:|---:|"]
    for row in paired_rows(records, reference):
        lines.append(f"| {row['length']} | {row['task']} | {row['press']} | {row['ratio']:g} "
                     f"| {100 * row['mean']:+.1f} | [{100 * row['low']:+.1f}, {100 * row['high']:+.1f}] "
                     f"| {row['a_only']} | {row['b_only']} | {row['n']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str | Path) -> Path:
    """Save a PNG of task score (and KL, when fidelity cells exist) versus kept fraction, one line per press and
    length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_kl = any(not math.isnan(r["kl"]) and r["press"] != FULL for r in rows)
    fig, axes = plt.subplots(1, 2 if has_kl else 1, figsize=(12 if has_kl else 7, 4.5), squeeze=False)
    lengths = sorted({r["length"] for r in rows})
    markers = "os^vD<>pXh*"
    for number, label in enumerate(sorted({r["press"] for r in rows if r["press"] != FULL})):
        style = {"marker": markers[number % len(markers)], "linestyle": "-" if number < 10 else "--"}
        for length in lengths:
            points = sorted((r for r in rows if r["press"] in (label, FULL) and r["length"] == length),
                            key=lambda r: r["kept_fraction"])
            name = label if len(lengths) == 1 else f"{label} ({length})"
            for ax, metric, scale in ((axes[0][0], "score", 100),) + (((axes[0][1], "kl", 1),) if has_kl else ()):
                shown = [p for p in points if not math.isnan(p[metric])]
                xs = [p["kept_fraction"] for p in shown]
                ys = [scale * p[metric] for p in shown]
                if xs and metric == "score":  # 95 % interval as error bars
                    yerr = [[max(0.0, y - scale * p["ci_low"]) for y, p in zip(ys, shown)],  # 0, not -1e-15, at 100 %
                            [max(0.0, scale * p["ci_high"] - y) for y, p in zip(ys, shown)]]
                    ax.errorbar(xs, ys, yerr=yerr, label=name, capsize=3, **style)
                elif xs:
                    ax.plot(xs, ys, label=name, **style)
    axes[0][0].set(xlabel="kept fraction of the context's KV pairs", ylabel="score (%)",
                   title="task score vs kept fraction (bars: 95 % interval)")
    if has_kl:
        axes[0][1].set(xlabel="kept fraction of the context's KV pairs", ylabel="KL(full ‖ press), nats",
                       title="fidelity: next-token KL vs kept fraction")
    for ax in axes[0]:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
