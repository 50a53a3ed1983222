"""Context-calibrated compression: the quality curve and its inverse, the asymmetric fit, parameter files, and the
calibrated press end to end on a tiny model."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import cached_tiny_model, full_attention_layers, prefill, random_ids
from transformers import DynamicCache

from kvpress_like import CompactorPress, KnormPress, create_press, press_from_dict
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
    with pytest.raises(ValueError, match="overrides"):
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
    assert p.last_context_nll == pytest.approx(nll, rel=1e-4)
    retention = QualityModel(-0.8, 1.0).retention(quality, nll)
    assert p.last_retention == pytest.approx(retention, rel=1e-6)
    assert p.last_ratio == pytest.approx(1 - retention, rel=1e-6)

    fixed = prefill(model, ids, CompactorPress(ratio=p.last_ratio))
    for idx in full_attention_layers(model.config):
        assert cache.layers[idx].keys.shape[2] == keep_count(60, p.last_ratio)
        assert torch.equal(cache.layers[idx].keys, fixed.layers[idx].keys)
        assert cache.layers[idx].get_seq_length() == 60


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
    prefill(model, ids, p)
    assert p.last_context_nll == pytest.approx(reference_context_nll(model, ids), rel=0.05)


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


def test_shipped_calibration_files_are_valid_and_cover_the_built_in_scorers():
    from kvpress_like.calibration import SHIPPED_DIR

    files = sorted(SHIPPED_DIR.glob("*.json"))
    assert files, "the package ships parameters for the embedded default model"
    for path in files:
        data = load_calibration(path)
        assert len(data["model"]["weights_sha256"]) == 64
        assert {"compactor", "snapkv", "knorm", "leverage"} <= set(data["presses"])
        for entry in data["presses"].values():
            assert entry["points"] > 0
            # predicted retention for a typical context NLL is a valid fraction, and grows with the quality asked
            model = QualityModel(entry["alpha"], entry["beta"])
            assert 0 <= model.retention(0.5, 2.5) <= model.retention(0.95, 2.5) <= 1


def test_calibrated_press_is_exported_at_the_top_level():
    import kvpress_like
    from kvpress_like.calibration import CalibratedPress as Defined

    assert kvpress_like.CalibratedPress is Defined
    assert "CalibratedPress" in kvpress_like.__all__
    assert isinstance(kvpress_like.CompactorPress(ratio="auto", quality=0.9), kvpress_like.CalibratedPress)
