"""Plugins: a real third-party distribution loaded through its entry point, and plugins registered at run time.

The throwaway distribution in ``tests/fixtures/throwaway_plugin`` (``kvpress-like-throwaway``, module
``kvpress_throwaway``) is pip-installed into the test environment for this module and uninstalled afterwards. Entry
points are read when the plugin manager is created, so every check of the installed plugin runs in a fresh
interpreter (a subprocess).

Every hook in :mod:`kvpress_like.hookspecs` has a ``test_hook_<name>`` test here and is documented in
``docs/plugins.md`` (checked by :func:`test_every_hookspec_is_documented_and_tested`).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvpress_like
from kvpress_like import hookspecs, registry
from kvpress_like.cache import CACHE_KWARG

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "throwaway_plugin"
DISTRIBUTION = "kvpress-like-throwaway"
TIMEOUT = 300


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """Install the throwaway distribution (offline: no index, no dependencies), uninstall it afterwards."""
    # Create this process's plugin manager now, so the plugin installed below is only ever seen by subprocesses.
    registry.plugin_manager()
    source = tmp_path_factory.mktemp("throwaway") / "throwaway_plugin"
    shutil.copytree(FIXTURE, source)  # pip builds in the source tree: keep build/ and egg-info out of the repo
    common = ("install", "--no-deps", "--no-index", "--no-input", "--disable-pip-version-check", str(source))
    result = _pip(*common[:-1], "--no-build-isolation", common[-1])
    if result.returncode != 0:
        # An old setuptools without the `wheel` package cannot build in place; an isolated build can.
        retry = _pip("install", "--no-deps", "--no-input", "--disable-pip-version-check", str(source))
        if retry.returncode != 0:
            pytest.fail(f"could not install the throwaway plugin:\n{result.stdout}\n{result.stderr}\n"
                        f"{retry.stdout}\n{retry.stderr}")
    try:
        yield source
    finally:
        _pip("uninstall", "--yes", "--disable-pip-version-check", DISTRIBUTION)


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != registry.DISABLE_ENV}
    env.update(extra)
    return env


def _cli(*args: str, **env: str) -> str:
    script = Path(sysconfig.get_path("scripts")) / "kvpress-like"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "kvpress_like.cli"]
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=TIMEOUT, env=_env(**env),
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return result.stdout


PROBE = r"""
import json
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
import kvpress_like
from kvpress_like.cache import CACHE_KWARG

out = {"presses": kvpress_like.list_presses(), "plugins": kvpress_like.list_plugins()}
if "throwaway_first" in out["presses"]:
    p = kvpress_like.create_press("throwaway_first", ratio=0.5)
    out["class"] = type(p).__module__ + "." + type(p).__qualname__
    out["ratio"] = p.ratio
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 13))
    full, cache = DynamicCache(config=config), DynamicCache(config=config)
    with torch.no_grad():
        model(ids, **{CACHE_KWARG: full})
        with kvpress_like.press(model, p):
            model(ids, **{CACHE_KWARG: cache})
    out["kept"] = [layer.keys.shape[-2] for layer in cache.layers]
    out["seq_length"] = cache.get_seq_length()
    out["allocators"] = kvpress_like.list_allocators()
    ragged = DynamicCache(config=config)
    skewed = kvpress_like.KnormPress(ratio=0.5, allocator="throwaway_first_head")
    with torch.no_grad(), kvpress_like.press(model, skewed):
        model(ids, **{CACHE_KWARG: ragged})
    out["head_counts"] = [layer.lengths[0].tolist() for layer in ragged.layers]
    out["kept_earliest"] = all(
        torch.equal(c.keys, f.keys[:, :, : c.keys.shape[-2]]) for c, f in zip(cache.layers, full.layers)
    )
print(json.dumps(out))
"""


def _probe(**env: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=TIMEOUT,
                            env=_env(**env), stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- the installed distribution ------------------------------------------------------------------------------------
def test_distribution_press_is_listed_created_and_applied(installed_plugin):
    out = _probe()
    assert "throwaway_first" in out["presses"]
    assert "snapkv" in out["presses"]  # the built-in plugin is still there
    assert out["class"] == "kvpress_throwaway.ThrowawayFirstPress"
    assert out["ratio"] == 0.5
    # 13 tokens at ratio 0.5: 13 - floor(6.5) = 7 kept per head in each of the 2 layers; positions stay logical.
    assert out["kept"] == [7, 7]
    assert out["seq_length"] == 13
    assert out["kept_earliest"] is True
    plugin = next(p for p in out["plugins"] if p["name"] == "throwaway")
    assert plugin["hooks"] == ["register_allocators", "register_presses"]
    # The plugin's allocator works with a built-in scorer; unequal heads are stored ragged.
    assert "throwaway_first_head" in out["allocators"]
    assert out["head_counts"] == [[13, 1], [13, 1]]
    assert plugin["version"] == "0.0.1"


def test_distribution_listed_by_cli(installed_plugin):
    presses = _cli("presses")
    line = next(line for line in presses.splitlines() if line.split()[:1] == ["throwaway_first"])
    assert "kvpress_throwaway.ThrowawayFirstPress" in line
    assert "Keeps the earliest tokens" in line
    plugins = _cli("plugins")
    line = next(line for line in plugins.splitlines() if line.split()[:1] == ["throwaway"])
    assert line.split()[1] == "0.0.1"
    assert "register_presses" in line
    assert any(line.split()[:1] == ["builtin"] for line in plugins.splitlines())


def test_distribution_not_loaded_when_disabled(installed_plugin):
    out = _probe(**{registry.DISABLE_ENV: "1"})
    assert "throwaway_first" not in out["presses"]
    assert "snapkv" in out["presses"]
    assert [p["name"] for p in out["plugins"]] == ["builtin"]
    plugins = _cli("plugins", **{registry.DISABLE_ENV: "1"})
    assert "throwaway" not in plugins
    assert "disabled" in plugins


# -- plugins registered at run time: one test per hook ---------------------------------------------------------------
def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _prefill(model, p, n_tokens: int = 13) -> DynamicCache:
    ids = torch.randint(0, 128, (1, n_tokens), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), kvpress_like.press(model, p):
        model(ids, **{CACHE_KWARG: cache})
    return cache


@dataclass
class _LatestPress(kvpress_like.Press):
    """Keeps the most recent tokens (score = index)."""

    name = "runtime_latest"

    def score(self, ctx):
        b, h, s, _ = ctx.keys.shape
        return torch.arange(s, dtype=torch.float32).expand(b, h, s)


class _KeepAllAllocator(kvpress_like.Allocator):
    """Every head keeps every real token, whatever the ratio."""

    name = "runtime_keep_all"

    def allocate(self, scores, valid, protected, ratio, layer_idx, num_layers):
        return valid.sum(-1)[:, None].expand(scores.shape[0], scores.shape[1]).clone()


class _RuntimePlugin:
    """A throwaway plugin class: one hook implementation per hookspec."""

    @kvpress_like.hookimpl
    def register_presses(self, register):
        register("runtime_latest", _LatestPress)

    @kvpress_like.hookimpl
    def register_allocators(self, register):
        register("runtime_keep_all", _KeepAllAllocator)

    @kvpress_like.hookimpl
    def register_architectures(self, register):
        from transformers.models.llama import modeling_llama

        register(kvpress_like.Architecture("runtime_llama", ("runtime_llama",), modeling_llama.apply_rotary_pos_emb))


@pytest.fixture
def runtime_plugin():
    plugin = _RuntimePlugin()
    kvpress_like.register_plugin(plugin, name="runtime")
    try:
        yield plugin
    finally:
        if registry.plugin_manager().is_registered(plugin):
            kvpress_like.unregister_plugin(plugin)


def test_runtime_plugin_is_listed_and_unregistered(runtime_plugin):
    listed = {p["name"]: p for p in kvpress_like.list_plugins()}
    assert listed["runtime"]["hooks"] == ["register_allocators", "register_architectures", "register_presses"]
    assert listed["runtime"]["version"] is None
    kvpress_like.unregister_plugin(runtime_plugin)
    assert "runtime" not in {p["name"] for p in kvpress_like.list_plugins()}
    assert "runtime_latest" not in kvpress_like.list_presses()
    assert "runtime_keep_all" not in kvpress_like.list_allocators()
    assert "runtime_llama" not in kvpress_like.list_architectures()


def test_registering_twice_names_the_plugin(runtime_plugin):
    with pytest.raises(registry.PluginError, match="plugin 'runtime' is already registered"):
        kvpress_like.register_plugin(runtime_plugin, name="runtime")  # the same object again
    with pytest.raises(registry.PluginError, match="plugin 'runtime' is already registered"):
        kvpress_like.register_plugin(_RuntimePlugin(), name="runtime")  # another object under a taken name
    assert "runtime_latest" in kvpress_like.list_presses()  # the first registration still works


def test_hook_register_presses(runtime_plugin):
    assert "runtime_latest" in kvpress_like.list_presses()
    p = kvpress_like.create_press("runtime_latest", ratio=0.5)
    assert isinstance(p, _LatestPress)
    model = _tiny_llama()
    full = _prefill(model, kvpress_like.create_press("runtime_latest", ratio=0.0))
    cache = _prefill(model, p)
    for compressed, reference in zip(cache.layers, full.layers, strict=True):
        assert compressed.keys.shape[-2] == 7  # 13 - floor(6.5)
        assert torch.equal(compressed.keys, reference.keys[:, :, -7:])
    kvpress_like.unregister_plugin(runtime_plugin)
    with pytest.raises(ValueError, match="unknown press 'runtime_latest'"):
        kvpress_like.create_press("runtime_latest", ratio=0.5)


def test_hook_register_allocators(runtime_plugin):
    assert "runtime_keep_all" in kvpress_like.list_allocators()
    # A registered allocator works with any scorer, by name.
    p = kvpress_like.SnapKVPress(ratio=0.5, window=4, allocator="runtime_keep_all")
    cache = _prefill(_tiny_llama(), p)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [13, 13]
    kvpress_like.unregister_plugin(runtime_plugin)
    with pytest.raises(ValueError, match="unknown allocator 'runtime_keep_all'"):
        kvpress_like.SnapKVPress(ratio=0.5, allocator="runtime_keep_all")


def test_hook_register_architectures(runtime_plugin):
    model = _tiny_llama()
    model.config.model_type = "runtime_llama"
    assert kvpress_like.list_architectures()["runtime_llama"] == ("runtime_llama",)
    cache = _prefill(model, kvpress_like.KnormPress(ratio=0.5))
    assert [layer.keys.shape[-2] for layer in cache.layers] == [7, 7]
    kvpress_like.unregister_plugin(runtime_plugin)
    with pytest.raises(ValueError, match="unsupported model type 'runtime_llama'"):
        _prefill(model, kvpress_like.KnormPress(ratio=0.5))


# -- meta-test -------------------------------------------------------------------------------------------------------
def _hookspec_names() -> list[str]:
    return sorted(
        name for name, obj in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(obj, f"{registry.PROJECT}_spec")
    )


def test_every_hookspec_is_documented_and_tested():
    names = _hookspec_names()
    assert "register_presses" in names
    docs = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    undocumented = [name for name in names if f"`{name}" not in docs]
    assert not undocumented, f"hooks missing from docs/plugins.md: {undocumented}"
    untested = [name for name in names if not callable(globals().get(f"test_hook_{name}"))]
    assert not untested, f"hooks without a test_hook_<name> test: {untested}"


# -- broken plugins: the error names the plugin and says how to disable plugins ----------------------------------------
class _RaisingPlugin:
    @kvpress_like.hookimpl
    def register_presses(self, register):
        raise RuntimeError("boom in the plugin")


class _BadNamePlugin:
    @kvpress_like.hookimpl
    def register_allocators(self, register):
        register("Not Snake", _KeepAllAllocator)


class _MisspelledPlugin:
    @kvpress_like.hookimpl
    def register_press(self, register):  # the hook is register_presses
        register("never", _LatestPress)


@pytest.fixture
def broken_plugin(request):
    plugin = request.param()
    kvpress_like.register_plugin(plugin, name="broken")
    try:
        yield plugin
    finally:
        if registry.plugin_manager().is_registered(plugin):
            kvpress_like.unregister_plugin(plugin)


@pytest.mark.parametrize("broken_plugin, match", [
    (_RaisingPlugin, "plugin 'broken' failed in its register_presses hook: RuntimeError: boom in the plugin"),
    (_BadNamePlugin, "plugin 'broken' failed in its register_allocators hook: ValueError: allocator name must be"),
], indirect=["broken_plugin"], ids=["raises", "bad_name"])
def test_a_raising_plugin_hook_is_named(broken_plugin, match, capsys):
    from kvpress_like.cli import main

    hint = f"{registry.DISABLE_ENV}=1 to disable third-party plugins"
    for call in (lambda: kvpress_like.create_press("snapkv", ratio=0.5), kvpress_like.list_presses,
                 lambda: kvpress_like.press(_tiny_llama(), kvpress_like.KnormPress(ratio=0.5)).__enter__()):
        with pytest.raises(registry.PluginError, match=match) as info:
            call()
        assert hint in str(info.value)
    assert main(["presses"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kvpress-like: error: plugin 'broken'") and hint in err and "Traceback" not in err
    kvpress_like.unregister_plugin(broken_plugin)
    assert "snapkv" in kvpress_like.list_presses()


def test_a_misspelled_hook_is_rejected():
    plugin = _MisspelledPlugin()
    with pytest.raises(registry.PluginError, match="plugin 'misspelled': unknown hook 'register_press'.*"
                                                   "register_presses"):
        kvpress_like.register_plugin(plugin, name="misspelled")
    assert not registry.plugin_manager().is_registered(plugin)
    assert "snapkv" in kvpress_like.list_presses()


def _fake_entry_point_plugin(tmp_path, monkeypatch, source: str) -> None:
    """A distribution ``fake-dist`` whose entry point ``fake`` (group ``kvpress_like``) is the module ``source``;
    the plugin manager is created afresh so that it loads it."""
    import importlib.metadata

    (tmp_path / "fake_kvpress_plugin.py").write_text(source, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_kvpress_plugin", raising=False)

    class FakeDist:
        metadata = {"name": "fake-dist"}
        version = "1.0"
        entry_points = [importlib.metadata.EntryPoint("fake", "fake_kvpress_plugin", registry.PROJECT)]

    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [FakeDist()])
    monkeypatch.delenv(registry.DISABLE_ENV, raising=False)
    monkeypatch.setattr(registry, "_manager", None)
    monkeypatch.setattr(registry, "_tables", None)


@pytest.mark.parametrize("source, match", [
    ("from kvpress_like import hookimpl\n@hookimpl\ndef register_presses(register):\n    raise KeyError('oops')\n",
     "plugin 'fake' failed in its register_presses hook: KeyError"),
    ("from kvpress_like import hookimpl\n@hookimpl\ndef register_allocator(register):\n    pass\n",
     "plugin 'fake': unknown hook 'register_allocator'"),
    ("raise ImportError('missing dependency')\n", r"third-party plugin 'fake' \(fake_kvpress_plugin\) failed to load: "
     "ImportError: missing dependency"),
], ids=["hook_raises", "misspelled_hook", "import_fails"])
def test_a_broken_entry_point_plugin_is_named(source, match, tmp_path, monkeypatch):
    _fake_entry_point_plugin(tmp_path, monkeypatch, source)
    with pytest.raises(registry.PluginError, match=match) as info:
        kvpress_like.list_presses()
    assert f"{registry.DISABLE_ENV}=1" in str(info.value)
    monkeypatch.setenv(registry.DISABLE_ENV, "1")
    monkeypatch.setattr(registry, "_manager", None)
    monkeypatch.setattr(registry, "_tables", None)
    assert "snapkv" in kvpress_like.list_presses()
