"""Plugin registry: presses, allocators and architectures registered through pluggy hooks.

Third-party plugins are packages exposing an entry point in the group ``kvpress_like``; they are loaded lazily,
once, the first time the registry is consulted. Set ``KVPRESS_LIKE_NO_PLUGINS=1`` to skip loading them (the
built-in plugin is always loaded).

The registry sits below the presses: it imports no press, scorer or plugin module. The plugins listed in
:data:`DEFAULT_PLUGINS` (the built-in one) are loaded by name, as entry points are, and :mod:`kvpress_like.press`
declares the class registered presses must derive from (:func:`declare_press_class`), so that a press can look up
allocators and other presses by name without an import cycle.

A plugin that fails to load, implements a hook that does not exist (e.g. a misspelled name), or whose hook raises
makes the registry raise a :class:`PluginError` naming the plugin.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass, field

import pluggy

from . import hookspecs

PROJECT = "kvpress_like"
DISABLE_ENV = "KVPRESS_LIKE_NO_PLUGINS"
hookimpl = pluggy.HookimplMarker(PROJECT)
_DISABLE_HINT = f"set {DISABLE_ENV}=1 to disable third-party plugins"
DEFAULT_PLUGINS = ("kvpress_like.plugins.builtin",)  # always loaded, by name (registered as their last component)


class PluginError(RuntimeError):
    """A plugin failed to load, implements an unknown hook, or one of its hooks raised; the message names it."""


@dataclass
class _Tables:
    presses: dict = field(default_factory=dict)
    allocators: dict = field(default_factory=dict)
    architectures: dict = field(default_factory=dict)  # name -> Architecture
    by_model_type: dict = field(default_factory=dict)  # model_type -> Architecture


_manager: pluggy.PluginManager | None = None
_tables: _Tables | None = None
_press_class: type | None = None


def declare_press_class(cls: type) -> None:
    """Declare the base class every registered press must derive from (:class:`kvpress_like.Press`, declared by
    :mod:`kvpress_like.press` when it is imported)."""
    global _press_class
    _press_class = cls


def plugin_manager() -> pluggy.PluginManager:
    """The plugin manager, created on first use with the built-in plugin and the installed entry points."""
    global _manager
    if _manager is None:
        manager = pluggy.PluginManager(PROJECT)
        manager.add_hookspecs(hookspecs)
        for dotted in DEFAULT_PLUGINS:
            manager.register(importlib.import_module(dotted), name=dotted.rsplit(".", 1)[-1])
        if os.environ.get(DISABLE_ENV, "") in ("", "0"):
            try:
                manager.load_setuptools_entrypoints(PROJECT)
            except Exception as error:
                pending = [f"{ep.name!r} ({ep.value})" for dist in importlib.metadata.distributions()
                           for ep in dist.entry_points if ep.group == PROJECT and manager.get_plugin(ep.name) is None]
                raise PluginError(f"third-party plugin {pending[0] if pending else '?'} failed to load: "
                                  f"{type(error).__name__}: {error}; {_DISABLE_HINT}") from error
            _check_hooks(manager)
        _manager = manager
    return _manager


def _check_hooks(manager: pluggy.PluginManager, plugin=None) -> None:
    """Refuse hook implementations that match no hook specification (a misspelled hook name); ``plugin`` is
    unregistered first when given."""
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as error:
        name = manager.get_name(error.plugin)
        if plugin is not None:
            manager.unregister(plugin)
        known = ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("register_")))
        raise PluginError(f"plugin {name!r}: {error} (the hooks are: {known}); {_DISABLE_HINT}") from error


def register_plugin(plugin, name: str | None = None) -> None:
    """Register a plugin object or module at run time (useful in tests and notebooks).

    Raises:
        PluginError: the plugin implements a hook that does not exist or with arguments the hook does not have.
    """
    manager = plugin_manager()
    try:
        manager.register(plugin, name=name)
    except pluggy.PluginValidationError as error:
        raise PluginError(f"plugin {name or plugin!r}: {error}") from error
    except ValueError as error:  # pluggy: the name or the object is already registered
        raise PluginError(f"plugin {name or plugin!r} is already registered (unregister_plugin() it first, or "
                          f"register it under another name): {error}") from error
    _check_hooks(manager, plugin)
    _invalidate()


def unregister_plugin(plugin) -> None:
    """Remove a plugin registered with :func:`register_plugin`."""
    plugin_manager().unregister(plugin)
    _invalidate()


def _invalidate() -> None:
    global _tables
    _tables = None


def _collect() -> _Tables:
    global _tables
    if _tables is not None:
        return _tables
    from .allocators.base import Allocator  # (not at import: `import kvpress_like.registry` stays free of torch)
    from .patches.base import Architecture

    tables = _Tables()
    hook = plugin_manager().hook

    def add(table: dict, kind: str, name: str, obj) -> None:
        if not isinstance(name, str) or not name or name != name.lower() or " " in name:
            raise ValueError(f"{kind} name must be a non-empty lower-case snake_case string; got {name!r}")
        if name in table and table[name] is not obj:
            raise ValueError(f"two plugins register a {kind} named {name!r}: {table[name]!r} and {obj!r}")
        table[name] = obj

    def register_press(name, cls):
        if not (isinstance(cls, type) and _press_class is not None and issubclass(cls, _press_class)):
            raise TypeError(f"register_presses: {name!r} must be a Press subclass, got {cls!r}")
        add(tables.presses, "press", name, cls)

    def register_allocator(name, cls):
        if not (isinstance(cls, type) and issubclass(cls, Allocator)):
            raise TypeError(f"register_allocators: {name!r} must be an Allocator subclass, got {cls!r}")
        add(tables.allocators, "allocator", name, cls)

    def register_architecture(arch):
        if not isinstance(arch, Architecture):
            raise TypeError(f"register_architectures takes an Architecture, got {arch!r}")
        add(tables.architectures, "architecture", arch.name, arch)
        for model_type in arch.model_types:
            add(tables.by_model_type, "model type", model_type, arch)

    for hook_name, callback in (("register_presses", register_press), ("register_allocators", register_allocator),
                                ("register_architectures", register_architecture)):
        for impl in reversed(getattr(hook, hook_name).get_hookimpls()):  # pluggy's call order
            try:
                impl.function(*[callback for _ in impl.argnames])  # the hooks' only argument is `register`
            except Exception as error:
                raise PluginError(f"plugin {impl.plugin_name!r} failed in its {hook_name} hook: "
                                  f"{type(error).__name__}: {error}; {_DISABLE_HINT}") from error
    _tables = tables
    return tables


def list_presses() -> list[str]:
    """Names of every registered press, sorted."""
    return sorted(_collect().presses)


def list_allocators() -> list[str]:
    """Names of every registered allocator, sorted."""
    return sorted(_collect().allocators)


def list_architectures() -> dict[str, tuple[str, ...]]:
    """Registered architecture names and the model types each covers."""
    return {name: arch.model_types for name, arch in sorted(_collect().architectures.items())}


def list_plugins() -> list[dict]:
    """Every loaded plugin: ``{"name", "hooks", "version"}`` (version for entry-point plugins)."""
    manager = plugin_manager()
    versions = {id(plugin): dist.version for plugin, dist in manager.list_plugin_distinfo()}
    result = []
    for plugin in manager.get_plugins():
        hooks = sorted(h.name for h in manager.get_hookcallers(plugin) or [])
        result.append({"name": manager.get_name(plugin), "hooks": hooks, "version": versions.get(id(plugin))})
    return sorted(result, key=lambda item: item["name"])


def get_press_class(name: str):
    """The press class registered as ``name``."""
    presses = _collect().presses
    if name not in presses:
        raise ValueError(f"unknown press {name!r}; known presses: {', '.join(sorted(presses))}")
    return presses[name]


def create_press(name: str, **kwargs):
    """Create a registered press by name: ``create_press("snapkv", ratio=0.5)``."""
    return get_press_class(name)(**kwargs)


def press_from_dict(data: dict):
    """Inverse of :meth:`Press.to_dict`: ``{"press": name, **parameters}`` -> a press (nested presses and allocators
    with their parameters too: ``{"allocator": "pyramid", "beta": 5.0}``)."""
    if not isinstance(data, dict) or not isinstance(data.get("press"), str):
        raise ValueError(f"press_from_dict takes {{'press': name, **parameters}}; got {data!r}")
    params = {}
    for key, value in data.items():
        if isinstance(value, dict) and "press" in value:
            value = press_from_dict(value)
        elif isinstance(value, dict) and "allocator" in value:
            value = allocator_from_dict(value)
        params[key] = value
    return create_press(params.pop("press"), **params)


def allocator_from_dict(data: dict):
    """Inverse of :meth:`Allocator.to_dict`: ``{"allocator": name, **parameters}`` -> an allocator."""
    if not isinstance(data, dict) or not isinstance(data.get("allocator"), str):
        raise ValueError(f"allocator_from_dict takes {{'allocator': name, **parameters}}; got {data!r}")
    params = dict(data)
    return get_allocator_class(params.pop("allocator"))(**params)


def parse_press_params(items: list[str] | None) -> dict:
    """``["window=32", "allocator=uniform"]`` -> ``{"window": 32, "allocator": "uniform"}`` (the parameters of a
    press written as text, as ``kvpress-like run --press-arg`` and the evaluation grid's ``name:key=value,...`` do).

    Values are read as Python literals (numbers, booleans, None, quoted strings) and kept as strings otherwise.

    Raises:
        ValueError: an item is not ``key=value`` with an identifier as key, or sets the ratio (given on its own).
    """
    import ast

    result = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"takes key=value (e.g. window=32); got {item!r}")
        if key in ("ratio", "compression_ratio"):
            raise ValueError(f"cannot set the ratio ({item!r}): it is given on its own")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        result[key] = value
    return result


def get_allocator_class(name: str):
    """The allocator class registered as ``name``."""
    allocators = _collect().allocators
    if name not in allocators:
        raise ValueError(f"unknown allocator {name!r}; known allocators: {', '.join(sorted(allocators))}")
    return allocators[name]


def get_allocator(name: str):
    """A new instance (no arguments) of the allocator registered as ``name``."""
    return get_allocator_class(name)()


def architecture_for(config):
    """The architecture covering ``config.model_type``; a clear error names the supported ones otherwise."""
    tables = _collect()
    model_type = getattr(config, "model_type", None)
    if model_type not in tables.by_model_type:
        supported = ", ".join(f"{name} ({'/'.join(a.model_types)})" for name, a in sorted(tables.architectures.items()))
        raise ValueError(
            f"unsupported model type {model_type!r}. Supported architectures: {supported}. "
            "A plugin can add one with the `register_architectures` hook."
        )
    return tables.by_model_type[model_type]
