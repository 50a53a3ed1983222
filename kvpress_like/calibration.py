"""Context-calibrated compression: choose, for each context, the largest compression that keeps a target quality.

From "Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage Scores" (Chari & Van Durme,
arXiv 2507.08143), the section on context-calibrated compression. Instead of a fixed ratio the user states the
fraction of full-cache quality to keep (``quality``, τ); the press measures a cheap statistic of the context during
the prefill, predicts how quality falls with retention for that context, and keeps the smallest retention that is
predicted to stay above τ.

The quality model, per press, with retention r (kept fraction) and the context's mean per-token negative
log-likelihood ``nll(c)``::

    b = alpha * nll(c) + beta
    f(r, c) = (exp(r * b) - 1) / (exp(b) - 1)          # f(0) = 0, f(1) = 1; b -> 0 gives f = r
    r*(tau, c) = log(1 + tau * (exp(b) - 1)) / b      # the smallest r with f(r, c) >= tau

``(alpha, beta)`` are fitted per press on calibration contexts by minimising an asymmetric squared error between
``f`` and the measured quality, with over-estimates of quality weighted ``over_weight`` times more (an over-estimate
makes the press compress too much). The measured quality of a context at retention r is the paper's NLL ratio
``NLL(answer | full cache) / NLL(answer | compressed cache)``.

Departures (the paper's full text could not be checked offline; METHODS.md marks these details unverified):

* ``nll(c)`` is estimated on ``nll_positions`` evenly spaced positions of the context (512 by default) instead of
  every position, so that the vocabulary projection costs a few milliseconds instead of a share of the prefill.
* ``over_weight`` (4 by default) and the fitting procedure (Adam from several starts, then the best) are ours.
* The retention is clipped to ``[min_retention, 1]``; the ratio applied is ``1 - r*``.
* Selection waits for the whole prefill (the statistic needs the last layer), so, like model-scope allocators, every
  compressible layer's full cache and fp32 scores are held until the end of the prefill forward.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .press import Press

FORMAT = "kvpress-like-calibration/1"
SHIPPED_DIR = Path(__file__).parent / "data" / "calibration"


def quality_curve(retention: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Predicted fraction of full-cache quality ``f(r, b) = (e^{rb} - 1) / (e^b - 1)`` (``r`` where ``b == 0``).

    Args:
        retention: kept fraction ``r`` in [0, 1], any shape.
        b: steepness, broadcastable to ``retention``.
    """
    b = torch.as_tensor(b, dtype=torch.float64) if not torch.is_tensor(b) else b
    safe = torch.where(b.abs() < 1e-6, torch.ones_like(b), b)
    curve = torch.expm1(retention * safe) / torch.expm1(safe)
    return torch.where(b.abs() < 1e-6, retention + torch.zeros_like(curve), curve)


def retention_for(quality: float, b: float) -> float:
    """The smallest retention ``r`` with ``quality_curve(r, b) >= quality``: ``log(1 + tau (e^b - 1)) / b``."""
    if abs(b) < 1e-6:
        return quality
    return min(1.0, max(0.0, math.log1p(quality * math.expm1(b)) / b))  # clipped: rounding near tau = 1


def _check_quality(quality) -> float:
    if isinstance(quality, bool) or not isinstance(quality, (int, float)) or not 0.0 < quality <= 1.0:
        raise ValueError(f"quality must be a number in (0, 1] (the fraction of full-cache quality to keep); "
                         f"got {quality!r}")
    return float(quality)


@dataclass(frozen=True)
class QualityModel:
    """Fitted parameters of one press: ``b = alpha * nll + beta``."""

    alpha: float
    beta: float

    def retention(self, quality: float, context_nll: float) -> float:
        """Smallest retention predicted to keep ``quality`` for a context of mean NLL ``context_nll``."""
        return retention_for(quality, self.alpha * context_nll + self.beta)


def fit_quality_model(context_nll, retention, quality, over_weight: float = 4.0, steps: int = 400) -> QualityModel:
    """Fit ``(alpha, beta)`` to measured qualities with an asymmetric squared loss.

    Args:
        context_nll: ``[N]`` mean NLL of each point's context.
        retention: ``[N]`` kept fraction of each point.
        quality: ``[N]`` measured fraction of full-cache quality (clipped to [0, 1]).
        over_weight: weight of errors where the model predicts more quality than measured (>= 1).
        steps: Adam steps per start.
    """
    x = torch.as_tensor(context_nll, dtype=torch.float64)
    r = torch.as_tensor(retention, dtype=torch.float64)
    g = torch.as_tensor(quality, dtype=torch.float64).clamp(0.0, 1.0)
    if not (x.ndim == r.ndim == g.ndim == 1 and x.numel() == r.numel() == g.numel() > 0):
        raise ValueError("context_nll, retention and quality must be 1-D and of the same non-zero length")
    if over_weight < 1:
        raise ValueError(f"over_weight must be >= 1; got {over_weight}")

    def loss_of(params):
        predicted = quality_curve(r, (params[0] * x + params[1]).clamp(-60, 60))
        error = predicted - g
        weight = torch.where(error > 0, torch.full_like(error, over_weight), torch.ones_like(error))
        return (weight * error**2).mean()

    best, best_loss = None, math.inf
    for start in ((0.0, 0.0), (1.0, -5.0), (-1.0, -5.0), (0.0, -10.0), (0.0, 5.0)):
        params = torch.tensor(start, dtype=torch.float64, requires_grad=True)
        optimiser = torch.optim.Adam([params], lr=0.1)
        for _ in range(steps):
            optimiser.zero_grad()
            loss = loss_of(params)
            loss.backward()
            optimiser.step()
        final = float(loss_of(params.detach()))
        if final < best_loss:
            best, best_loss = params.detach().tolist(), final
    return QualityModel(alpha=best[0], beta=best[1])


# -- parameter files ---------------------------------------------------------------------------------------------
def model_fingerprint(model: nn.Module) -> str:
    """The weights fingerprint of :func:`kvpress_like.saved_cache.model_identity` (which model the fit is for)."""
    from .saved_cache import model_identity

    return model_identity(model)["weights_sha256"]


def load_calibration(path: str | Path) -> dict:
    """Read and validate a calibration file written by ``kvpress-like calibrate``.

    Raises:
        ValueError: the file is missing, not JSON, or not a calibration file of this format.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ValueError(f"calibration file {path} does not exist") from error
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"calibration file {path} is not readable JSON: {error}") from error
    presses = data.get("presses") if isinstance(data, dict) else None
    if data.get("format") != FORMAT if isinstance(data, dict) else True:
        raise ValueError(f"{path} is not a calibration file (expected format {FORMAT!r})")
    if not isinstance(presses, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"calibration file {path} is malformed: it needs 'model' and 'presses' objects")
    for name, entry in presses.items():
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), (int, float)) and math.isfinite(entry[k])
                                                for k in ("alpha", "beta"))):
            raise ValueError(f"calibration file {path} is malformed: press {name!r} needs finite 'alpha' and 'beta'")
    return data


def shipped_calibration(fingerprint: str) -> tuple[Path, dict] | None:
    """The shipped calibration file whose model has this weights fingerprint, or ``None``."""
    for path in sorted(SHIPPED_DIR.glob("*.json")):
        data = load_calibration(path)
        if data["model"].get("weights_sha256") == fingerprint:
            return path, data
    return None


def quality_model_for(data: dict, press_name: str, source: str) -> QualityModel:
    entry = data["presses"].get(press_name)
    if entry is None:
        raise ValueError(f"calibration {source} has no parameters for press {press_name!r} (it covers: "
                         f"{', '.join(sorted(data['presses'])) or 'none'}); run kvpress-like calibrate --press "
                         f"{press_name}")
    return QualityModel(alpha=float(entry["alpha"]), beta=float(entry["beta"]))


# -- the context statistic ------------------------------------------------------------------------------------------
def context_nll(model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, positions: int = 512) -> float:
    """Mean next-token NLL of the context, estimated on up to ``positions`` evenly spaced positions.

    Args:
        model: the causal LM (its output embedding gives the logits).
        hidden: ``[B, S, hidden]`` the final norm's output over the context.
        input_ids: ``[B, S]`` the context tokens.
        positions: number of predicting positions sampled (all when the context is shorter).
    """
    head = model.get_output_embeddings()
    s = input_ids.shape[1]
    if s < 2:
        return 0.0
    index = torch.linspace(0, s - 2, min(positions, s - 1), device=hidden.device).round().long().unique()
    logits = head(hidden[:, index]).float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    targets = input_ids[:, index + 1].to(logits.device)
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()))


# -- the press ------------------------------------------------------------------------------------------------------
@dataclass
class CalibratedPress(Press):
    """Wrap a press so that each context gets the largest compression predicted to keep ``quality``.

    Args:
        scorer: the press (or registry name) whose scores choose the entries; its own ratio is ignored.
        quality: fraction of full-cache quality to keep, in (0, 1].
        params: a calibration file path, or ``None`` for the parameters shipped for this model (an error if there
            are none).
        nll_positions: positions sampled to estimate the context's NLL.
        min_retention: the smallest retention ever chosen.

    After each prefill, ``last_ratio``, ``last_retention`` and ``last_context_nll`` hold what was chosen.
    """

    name: ClassVar[str] = "calibrated"
    defers_selection: ClassVar[bool] = True
    scorer: Press | str = "compactor"
    quality: float = 0.95
    params: str | None = None
    nll_positions: int = 512
    min_retention: float = 0.05
    last_ratio: float | None = field(default=None, init=False, repr=False)
    last_retention: float | None = field(default=None, init=False, repr=False)
    last_context_nll: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self, compression_ratio=None):
        super().__post_init__(compression_ratio)
        if self.ratio != 0:
            raise ValueError("CalibratedPress chooses the ratio per context: do not pass ratio")
        if isinstance(self.scorer, str):
            from .registry import create_press

            self.scorer = create_press(self.scorer)
        if not isinstance(self.scorer, Press) or isinstance(self.scorer, CalibratedPress):
            raise TypeError(f"scorer must be a (non-calibrated) Press or a press name; got {self.scorer!r}")
        overrides = [n for n in ("select", "compress", "after_forward") if getattr(type(self.scorer), n) is not
                     getattr(Press, n)]
        if overrides:
            raise ValueError(f"{type(self.scorer).__name__} overrides {', '.join(overrides)}; calibrated compression "
                             "needs a press that scores tokens and lets its allocator select")
        self.quality = _check_quality(self.quality)
        if not 0.0 < self.min_retention <= 1.0:
            raise ValueError(f"min_retention must be in (0, 1]; got {self.min_retention!r}")
        self.n_sink, self.window, self._allocator = self.scorer.n_sink, self.scorer.window, self.scorer._allocator
        self._model: QualityModel | None = None
        self._model_source: tuple | None = None

    def compresses_prefill(self) -> bool:
        return True

    def score(self, ctx):
        return self.scorer.score(ctx)

    def quality_model(self, model: nn.Module) -> QualityModel:
        """The fitted parameters for ``model`` and the wrapped press (from ``params`` or the shipped files)."""
        key = (id(model), self.params)
        if self._model is None or self._model_source != key:
            if self.params is not None:
                data, source = load_calibration(self.params), str(self.params)
            else:
                found = shipped_calibration(model_fingerprint(model))
                if found is None:
                    raise ValueError(
                        "no calibration parameters are shipped for this model (only for the embedded default "
                        "model); fit them with `kvpress-like calibrate --model PATH --press "
                        f"{self.scorer.name} --output FILE` and pass params=FILE")
                source, data = str(found[0]), found[1]
            self._model, self._model_source = quality_model_for(data, self.scorer.name, source), key
        return self._model

    def choose_ratio(self, nll: float, model: nn.Module) -> float:
        """The ratio (1 - retention) for a context of mean NLL ``nll``."""
        retention = self.quality_model(model).retention(self.quality, nll)
        retention = min(1.0, max(self.min_retention, retention if math.isfinite(retention) else 1.0))
        self.last_context_nll, self.last_retention = nll, retention
        self.last_ratio = min(max(0.0, 1.0 - retention), 0.999)
        return self.last_ratio

    def finish_prefill(self, scope, nll: float, model: nn.Module) -> None:
        """Choose the ratio for a context of mean NLL ``nll`` and compress the prefilled cache."""
        scope.finalize(scope.cache, self.choose_ratio(nll, model))

    def install(self, model: nn.Module, scope) -> list:
        """Capture the context's tokens and its final hidden states; choose the ratio and compress at the end of
        each prefill forward."""
        if model.get_output_embeddings() is None:
            raise ValueError("calibrated compression needs a causal LM with an output embedding (lm_head)")
        self.quality_model(model)  # fail on install, not in the middle of a forward
        base = model.get_decoder() if hasattr(model, "get_decoder") else model
        norm = getattr(base, "norm", None)
        if norm is None:
            raise ValueError(f"{type(model).__name__} has no final `norm` module; calibrated compression needs it")
        seen = {}

        def keep_ids(module, args, kwargs):
            if scope.in_owner_thread():  # forwards in other threads are not pressed
                seen["ids"] = kwargs.get("input_ids", args[0] if args else None)

        def finish(module, args, output):
            if not scope.in_owner_thread() or not scope.pending or scope.cache is None:
                return None  # not a prefill (or nothing compressible happened)
            ids = seen.get("ids")
            if ids is None:
                raise ValueError("calibrated compression needs input_ids (not inputs_embeds) to measure the context")
            with torch.no_grad():
                self.finish_prefill(scope, context_nll(model, output, ids, self.nll_positions), model)
            scope.pending.clear()
            scope.cache = None
            return None

        return [model.register_forward_pre_hook(keep_ids, with_kwargs=True), norm.register_forward_hook(finish)]


# -- fitting on calibration tasks -------------------------------------------------------------------------------------
CALIBRATION_SEED = 1_000_003  # evaluation uses small seeds (0 by default); calibration samples never overlap them
CALIBRATION_TASKS = ("niah_single_1", "niah_single_2", "niah_multikey_1", "niah_multivalue", "vt", "fwe", "qa_1")
RETENTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class _ScoreRecorder(CalibratedPress):
    """Records, for one prefill, every wrapped press's layer scores and the context NLL instead of compressing."""

    def __post_init__(self, compression_ratio=None):
        super().__post_init__(compression_ratio)
        self.scorers: dict[str, Press] = {self.scorer.name: self.scorer}
        self.scores: dict[str, dict[int, tuple]] = {}
        self.nll: float | None = None

    def quality_model(self, model):
        return QualityModel(0.0, 0.0)  # unused: nothing is compressed while recording

    def layer_scores(self, ctx):
        computed = {}  # presses that differ only in their allocator share one scoring
        for name, scorer in self.scorers.items():
            key = repr({k: v for k, v in scorer.to_dict().items() if k != "allocator"})
            if key not in computed:
                computed[key] = scorer.layer_scores(ctx)
            scores, protected = computed[key]
            self.scores.setdefault(name, {})[ctx.layer_idx] = (scores, protected, ctx.valid)
        return self.scores[next(iter(self.scorers))][ctx.layer_idx][:2]  # the first recorded press's

    def finish_prefill(self, scope, nll, model):
        self.nll = nll

    def compress_at(self, name: str, cache, ratio: float) -> None:
        """Compress ``cache`` (holding the recorded context in full) with press ``name``'s recorded scores."""
        from .context import _ModelScope

        scope = _ModelScope(self.scorers[name], tuple(sorted(self.scores[name])))
        scope.pending = self.scores[name]
        scope.finalize(cache, ratio)


def answer_nll(model, cache, prompt_ids: torch.Tensor, answer_ids: torch.Tensor) -> float:
    """Mean NLL of ``answer_ids`` ``[1, a]`` teacher-forced after ``prompt_ids`` ``[1, q]`` on ``cache`` (which
    grows by ``q + a`` tokens)."""
    from .cache import CACHE_KWARG
    from .eval.fidelity import token_nll

    ids = torch.cat([prompt_ids, answer_ids], dim=1)
    logits = model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True).logits[0, prompt_ids.shape[1] - 1 : -1]
    return float(token_nll(logits, answer_ids[0]).mean())


def calibration_points(model, tokenizer, scorers: list[Press], lengths, samples: int, seed: int = CALIBRATION_SEED,
                       tasks=CALIBRATION_TASKS, retentions=RETENTIONS, progress: bool = True) -> dict[str, list]:
    """Measured quality of each press at every retention on generated calibration samples.

    For each sample one prefill records every press's scores in every layer and the context's NLL; the full cache is
    then compressed at each retention from those scores (a prefill does not depend on the ratio: layers are
    compressed after their attention), and the answer's NLL is measured on it. Quality is
    ``NLL(answer | full) / NLL(answer | compressed)``.

    Returns:
        Per press name, one dict per (sample, retention): ``task``, ``length``, ``index``, ``context_nll``,
        ``retention``, ``kept_fraction``, ``quality``, ``nll_full``, ``nll_press``.
    """
    import copy

    from transformers import DynamicCache

    from .cache import CACHE_KWARG
    from .context import press as press_context
    from .eval.tasks import generate_samples
    from .pipeline import encode_prompt, kept_fraction

    recorder = _ScoreRecorder(scorer=scorers[0])
    for extra in scorers[1:]:
        CalibratedPress(scorer=extra)  # the same checks as a calibrated press
        recorder.scorers[extra.name] = extra
    device = next(model.parameters()).device
    work = [(task, length, i, s) for length in lengths for task in tasks
            for i, s in enumerate(generate_samples(task, tokenizer, length, samples, seed=seed))]
    try:
        from tqdm.auto import tqdm

        work = tqdm(work, desc="calibrate", unit="sample", disable=not progress)
    except ImportError:
        pass
    points = {name: [] for name in recorder.scorers}
    with torch.no_grad(), press_context(model, recorder):
        for task, length, index, sample in work:
            context_ids, suffix_ids = encode_prompt(tokenizer, sample.context, sample.question, sample.answer_prefix)
            answer = tokenizer(" " + ", ".join(sample.answers), add_special_tokens=False, return_tensors="pt")
            context_ids, suffix_ids = context_ids.to(device), suffix_ids.to(device)
            answer_ids = answer["input_ids"].to(device)
            full = DynamicCache(config=model.config)
            model(input_ids=context_ids, **{CACHE_KWARG: full}, use_cache=True, logits_to_keep=1)
            nll_full = answer_nll(model, copy.deepcopy(full), suffix_ids, answer_ids)
            for name in recorder.scorers:
                for retention in retentions:
                    cache = copy.deepcopy(full)
                    recorder.compress_at(name, cache, 1.0 - retention)
                    nll_press = answer_nll(model, cache, suffix_ids, answer_ids)
                    points[name].append({"task": task, "length": length, "index": index, "context_nll": recorder.nll,
                                         "retention": retention, "kept_fraction": kept_fraction(cache),
                                         "nll_full": nll_full, "nll_press": nll_press,
                                         "quality": nll_full / max(nll_press, 1e-6)})
    return points


def calibrate(model, tokenizer, press_names, lengths=(1024, 2048), samples: int = 3, seed: int = CALIBRATION_SEED,
              over_weight: float = 4.0, model_name: str = "", progress: bool = True) -> dict:
    """Fit the quality model of each press on generated calibration tasks; returns the calibration file's content
    (the fitted ``alpha``, ``beta`` and the measured points of every press)."""
    from .registry import create_press

    points = calibration_points(model, tokenizer, [create_press(name) for name in press_names], lengths, samples,
                                seed, progress=progress)
    result = {"format": FORMAT,
              "model": {"name": model_name, "weights_sha256": model_fingerprint(model)},
              "fit": {"lengths": list(lengths), "samples_per_task": samples, "seed": seed, "tasks":
                      list(CALIBRATION_TASKS), "retentions": list(RETENTIONS), "over_weight": over_weight,
                      "quality_proxy": "NLL(answer | full cache) / NLL(answer | compressed cache)"},
              "presses": {}}
    for name, measured in points.items():
        fitted = fit_quality_model([p["context_nll"] for p in measured], [p["kept_fraction"] for p in measured],
                                   [p["quality"] for p in measured], over_weight=over_weight)
        result["presses"][name] = {"alpha": fitted.alpha, "beta": fitted.beta, "points": measured}
    return result
