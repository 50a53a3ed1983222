"""A press on a model dispatched with accelerate (``device_map`` with layers offloaded to disk) gives exactly what it
gives on the same model undispatched.

accelerate's hooks load an offloaded layer's weights when the decoder layer's forward starts and free them when it
ends; a press scores and compresses inside the attention forward, so the weights its scorer reads are there.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import random_ids, tiny_model, torch_threads

from kvpress_like import (
    CompactorPress,
    ExpectedAttentionPress,
    KnormPress,
    SnapKVPress,
    press,
)

accelerate = pytest.importorskip("accelerate")


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 4-layer tiny Llama and a copy dispatched with layers 1 and 3 offloaded to disk, 0 and 2 on the CPU."""
    model = tiny_model("llama", num_hidden_layers=4, seed=3)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu",
                  "lm_head": "cpu"}
    folder = tmp_path_factory.mktemp("offload")
    dispatched = accelerate.dispatch_model(copy.deepcopy(model), device_map=device_map, offload_dir=str(folder))
    assert dispatched.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    assert any(folder.iterdir())
    return model, dispatched


@pytest.mark.parametrize("make_press", [
    lambda: KnormPress(ratio=0.5),
    lambda: CompactorPress(ratio=0.6),  # leverage + non-causal attention, from the layer's own projections
    lambda: ExpectedAttentionPress(ratio=0.5),
    lambda: SnapKVPress(ratio=0.5, window=8, allocator="head_adaptive"),  # ragged per-head layers
    lambda: SnapKVPress(ratio=0.5, window=8, allocator="pyramid"),
], ids=["knorm", "compactor", "expected_attention", "snapkv_head_adaptive", "snapkv_pyramid"])
def test_generate_on_a_disk_offloaded_model_equals_the_undispatched_model(models, make_press):
    model, dispatched = models
    ids = random_ids(48, seed=4)
    with torch.no_grad():
        with press(model, make_press()):
            expected = model.generate(ids, do_sample=False, max_new_tokens=12, return_dict_in_generate=True)
        with press(dispatched, make_press()):
            got = dispatched.generate(ids, do_sample=False, max_new_tokens=12, return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected.sequences)
    for mine, theirs in zip(got.past_key_values.layers, expected.past_key_values.layers, strict=True):
        assert type(mine) is type(theirs) and type(mine).__name__ in ("CompressedLayer", "RaggedLayer")
        assert mine.get_seq_length() == theirs.get_seq_length() == 48 + 11
