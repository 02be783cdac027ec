"""`flare demo`: the main job end to end on an embedded default (see :mod:`.pipeline`, which
imports JAX: import ``run_demo`` from there)."""

from flare_jax.demo.settings import DemoSettings

__all__ = ["DemoSettings"]
