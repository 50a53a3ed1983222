"""Context-calibrated compression: the quality curve and its inverse, the asymmetric fit, parameter files, and the
calibrated press end to end on a tiny model."""

import json
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import cached_tiny_model, full_attention_layers, prefill, random_ids, save_tiny_llama_dir
from transformers import DynamicCache

from kvpress_like import CompactorPress, KnormPress, compression_info, create_press, press_from_dict
from kvpress_like.allocators import keep_count
from kvpress_like.cache import CACHE_KWARG
from kvpress_like.calibration import (
    FORMAT,
    CalibratedPress,
    QualityModel,
    fit_quality_model,
    load_calibration,
    model_fingerprint,
    quality_curve,
    retention_for,
)


def write_params(path, model, presses=None):
    presses = {"compactor": {"alpha": 0.5, "beta": -2.0}} if presses is None else presses
    path.write_text(json.dumps({"format": FORMAT, "model": {"weights_sha256": model_fingerprint(model)},
                                "presses": presses}))
    return str(path)


# -- the curve ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b", [-8.0, -1.0, 0.0, 1e-9, 2.5, 10.0])
def test_curve_runs_from_zero_to_one_and_increases(b):
    r = torch.linspace(0, 1, 101, dtype=torch.float64)
    f = quality_curve(r, torch.tensor(b, dtype=torch.float64))
    assert float(f[0]) == pytest.approx(0.0, abs=1e-12) and float(f[-1]) == pytest.approx(1.0, abs=1e-12)
    assert bool((f[1:] > f[:-1]).all())
    if b < 0:  # saturating: above the diagonal
        assert bool((f[1:-1] > r[1:-1]).all())


def test_curve_matches_its_closed_form():
    for b in (-3.0, 0.7, 4.0):
        for r in (0.1, 0.5, 0.9):
            expected = (math.exp(r * b - b) - math.exp(-b)) / (1 - math.exp(-b))  # the form in METHODS.md
            got = float(quality_curve(torch.tensor(r, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)))
            assert got == pytest.approx(expected, rel=1e-12)


@settings(max_examples=200, deadline=None)
@given(tau=st.floats(0.01, 1.0), b=st.floats(-30, 30))
def test_retention_is_the_inverse_of_the_curve(tau, b):
    r = retention_for(tau, b)
    assert 0.0 <= r <= 1.0
    f = float(quality_curve(torch.tensor(r, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)))
    assert f == pytest.approx(tau, abs=1e-6)
    # the closed form quoted from the paper: r* = 1 + ln(tau + (1 - tau) e^{-b}) / b
    if abs(b) > 1e-3:
        assert r == pytest.approx(1 + math.log(tau + (1 - tau) * math.exp(-b)) / b, abs=1e-6)


# -- the fit --------------------------------------------------------------------------------------------------------
def test_fit_recovers_known_parameters_from_exact_data():
    alpha, beta = -1.5, 1.0
    nll = torch.tensor([1.0, 2.0, 3.0, 4.0]).repeat_interleave(9).double()
    r = torch.arange(1, 10, dtype=torch.float64).div(10).repeat(4)
    g = quality_curve(r, alpha * nll + beta)
    fitted = fit_quality_model(nll, r, g, over_weight=4.0, steps=1500)
    assert fitted.alpha == pytest.approx(alpha, abs=0.05)
    assert fitted.beta == pytest.approx(beta, abs=0.15)


def test_asymmetric_loss_under_predicts_quality_more_often():
    generator = torch.Generator().manual_seed(0)
    nll = torch.rand(400, generator=generator, dtype=torch.float64) * 3 + 1
    r = torch.rand(400, generator=generator, dtype=torch.float64)
    g = (quality_curve(r, -1.0 * nll + 0.5) + 0.1 * torch.randn(400, generator=generator, dtype=torch.float64))
    g = g.clamp(0, 1)
    symmetric = fit_quality_model(nll, r, g, over_weight=1.0)
    cautious = fit_quality_model(nll, r, g, over_weight=8.0)

    def over_rate(model):
        predicted = quality_curve(r, model.alpha * nll + model.beta)
        return float((predicted > g).double().mean())

    assert over_rate(cautious) < over_rate(symmetric) - 0.1
    # cautious means a higher retention for the same target
    assert cautious.retention(0.9, 2.0) > symmetric.retention(0.9, 2.0)


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="same non-zero length"):
        fit_quality_model([1.0, 2.0], [0.5], [0.5, 0.6])
    with pytest.raises(ValueError, match="over_weight"):
        fit_quality_model([1.0], [0.5], [0.5], over_weight=0.5)


# -- parameter files and bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("quality", [0, -0.1, 1.01, 2, True, "high", None])
def test_quality_outside_zero_one_is_an_error(quality):
    with pytest.raises(ValueError, match="quality must be a number in \\(0, 1\\]"):
        CalibratedPress(scorer="compactor", quality=quality)
    with pytest.raises(ValueError, match="quality"):
        CompactorPress(ratio="auto", quality=quality)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("not json {", "not readable JSON"),
    (json.dumps({"format": "other"}), "not a calibration file"),
    (json.dumps({"format": FORMAT, "presses": {}}), "malformed"),
    (json.dumps({"format": FORMAT, "model": {}, "presses": {"compactor": {"alpha": 1.0}}}), "finite .alpha."),
    (json.dumps({"format": FORMAT, "model": {}, "presses": {"compactor": {"alpha": "x", "beta": 1}}}), "malformed"),
])
def test_malformed_or_missing_parameter_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "params.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_calibration(path)
    model = cached_tiny_model("llama", "sdpa")
    with pytest.raises(ValueError, match=message):
        prefill(model, random_ids(20), CalibratedPress(scorer="compactor", params=str(path)))


def test_press_not_covered_by_the_file_is_a_clear_error(tmp_path):
    model = cached_tiny_model("llama", "sdpa")
    params = write_params(tmp_path / "p.json", model)
    with pytest.raises(ValueError, match="no parameters for press 'knorm'.*covers: compactor"):
        prefill(model, random_ids(20), KnormPress(ratio="auto", params=params))


def test_no_shipped_parameters_for_an_unknown_model_is_a_clear_error():
    model = cached_tiny_model("qwen3", "sdpa")
    with pytest.raises(ValueError, match="no calibration parameters are shipped for this model.*kvpress-like "
                                         "calibrate"):
        prefill(model, random_ids(20), CompactorPress(ratio="auto"))


def test_ratio_auto_builds_a_calibrated_press_and_bad_combinations_fail():
    p = CompactorPress(ratio="auto", quality=0.8, window=4, blending=0.5)
    assert isinstance(p, CalibratedPress) and isinstance(p.scorer, CompactorPress)
    assert p.quality == 0.8 and p.scorer.window == 4 and p.scorer.blending == 0.5 and p.window == 4
    assert isinstance(create_press("snapkv", ratio="auto"), CalibratedPress)
    with pytest.raises(TypeError, match="quality"):
        CompactorPress(ratio=0.5, quality=0.9)
    with pytest.raises(ValueError, match="do not pass ratio"):
        CalibratedPress(scorer="compactor", ratio=0.5)
    with pytest.raises(ValueError, match="ChunkKVPress is not a plain scorer"):
        CalibratedPress(scorer="chunkkv")
    with pytest.raises(TypeError, match="scorer must be"):
        CalibratedPress(scorer=42)


# -- end to end -----------------------------------------------------------------------------------------------------
def reference_context_nll(model, ids):
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]))


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3"])
@pytest.mark.parametrize("quality", [0.5, 0.95])
def test_calibrated_press_chooses_the_predicted_ratio_and_compresses_like_a_fixed_press(tmp_path, arch, quality):
    model = cached_tiny_model(arch, "sdpa")
    params = write_params(tmp_path / "p.json", model, {"compactor": {"alpha": -0.8, "beta": 1.0}})
    ids = random_ids(60, seed=2)
    p = CompactorPress(ratio="auto", quality=quality, params=params)
    cache = prefill(model, ids, p)

    nll = reference_context_nll(model, ids)  # every position: nll_positions (512) exceeds the context
    chosen = compression_info(cache)
    assert chosen["press"] == f"calibrated(compactor, quality={quality:g}, params={params!r})"
    assert chosen["quality"] == quality and compression_info(cache, p) == chosen
    assert chosen["context_nll"] == pytest.approx(nll, rel=1e-4)
    retention = QualityModel(-0.8, 1.0).retention(quality, nll)
    assert chosen["retention"] == pytest.approx(retention, rel=1e-6)
    assert chosen["ratio"] == pytest.approx(1 - retention, rel=1e-6)

    fixed = prefill(model, ids, CompactorPress(ratio=chosen["ratio"]))
    for idx in full_attention_layers(model.config):
        assert cache.layers[idx].keys.shape[2] == keep_count(60, chosen["ratio"])
        assert torch.equal(cache.layers[idx].keys, fixed.layers[idx].keys)
        assert cache.layers[idx].get_seq_length() == 60


def test_the_choice_is_recorded_on_each_cache_and_the_press_never_changes(tmp_path):
    """One calibrated press prefills two contexts, one on each of two models, both installed at once, then a third
    cache on the first model: each cache records the ratio chosen for its own context (the NLL computed naively
    here), keeps what a fixed press at that ratio keeps, and the press object is the same before and after."""
    import copy

    from kvpress_like import press

    models = [cached_tiny_model("llama", "sdpa"), cached_tiny_model("qwen3", "sdpa")]
    params = write_params(tmp_path / "p.json", models[0], {"compactor": {"alpha": -3.0, "beta": 12.0}})
    p = CompactorPress(ratio="auto", quality=0.8, params=params)
    before, before_hash = copy.deepcopy(p), hash(p)
    before_state, scorer_state = dict(vars(p)), dict(vars(p.scorer))
    contexts = [random_ids(70, seed=11), random_ids(90, seed=12)[:, :40].repeat(1, 2)]
    caches = [DynamicCache(config=m.config) for m in models]
    with torch.no_grad(), press(models[0], p), press(models[1], p):
        for model, ids, cache in zip(models, contexts, caches):
            model(ids, **{CACHE_KWARG: cache})
    third = prefill(models[0], contexts[1], p)

    assert p == before and hash(p) == before_hash
    assert vars(p) == before_state and vars(p.scorer) == scorer_state  # nothing added, nothing rebound
    chosen = []
    for model, ids, cache in [*zip(models, contexts, caches), (models[0], contexts[1], third)]:
        info = compression_info(cache, p)
        expected = QualityModel(-3.0, 12.0).retention(0.8, reference_context_nll(model, ids))
        assert info["retention"] == pytest.approx(min(1.0, max(0.05, expected)), rel=1e-4)
        assert info["context_nll"] == pytest.approx(reference_context_nll(model, ids), rel=1e-4)
        fixed = prefill(model, ids, CompactorPress(ratio=info["ratio"]))
        for idx in full_attention_layers(model.config):
            assert torch.equal(cache.layers[idx].keys, fixed.layers[idx].keys)
        chosen.append(info["ratio"])
    assert len(set(chosen)) == 3, chosen  # three contexts, three choices: none overwrote another
    assert compression_info(caches[0], CompactorPress(ratio="auto", quality=0.9)) is None  # recorded by p, not it
    assert compression_info(prefill(models[0], contexts[0], CompactorPress(ratio=0.5))) is None  # fixed: no record


def test_the_final_norm_comes_from_the_architecture_so_gpt_neox_calibrates(tmp_path):
    """GPT-NeoX's final norm is ``final_layer_norm`` (no ``norm``): its plugin Architecture says so, and a calibrated
    press then measures the context's NLL on it (the NLL computed naively) and compresses like a fixed press."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    import kvpress_like
    from kvpress_like.plugins import gpt_neox
    from kvpress_like.registry import architecture_for

    registered = "gpt_neox" in kvpress_like.list_architectures()
    if not registered:  # not installed through its entry point: the same hook at run time
        kvpress_like.register_plugin(gpt_neox, name="test_calibration_gpt_neox")
    try:
        torch.manual_seed(0)
        config = GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, rotary_pct=0.25, max_position_embeddings=512,
                               bos_token_id=None, eos_token_id=None, pad_token_id=None)
        model = GPTNeoXForCausalLM(config).eval()
        assert architecture_for(model.config).final_norm(model) is model.gpt_neox.final_layer_norm
        assert architecture_for(cached_tiny_model("llama").config).final_norm(cached_tiny_model("llama")) is \
            cached_tiny_model("llama").model.norm
        params = write_params(tmp_path / "p.json", model, {"compactor": {"alpha": -0.8, "beta": 1.0}})
        ids = random_ids(50, seed=8)
        p = CompactorPress(ratio="auto", quality=0.8, params=params)
        cache = prefill(model, ids, p)
        chosen = compression_info(cache, p)
        assert chosen["context_nll"] == pytest.approx(reference_context_nll(model, ids), rel=1e-4)
        fixed = prefill(model, ids, CompactorPress(ratio=chosen["ratio"]))
        for idx in range(2):
            assert cache.layers[idx].keys.shape[2] == keep_count(50, chosen["ratio"]) < 50
            assert torch.equal(cache.layers[idx].keys, fixed.layers[idx].keys)
    finally:
        if not registered:
            kvpress_like.unregister_plugin(gpt_neox)


def test_higher_quality_keeps_more_and_decoding_continues(tmp_path):
    model = cached_tiny_model("llama", "sdpa")
    params = write_params(tmp_path / "p.json", model, {"compactor": {"alpha": -0.8, "beta": 1.0}})
    ids = random_ids(80, seed=4)
    kept = []
    for quality in (0.3, 0.6, 0.9):
        p = CompactorPress(ratio="auto", quality=quality, params=params)
        cache = prefill(model, ids, p)
        kept.append(cache.layers[0].keys.shape[2])
        with torch.no_grad():  # the next token continues at position 80 without the press installed
            model(torch.tensor([[1]]), **{CACHE_KWARG: cache})
        assert cache.get_seq_length() == 81
    assert kept[0] < kept[1] < kept[2]


def test_nll_estimate_on_sampled_positions_is_close(tmp_path):
    model = cached_tiny_model("llama", "sdpa")
    params = write_params(tmp_path / "p.json", model)
    ids = random_ids(300, seed=5)
    p = CompactorPress(ratio="auto", params=params, nll_positions=100)
    cache = prefill(model, ids, p)
    assert compression_info(cache)["context_nll"] == pytest.approx(reference_context_nll(model, ids), rel=0.05)


def test_decode_steps_inside_the_press_do_not_recompress(tmp_path):
    model = cached_tiny_model("llama", "sdpa")
    params = write_params(tmp_path / "p.json", model)
    p = CompactorPress(ratio="auto", params=params)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), p(model):
        model(random_ids(50, seed=6), **{CACHE_KWARG: cache})
        stored = cache.layers[0].keys.shape[2]
        for token in range(3):
            model(torch.tensor([[token]]), **{CACHE_KWARG: cache})
    assert cache.layers[0].keys.shape[2] == stored + 3


def test_round_trip_through_a_dict(tmp_path):
    model = cached_tiny_model("llama", "sdpa")
    p = CompactorPress(ratio="auto", quality=0.9, params=write_params(tmp_path / "p.json", model), window=2)
    again = press_from_dict(json.loads(json.dumps(p.to_dict())))
    assert isinstance(again, CalibratedPress) and again.quality == 0.9 and again.scorer.window == 2


def test_shipped_calibration_file_is_what_the_documented_command_writes():
    """The shipped file holds what ``kvpress-like calibrate`` writes: the command, seed and time in its metadata,
    each press's configuration (the current defaults), and the measured points that the parameters were fitted on."""
    from kvpress_like.calibration import SHIPPED_DIR

    files = sorted(SHIPPED_DIR.glob("*.json"))
    assert files, "the package ships parameters for the embedded default model"
    for path in files:
        data = load_calibration(path)
        assert len(data["model"]["weights_sha256"]) == 64
        fit = data["fit"]
        assert fit["command"].startswith("kvpress-like calibrate ") and f"--output {path.relative_to(ROOT)}" in \
            fit["command"]
        assert fit["seed"] >= 1_000_000 and fit["seconds"] > 0  # disjoint from evaluation seeds (small numbers)
        assert "compactor" in data["presses"]  # ratio="auto" for other presses: fit them with kvpress-like calibrate
        for name, entry in data["presses"].items():
            assert entry["press"] == create_press(name).to_dict()  # fitted for the press as it is configured now
            points = entry["points"]
            assert len(points) == len(fit["tasks"]) * len(fit["lengths"]) * fit["samples_per_task"] * \
                len(fit["retentions"])
            refit = fit_quality_model([q["context_nll"] for q in points], [q["kept_fraction"] for q in points],
                                      [q["quality"] for q in points], over_weight=fit["over_weight"])
            model = QualityModel(entry["alpha"], entry["beta"])
            for nll in (2.0, 3.0):  # the parameters are the fit of the points (up to the optimiser's tolerance)
                assert refit.retention(0.9, nll) == pytest.approx(model.retention(0.9, nll), abs=0.02)
            assert 0 <= model.retention(0.5, 2.5) <= model.retention(0.95, 2.5) <= 1


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved with a word-level tokenizer (what ``--model DIR`` loads)."""
    return save_tiny_llama_dir(tmp_path_factory.mktemp("tiny_calibration_llama"))


def test_calibrate_command_writes_a_file_that_ratio_auto_reads(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from kvpress_like import cli

    output = tmp_path / "cal.json"
    assert cli.main(["calibrate", "--model", str(tiny_model_dir), "--press", "compactor", "knorm", "--lengths",
                     "256", "--samples", "2", "--tasks", "niah_single_1", "--output", str(output),
                     "--no-progress"]) == 0
    assert "saved:" in capsys.readouterr().out
    data = load_calibration(output)
    assert data["fit"]["command"] == (f"kvpress-like calibrate --press compactor knorm --lengths 256 --samples 2 "
                                      f"--seed 1000003 --tasks niah_single_1 --model {tiny_model_dir} "
                                      f"--output {output}")
    assert data["fit"]["seconds"] > 0
    assert data["fit"]["tasks"] == ["niah_single_1"] and data["fit"]["lengths"] == [256]
    assert set(data["presses"]) == {"compactor", "knorm"}
    for entry in data["presses"].values():
        assert len(entry["points"]) == 2 * 9  # samples x retentions
        for point in entry["points"]:
            assert point["kept_fraction"] == pytest.approx(point["retention"], abs=0.02)
            assert point["quality"] == pytest.approx(point["nll_full"] / point["nll_press"], rel=1e-4)
            assert set(point) >= {"context_nll", "log_length", "score_skew", "score_kurtosis", "score_top10"}

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert data["model"]["weights_sha256"] == model_fingerprint(model)
    ids = random_ids(120, seed=3)
    p = CompactorPress(ratio="auto", quality=0.8, params=str(output))
    cache = prefill(model, ids, p)
    entry = data["presses"]["compactor"]
    expected = QualityModel(entry["alpha"], entry["beta"]).retention(0.8, reference_context_nll(model, ids))
    chosen = compression_info(cache)
    assert chosen["retention"] == pytest.approx(min(1.0, max(0.05, expected)), rel=1e-4)
    assert cache.layers[0].keys.shape[2] == max(keep_count(120, chosen["ratio"]), 8 + 4)  # sinks and window kept


def test_one_recorded_prefill_compresses_like_a_fixed_press_at_every_ratio():
    from kvpress_like.calibration import ScoreRecorder, recorded_scores

    model = cached_tiny_model("llama", "sdpa")
    ids = random_ids(90, seed=7)
    recorder = ScoreRecorder.of({"compactor": CompactorPress(), "knorm": KnormPress()})
    full = prefill(model, ids, recorder)
    record = recorded_scores(full)
    assert record.nll == pytest.approx(reference_context_nll(model, ids), rel=1e-4)
    for name, make in (("compactor", CompactorPress), ("knorm", KnormPress)):
        for ratio in (0.3, 0.75):
            import copy

            cache = copy.deepcopy(full)
            record.compress_at(name, cache, ratio)
            fixed = prefill(model, ids, make(ratio=ratio))
            for idx in full_attention_layers(model.config):
                assert torch.equal(cache.layers[idx].keys, fixed.layers[idx].keys)
                assert torch.equal(cache.layers[idx].values, fixed.layers[idx].values)


@dataclass(frozen=True)
class KeyMeanScorer:
    """A scorer written as a plain class (no Press, so no dict form): each head's mean key coordinate."""

    needs = frozenset()
    supports_decoding = True
    score_depends_on_ratio = False
    is_plain_scorer = True
    acts_while_decoding = False

    def score(self, ctx):
        return ctx.keys.float().mean(dim=-1)  # [B, H_kv, S]


def naive_recorded(keys, kind, n_sink, window):
    """``[B, H, S]`` scores of ``keys`` ``[B, H, S, D]`` written with loops: ``-||k||`` (knorm) or the mean key
    coordinate (key_mean), ``+inf`` on the first ``n_sink`` and last ``window`` tokens (no padding)."""
    b, h, s, d = keys.shape
    out = torch.empty(b, h, s)
    for i in range(b):
        for j in range(h):
            for t in range(s):
                values = [float(keys[i, j, t, c]) for c in range(d)]
                if t < n_sink or t >= s - window:
                    out[i, j, t] = math.inf
                elif kind == "knorm":
                    out[i, j, t] = -math.sqrt(sum(v * v for v in values))
                else:
                    out[i, j, t] = sum(values) / d
    return out


def test_one_recorder_on_two_models_at_once_leaves_each_prefill_its_own_record():
    """One recorder installed on two models at once, then prefilling a third cache: each cache carries the scores of
    its own model and context (checked against the scores written naively from that model's cached keys) and its own
    NLL; a ScorerPress around a plain scorer is recorded and compresses like the fixed press; the recorder object is
    the same before and after (equal, same hash, same attributes)."""
    import copy

    from kvpress_like import ScorerPress, press
    from kvpress_like.calibration import ScoreRecorder, recorded_scores

    presses = {"knorm": KnormPress(window=2), "knorm_pyramid": KnormPress(window=2, allocator="pyramid"),
               "key_mean": ScorerPress(scorer=KeyMeanScorer(), n_sink=1)}
    recorder = ScoreRecorder.of(presses)
    before, before_hash, before_state = copy.deepcopy(recorder), hash(recorder), dict(vars(recorder))
    inner_state = {label: dict(vars(p)) for label, p in presses.items()}
    models = [cached_tiny_model("llama", "sdpa"), cached_tiny_model("qwen3", "sdpa")]
    contexts = [random_ids(70, seed=11), random_ids(50, seed=12)]
    caches = [DynamicCache(config=m.config) for m in models]
    with torch.no_grad(), press(models[0], recorder), press(models[1], recorder):
        for model, ids, cache in zip(models, contexts, caches):
            model(ids, **{CACHE_KWARG: cache})
    third_ids = random_ids(60, seed=13)
    third = prefill(models[0], third_ids, recorder)

    assert recorder == before and hash(recorder) == before_hash and vars(recorder) == before_state
    assert {label: vars(p) for label, p in presses.items()} == inner_state
    nlls = []
    for model, ids, cache in [*zip(models, contexts, caches), (models[0], third_ids, third)]:
        record = recorded_scores(cache)
        assert record.labels == ("knorm", "knorm_pyramid", "key_mean")
        assert record.nll == pytest.approx(reference_context_nll(model, ids), rel=1e-4)
        nlls.append(record.nll)
        plain = prefill(model, ids)  # the same model and context without a press: the keys the scorers read
        layers = full_attention_layers(model.config)
        for label, kind, n_sink, window in (("knorm", "knorm", 0, 2), ("key_mean", "key_mean", 1, 0)):
            assert sorted(record.scores[label]) == list(layers)
            for idx in layers:
                scores, protected, valid = record.scores[label][idx]
                expected = naive_recorded(plain.layers[idx].keys, kind, n_sink, window)
                torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
                assert valid.all() and protected.sum() == n_sink + window
        for idx in layers:  # presses that differ only in their allocator share one scoring
            assert record.scores["knorm_pyramid"][idx][0] is record.scores["knorm"][idx][0]
        for label, fixed_press in (("key_mean", ScorerPress(scorer=KeyMeanScorer(), n_sink=1, ratio=0.5)),
                                   ("knorm_pyramid", KnormPress(window=2, allocator="pyramid", ratio=0.5))):
            compressed = copy.deepcopy(cache)
            record.compress_at(label, compressed, 0.5)
            fixed = prefill(model, ids, fixed_press)
            for idx in layers:
                assert torch.equal(compressed.layers[idx].keys, fixed.layers[idx].keys)
                assert torch.equal(compressed.layers[idx].values, fixed.layers[idx].values)
        assert record.features("knorm")["log_length"] == pytest.approx(math.log(ids.shape[1]))
    assert len(set(nlls)) == 3  # three prefills, three records: none overwrote another


def test_a_recorded_cache_is_compressed_once_and_bad_recorders_are_refused():
    import copy

    from kvpress_like import ChunkKVPress
    from kvpress_like.calibration import ScoreRecorder, recorded_scores

    model = cached_tiny_model("llama", "sdpa")
    ids = random_ids(40, seed=14)
    full = prefill(model, ids, ScoreRecorder.of({"knorm": KnormPress()}))
    compressed = copy.deepcopy(full)
    record = recorded_scores(full)
    record.compress_at("knorm", compressed, 0.5)
    with pytest.raises(ValueError, match="holds no recorded scores"):
        recorded_scores(compressed)  # the compressed copy no longer carries the record
    with pytest.raises(ValueError, match="does not hold the recorded context in full"):
        record.compress_at("knorm", compressed, 0.3)
    with pytest.raises(KeyError, match="no press recorded under 'snapkv'; recorded: 'knorm'"):
        record.compress_at("snapkv", copy.deepcopy(full), 0.3)
    with pytest.raises(ValueError, match="holds no recorded scores"):
        recorded_scores(prefill(model, ids, KnormPress(ratio=0.5)))
    with pytest.raises(ValueError, match="non-empty dict"):
        ScoreRecorder.of({})
    with pytest.raises(ValueError, match="not a plain scorer"):
        ScoreRecorder.of({"chunkkv": ChunkKVPress(scorer=KnormPress())})
    with pytest.raises(ValueError, match="labels must be distinct non-empty strings"):
        ScoreRecorder(scorers=(("a", KnormPress()), ("a", KnormPress())))
    with pytest.raises(TypeError, match="no dict form"):
        ScoreRecorder.of({"knorm": KnormPress()}).to_dict()


def naive_statistics(recorded):
    skew, kurt, top = [], [], []
    for scores, protected, valid in recorded.values():
        for head in range(scores.shape[1]):
            x = [float(scores[0, head, t]) for t in range(scores.shape[2]) if valid[0, t] and not protected[0, t]]
            n = len(x)
            mean = sum(x) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in x) / n)
            z = [(v - mean) / std for v in x]
            skew.append(sum(v**3 for v in z) / n)
            kurt.append(sum(v**4 for v in z) / n - 3)
            k = max(1, n // 10)
            top.append(sum(sorted(z, reverse=True)[:k]) / k)
    return {"score_skew": sum(skew) / len(skew), "score_kurtosis": sum(kurt) / len(kurt),
            "score_top10": sum(top) / len(top)}


@settings(max_examples=25, deadline=None)
@given(layers=st.integers(1, 3), heads=st.integers(1, 3), length=st.integers(12, 60), seed=st.integers(0, 10_000))
def test_score_statistics_match_a_naive_reference(layers, heads, length, seed):
    from kvpress_like.calibration import score_statistics

    generator = torch.Generator().manual_seed(seed)
    recorded = {}
    for layer in range(layers):
        scores = torch.randn(1, heads, length, generator=generator).exp()  # skewed, like attention mass
        valid = torch.ones(1, length, dtype=torch.bool)
        valid[0, : int(torch.randint(0, 3, (1,), generator=generator))] = False  # left padding
        protected = torch.zeros(1, length, dtype=torch.bool)
        protected[0, -2:] = True
        scores = scores.masked_fill(protected[:, None], math.inf).masked_fill(~valid[:, None], -math.inf)
        recorded[layer] = (scores, protected, valid)
    got = score_statistics(recorded)
    for key, value in naive_statistics(recorded).items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9)
    # invariant: the statistics do not change when every score is scaled and shifted (they describe the shape)
    moved = {k: (s * 3.0 + 1.0, p, v) for k, (s, p, v) in recorded.items()}
    for key, value in score_statistics(moved).items():  # (up to the rounding of the moved fp32 scores)
        assert value == pytest.approx(got[key], rel=1e-4, abs=1e-6)


def test_batched_answer_nll_of_padded_rows_equals_each_cache_alone():
    import copy

    from kvpress_like import press
    from kvpress_like.calibration import ScoreRecorder, recorded_scores
    from kvpress_like.eval.calibration import answer_nlls, stack_padded

    model = cached_tiny_model("llama", "sdpa")
    ids, prompt, answer = random_ids(70, seed=8), random_ids(5, seed=9), random_ids(3, seed=10)
    recorder = ScoreRecorder.of({"compactor": CompactorPress()})
    full = prefill(model, ids, recorder)
    caches = [copy.deepcopy(full)]
    for ratio in (0.2, 0.5, 0.8):  # rows of different lengths, padded
        caches.append(copy.deepcopy(full))
        recorded_scores(full).compress_at("compactor", caches[-1], ratio)
    with torch.no_grad(), press(model, recorder):
        batched = answer_nlls(model, stack_padded(caches), prompt, answer)
        alone = [answer_nlls(model, c, prompt, answer)[0] for c in caches]
    assert batched == pytest.approx(alone, rel=1e-4)
    assert len(set(round(x, 4) for x in alone)) > 1  # the rows really differ


def test_save_calibration_refuses_what_load_would_refuse(tmp_path):
    from kvpress_like.calibration import save_calibration

    with pytest.raises(ValueError, match="finite 'alpha'"):
        save_calibration({"format": FORMAT, "model": {}, "presses": {"compactor": {"alpha": float("nan"), "beta": 0}}},
                         tmp_path / "bad.json")
    with pytest.raises(ValueError, match="points"):
        save_calibration({"format": FORMAT, "model": {}, "presses": {"compactor": {"alpha": 1, "beta": 0,
                                                                                    "points": 378}}},
                         tmp_path / "bad.json")
    assert not list(tmp_path.iterdir())  # nothing left behind


def test_calibrated_press_is_exported_at_the_top_level():
    import kvpress_like
    from kvpress_like.calibration import CalibratedPress as Defined

    assert kvpress_like.CalibratedPress is Defined
    assert "CalibratedPress" in kvpress_like.__all__
    assert isinstance(kvpress_like.CompactorPress(ratio="auto", quality=0.9), kvpress_like.CalibratedPress)
