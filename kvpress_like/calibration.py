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
import weakref
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .press import Press, as_press, record_compression
from .registry import architecture_for

FORMAT = "kvpress-like-calibration/1"
_QUALITY_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(params, press): QualityModel}
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
    if abs(b) < 1e-6 or quality >= 1.0:
        return quality
    if b > 0:
        r = math.log1p(quality * math.expm1(b)) / b
    else:  # the same, as 1 + log(tau + (1 - tau) e^{-b}) / b: exact near r = 1, where the form above cancels
        high = math.log1p(-quality) - b
        low = math.log(quality)
        r = 1 + (max(high, low) + math.log1p(math.exp(-abs(high - low)))) / b
    return min(1.0, max(0.0, r))  # clipped: rounding


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
        if not isinstance(entry.get("points", []), list):
            raise ValueError(f"calibration file {path} is malformed: press {name!r} has 'points' that are not a list "
                             "of measurements (files written by kvpress-like calibrate hold one object per point)")
    return data


def save_calibration(data: dict, path: str | Path) -> Path:
    """Write calibration ``data`` (as built by :func:`kvpress_like.eval.calibration.calibrate`) to ``path`` after
    checking that :func:`load_calibration` accepts it: what is written is what ``ratio="auto"`` reads."""
    path = Path(path)
    text = json.dumps(data, separators=(",", ":")).replace('},{"task"', '},\n{"task"') + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        load_calibration(tmp)
    except ValueError:
        tmp.unlink()
        raise
    tmp.replace(path)
    return path


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
        scorer: the press, registry name or :class:`~kvpress_like.scorer.Scorer` (wrapped in a
            :class:`~kvpress_like.press.ScorerPress`, whose calibration parameters are looked up under the name
            ``"scorer"``) whose scores choose the entries; its own ratio is ignored.
        quality: fraction of full-cache quality to keep, in (0, 1].
        params: a calibration file path, or ``None`` for the parameters shipped for this model (an error if there
            are none).
        nll_positions: positions sampled to estimate the context's NLL.
        min_retention: the smallest retention ever chosen.

    What a prefill chose is recorded on the cache it compressed, not on the press (one calibrated press may compress
    many caches, on several models at once): ``kvpress_like.compression_info(cache)`` gives ``ratio``,
    ``retention``, ``context_nll`` and ``quality`` (see :func:`~kvpress_like.press.record_compression`).
    """

    name: ClassVar[str] = "calibrated"
    defers_selection: ClassVar[bool] = True
    is_plain_scorer: ClassVar[bool] = False  # install(): chooses the ratio after the prefill
    chooses_ratio: ClassVar[bool] = True
    scorer: Press | str = "compactor"
    quality: float = 0.95
    params: str | None = None
    nll_positions: int = 512
    min_retention: float = 0.05
    needs = property(lambda self: self.scorer.needs)  # what its scorer reads

    def __post_init__(self, compression_ratio=None):
        super().__post_init__(compression_ratio)
        if self.ratio != 0:
            raise ValueError("CalibratedPress chooses the ratio per context: do not pass ratio")
        self.scorer = as_press(self.scorer)
        if isinstance(self.scorer, CalibratedPress):
            raise TypeError(f"scorer must be a press that is not itself calibrated; got {self.scorer!r}")
        if not self.scorer.is_plain_scorer:
            raise ValueError(f"{type(self.scorer).__name__} is not a plain scorer (it selects, installs hooks or acts "
                             "while decoding by itself); calibrated compression needs a press that scores tokens "
                             "and lets its allocator select")
        self.quality = _check_quality(self.quality)
        if not 0.0 < self.min_retention <= 1.0:
            raise ValueError(f"min_retention must be in (0, 1]; got {self.min_retention!r}")
        self.n_sink, self.window, self.allocator = self.scorer.n_sink, self.scorer.window, self.scorer.allocator

    def compresses_prefill(self) -> bool:
        return True

    def score(self, ctx):
        return self.scorer.score(ctx)

    def quality_model(self, model: nn.Module) -> QualityModel:
        """The fitted parameters for ``model`` and the wrapped press (from ``params`` or the shipped files).

        Parameters are looked up once per model and source and cached with the model, not on the press."""
        key = (self.params, self.scorer.name)
        cached = _QUALITY_MODELS.setdefault(model, {})
        if key not in cached:
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
            cached[key] = quality_model_for(data, self.scorer.name, source)
        return cached[key]

    def choose(self, nll: float, model: nn.Module) -> dict[str, float]:
        """What this press chooses for a context of mean NLL ``nll`` on ``model`` (the press is not changed):
        ``{"ratio": 1 - retention, "retention", "context_nll": nll, "quality"}``."""
        retention = self.quality_model(model).retention(self.quality, nll)
        retention = min(1.0, max(self.min_retention, retention if math.isfinite(retention) else 1.0))
        return {"ratio": min(max(0.0, 1.0 - retention), 0.999), "retention": retention, "context_nll": nll,
                "quality": self.quality}

    def finish_prefill(self, scope, nll: float, model: nn.Module) -> None:
        """Choose the ratio for a context of mean NLL ``nll``, compress the prefilled cache and record the choice on
        it (:func:`~kvpress_like.press.record_compression`)."""
        chosen = self.choose(nll, model)
        scope.finalize(scope.cache, chosen["ratio"])
        record_compression(scope.cache, self, **chosen)

    def install(self, model: nn.Module, scope) -> list:
        """Capture the context's tokens and its final hidden states; choose the ratio and compress at the end of
        each prefill forward."""
        if model.get_output_embeddings() is None:
            raise ValueError("calibrated compression needs a causal LM with an output embedding (lm_head)")
        self.quality_model(model)  # fail on install, not in the middle of a forward
        norm = architecture_for(model.config).final_norm(model)  # a plugin's Architecture may say where it is
        if norm is None:
            raise ValueError(f"{type(model).__name__} has no final norm module (Architecture.final_norm found none); "
                             "calibrated compression reads the context's final hidden states from it")
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


# -- recording scores for many ratios ---------------------------------------------------------------------------------
def compress_recorded(cache, p: Press, recorded: dict[int, tuple], ratio: float) -> None:
    """Compress ``cache`` in place at ``ratio`` from scores recorded during its prefill, as ``p`` would have.

    Args:
        cache: a cache whose compressible layers still hold the whole prefilled context ``[B, H_kv, S, D]``.
        p: the press whose allocator and protected tokens the scores came with.
        recorded: per compressible layer index, ``(scores [B, H_kv, S], protected [B, S], valid [B, S])`` as
            :meth:`Press.layer_scores` gives them (``+inf`` protected, ``-inf`` padding) and the layer's ``valid``.
        ratio: the fraction of the context removed, in [0, 1).
    """
    from .context import ModelScope

    scope = ModelScope(p, tuple(sorted(recorded)))
    scope.pending = dict(recorded)
    scope.finalize(cache, ratio)


FEATURES = ("context_nll", "log_length", "score_skew", "score_kurtosis", "score_top10")


def score_statistics(recorded: dict[int, tuple]) -> dict[str, float]:
    """How concentrated a press's scores are over the context, from scores it computed anyway (no extra forward).

    Each head's scores over its unprotected real tokens are standardised (mean 0, std 1); the statistics are averaged
    over the heads of every compressible layer of the first batch row.

    Args:
        recorded: per layer, ``(scores [B, H_kv, S], protected [B, S], valid [B, S])`` (see :func:`compress_recorded`).

    Returns:
        ``score_skew`` (third standardised moment), ``score_kurtosis`` (fourth, minus 3) and ``score_top10`` (mean
        z-score of the top 10 % of tokens): larger when a few tokens stand out.
    """
    skews, kurtoses, tops = [], [], []
    for scores, protected, valid in recorded.values():
        free = (valid[0] & ~protected[0]).to(scores.device)
        x = scores[0][:, free].double()  # [H, n]
        if x.shape[1] < 4:
            continue
        z = (x - x.mean(-1, keepdim=True)) / x.std(-1, unbiased=False, keepdim=True).clamp_min(1e-12)
        skews.append(z.pow(3).mean(-1))
        kurtoses.append(z.pow(4).mean(-1) - 3)
        top = max(1, x.shape[1] // 10)
        tops.append(z.topk(top, dim=-1).values.mean(-1))
    if not skews:
        return {"score_skew": 0.0, "score_kurtosis": 0.0, "score_top10": 0.0}
    return {"score_skew": float(torch.cat(skews).mean()), "score_kurtosis": float(torch.cat(kurtoses).mean()),
            "score_top10": float(torch.cat(tops).mean())}


_RECORDING = "kvpress_like.score_recorder"  # key of the scores being recorded, in the installation's prefill state


@dataclass(frozen=True, eq=False)
class ScoreRecord:
    """What one prefill under a :class:`ScoreRecorder` recorded: every press's layer scores and the context's NLL.

    It lives on the cache that prefill filled (read it with :func:`recorded_scores`), never on the recorder, so one
    recorder may serve several models and caches at once. It is never changed: deep copies of the cache share it, and
    :meth:`compress_at` compresses such a copy (which then no longer carries it).

    Attributes:
        presses: ``(label, press)`` pairs, as the recorder holds them.
        scores: per label, per compressible layer index, ``(scores [B, H_kv, S] fp32, protected [B, S] bool,
            valid [B, S] bool)`` as :meth:`Press.layer_scores` gives them (``+inf`` protected, ``-inf`` padding).
        nll: the context's mean next-token NLL (:func:`context_nll`); ``None`` only while the prefill forward runs.
    """

    presses: tuple[tuple[str, Press], ...]
    scores: dict[str, dict[int, tuple]]
    nll: float | None = None

    @property
    def labels(self) -> tuple[str, ...]:
        """The labels of the recorded presses, in the recorder's order."""
        return tuple(label for label, _ in self.presses)

    def press(self, name: str) -> Press:
        """The press recorded under label ``name``.

        Raises:
            KeyError: no press has that label (the labels are named).
        """
        for label, p in self.presses:
            if label == name:
                return p
        raise KeyError(f"no press recorded under {name!r}; recorded: {', '.join(map(repr, self.labels))}")

    def compress_at(self, name: str, cache, ratio: float) -> None:
        """Compress ``cache`` in place at ``ratio`` with press ``name``'s recorded scores, as that press would have.

        Args:
            name: a label of :attr:`presses`.
            cache: the recorded cache or a copy of it (``copy.deepcopy``), still holding the whole context: every
                recorded layer ``[B, H_kv, S, D]``.
            ratio: the fraction of the context removed, in [0, 1).

        Raises:
            KeyError: ``name`` is not recorded.
            ValueError: a recorded layer of ``cache`` does not hold the recorded context in full (e.g. it was
                compressed already).
        """
        p, recorded = self.press(name), self.scores[name]
        for idx, (scores, _, _) in recorded.items():
            layer = cache.layers[idx] if idx < len(cache.layers) else None
            keys = getattr(layer, "keys", None)
            if not isinstance(keys, torch.Tensor) or tuple(keys.shape[:3]) != tuple(scores.shape):
                raise ValueError(
                    f"layer {idx} of the cache does not hold the recorded context in full (scores recorded for "
                    f"[B, H_kv, S] = {list(scores.shape)}, the layer is {type(layer).__name__}"
                    f"{' ' + str(list(keys.shape)) if isinstance(keys, torch.Tensor) else ''}): compress a copy of "
                    "the cache the recorder prefilled (copy.deepcopy), once")
        compress_recorded(cache, p, recorded, ratio)
        vars(cache).pop("score_record", None)  # the compressed copy no longer holds what was recorded

    def features(self, name: str, context_tokens: int | None = None) -> dict[str, float]:
        """The context features for press ``name``: ``context_nll``, ``log_length`` (of ``context_tokens``, by
        default the recorded context's length ``S``) and :func:`score_statistics`."""
        self.press(name)  # a KeyError naming the recorded labels
        recorded = self.scores[name]
        if context_tokens is None:
            context_tokens = next(iter(recorded.values()))[2].shape[1]
        return {"context_nll": self.nll, "log_length": math.log(context_tokens), **score_statistics(recorded)}

    def __deepcopy__(self, memo):
        return self  # never changed: copies of the cache share it


def recorded_scores(cache) -> ScoreRecord:
    """The :class:`ScoreRecord` a prefill under a :class:`ScoreRecorder` left on ``cache`` (or a copy of it).

    Raises:
        ValueError: ``cache`` holds no finished record (not prefilled under a recorder, already compressed by
            :meth:`ScoreRecord.compress_at`, or its prefill forward did not finish).
    """
    record = getattr(cache, "score_record", None)
    if not isinstance(record, ScoreRecord) or record.nll is None:
        raise ValueError("this cache holds no recorded scores: prefill it inside `with press(model, "
                         "ScoreRecorder.of({...}))` (a cache compressed by compress_at no longer carries them)")
    return record


def _scoring_key(p: Press) -> tuple:
    """What ``p``'s scores depend on: its class and its parameters except the allocator (compared with ``==``)."""
    return (type(p), [getattr(p, f.name) for f in fields(p) if f.init and f.name != "allocator"])


@dataclass
class ScoreRecorder(CalibratedPress):
    """Records, for each prefill, every given press's layer scores and the context's NLL instead of compressing, so
    that one prefill serves every (press, ratio).

    Build it with :meth:`of`. The recorder is immutable configuration: what a prefill records is a
    :class:`ScoreRecord` left on the cache it filled (:func:`recorded_scores`), whose
    :meth:`~ScoreRecord.compress_at` compresses a copy of that full cache::

        recorder = ScoreRecorder.of({"compactor": CompactorPress(), "knorm": KnormPress()})
        with torch.no_grad(), press(model, recorder):
            model(input_ids, past_key_values=full)
        record = recorded_scores(full)
        cache = copy.deepcopy(full)
        record.compress_at("knorm", cache, 0.5)

    Args:
        scorers: ``(label, press)`` pairs (a dict is accepted); each a press, registry name or
            :class:`~kvpress_like.scorer.Scorer` that a :class:`CalibratedPress` accepts. ``scorer`` is the first.
    """

    name: ClassVar[str] = "score_recorder"
    acts_while_decoding: ClassVar[bool] = False  # after_forward only hands a prefill's scores to its cache
    scorers: tuple[tuple[str, Press], ...] = ()
    needs = property(lambda self: frozenset().union(*(p.needs for _, p in self.scorers)))  # what its presses read

    @classmethod
    def of(cls, presses: dict[str, Press]) -> ScoreRecorder:
        """A recorder for ``presses`` (label -> press); each must be a scorer a calibrated press accepts."""
        if not isinstance(presses, dict) or not presses:
            raise ValueError(f"ScoreRecorder.of needs a non-empty dict label -> press; got {presses!r}")
        return cls(scorers=tuple(presses.items()))

    def __post_init__(self, compression_ratio=None):
        pairs = tuple(self.scorers.items()) if isinstance(self.scorers, dict) else self.scorers
        if not isinstance(pairs, tuple) or not all(isinstance(x, tuple) and len(x) == 2 for x in pairs):
            raise TypeError(f"scorers must be (label, press) pairs or a dict label -> press; got {self.scorers!r}")
        labels = [label for label, _ in pairs]
        if not all(isinstance(label, str) and label for label in labels) or len(set(labels)) != len(labels):
            raise ValueError(f"scorer labels must be distinct non-empty strings; got {labels!r}")
        pairs = tuple((label, as_press(p)) for label, p in pairs)
        for _, p in pairs:
            CalibratedPress(scorer=p)  # the same checks as a calibrated press
        if pairs:
            self.scorer = pairs[0][1]
        super().__post_init__(compression_ratio)
        self.scorers = pairs or ((self.scorer.name, self.scorer),)

    @property
    def labels(self) -> tuple[str, ...]:
        """The labels of the recorded presses."""
        return tuple(label for label, _ in self.scorers)

    def to_dict(self) -> dict:
        """Raises ``TypeError``: a recorder is a tool of evaluation and calibration, not a press to save."""
        raise TypeError("ScoreRecorder has no dict form: it records scores for evaluation and calibration; save the "
                        "presses it records instead")

    def quality_model(self, model):
        return QualityModel(0.0, 0.0)  # unused: nothing is compressed while recording

    def layer_scores(self, ctx):
        """Record every press's scores of this layer in the installation's prefill state (``ctx.state``); presses
        that differ only in their allocator share one scoring. Returns the first press's."""
        recording = ctx.state.setdefault(_RECORDING, {})
        computed = []
        for label, p in self.scorers:
            key = _scoring_key(p)
            found = next((result for k, result in computed if k == key), None)
            if found is None:
                found = p.layer_scores(ctx)
                computed.append((key, found))
            recording.setdefault(label, {})[ctx.layer_idx] = (*found, ctx.valid)
        return recording[self.scorers[0][0]][ctx.layer_idx][:2]

    def after_forward(self, hooks, module, kwargs, cache, was_prefill) -> None:
        """After a prefill's last compressible layer: leave the scores recorded in the installation's state on the
        cache (a :class:`ScoreRecord`; its NLL follows in :meth:`finish_prefill`)."""
        if was_prefill and hooks.layer_idx == hooks.layers[-1] and _RECORDING in hooks.state:
            cache.score_record = ScoreRecord(self.scorers, hooks.state.pop(_RECORDING))

    def finish_prefill(self, scope, nll, model):
        """Complete the cache's :class:`ScoreRecord` with the context's NLL (nothing is compressed)."""
        record = getattr(scope.cache, "score_record", None)
        if not isinstance(record, ScoreRecord):
            raise RuntimeError("ScoreRecorder: the prefill's scores did not reach its cache")
        scope.cache.score_record = ScoreRecord(record.presses, record.scores, nll)
