"""Plugin hook specifications (pluggy project name ``kvpress_like``).

A plugin is a module or object with functions decorated by :data:`kvpress_like.hookimpl`. Each hook receives a
``register`` callback; call it once per thing the plugin adds. The built-in plugin
(:mod:`kvpress_like.plugins.builtin`) registers every built-in press, allocator and architecture through these
same hooks.
"""

import pluggy

hookspec = pluggy.HookspecMarker("kvpress_like")


@hookspec
def register_presses(register):
    """Register presses: ``register(name, press_class)``.

    ``name`` is lower-case snake case (``"snapkv"``); ``press_class`` is a subclass of :class:`kvpress_like.Press`
    whose constructor takes keyword arguments (``ratio=...``). A press is configuration: run state goes on the
    installation (``LayerContext.state``), never on the press.
    """


@hookspec
def register_allocators(register):
    """Register budget allocators: ``register(name, allocator_class)``.

    ``allocator_class`` is a subclass of :class:`kvpress_like.Allocator`. ``allocator="name"`` constructs it with
    no arguments; an allocator that needs arguments (like ``per_layer``) raises a ``TypeError`` saying so and is
    passed as an instance instead (``allocator=PerLayerAllocator(ratios=[...])``). It keeps each constructor argument
    as a public attribute of the same name, so that it compares, hashes and serialises with its parameters
    (``Allocator.to_dict`` / ``kvpress_like.registry.allocator_from_dict``).
    """


@hookspec
def register_architectures(register):
    """Register architecture families: ``register(architecture)``.

    ``architecture`` is a :class:`kvpress_like.Architecture` (a subclass overrides what differs from the default
    layout: layer discovery, call arguments, projections, the fused-projection split, q/k norms, scale); it is used for
    every ``config.model_type`` listed in its ``model_types``. ``kvpress_like.plugins.gpt_neox`` and
    ``kvpress_like.plugins.olmo2`` are examples.
    """
