"""Which BN layers depend on which, found by tracing the model (no compute).

`plate_stats` (`jaxadapt.adapt.bn_plate`) must finalize a layer's statistics before the
layers that read its output: `layer_levels` groups the BN layers by dependency depth, and
`_carry_plan` cuts the traced model into one `jaxadapt.adapt.staged` stage per group,
whose carried activations `carry_bytes` sizes.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.adapt import staged
from jaxadapt.adapt.base import Variables
from jaxadapt.adapt.bn_tree import LayerPath, running_norm_stats


def _path(keypath) -> LayerPath:
    return tuple(str(getattr(k, "key", k)) for k in keypath)


def _var_struct(variables: Variables) -> tuple:
    flat, tree = jax.tree.flatten(variables)
    return tree, tuple(jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in flat)


@functools.lru_cache(maxsize=32)
def _levels_cached(model: nn.Module, var_struct, shape: tuple, dtype) -> tuple:
    variables = jax.tree.unflatten(var_struct[0], var_struct[1])
    placeholder = running_norm_stats(variables)
    leaves, _ = jax.tree_util.tree_flatten_with_path(placeholder)
    layers = sorted({_path(kp)[:-1] for kp, _ in leaves})
    index = {p: i for i, p in enumerate(layers)}
    x = jax.ShapeDtypeStruct(shape, dtype)

    def suff(norm_stats, variables, images):
        _, upd = model.apply({**variables, "norm_stats": norm_stats}, images,
                             norm_mode="given", mutable=["suff_stats"])
        return upd["suff_stats"]

    closed = jax.make_jaxpr(suff)(placeholder, variables, x)
    in_deps = [frozenset([index[_path(kp)[:-1]]]) for kp, _ in leaves]
    in_deps += [frozenset()] * (len(closed.jaxpr.invars) - len(in_deps))
    out_deps = staged.propagate(closed.jaxpr, in_deps)
    out_leaves, _ = jax.tree_util.tree_flatten_with_path(
        jax.eval_shape(suff, placeholder, variables, x))
    deps: dict[int, frozenset] = {}
    for (kp, _), d in zip(out_leaves, out_deps):
        i = index[_path(kp)[:-1]]
        deps[i] = deps.get(i, frozenset()) | d
    level: dict[int, int] = {}
    while len(level) < len(deps):
        ready = [i for i in deps if i not in level and all(j in level for j in deps[i])]
        if not ready:  # a self-dependency: the analysis could not separate the layers
            raise RuntimeError(
                "plate_stats: could not order the BN layers (a layer's input seems to "
                "depend on its own statistics); this model is not supported by plate_stats")
        for i in ready:
            level[i] = 1 + max((level[j] for j in deps[i]), default=-1)
    groups = [tuple(layers[i] for i in sorted(level) if level[i] == lv)
              for lv in range(max(level.values()) + 1)] if level else []
    return tuple(groups)


def layer_levels(model: nn.Module, variables: Variables,
                 image_shape: Sequence[int], dtype: Any = jnp.float32) -> tuple:
    """BN layers grouped by dependency depth: group k's inputs depend only on groups < k.

    Found by tracing (no compute): which ``norm_stats`` entries each layer's sufficient
    statistics depend on. For ResNet-18 this gives 17 groups for its 20 BN layers (a
    projection shortcut's BN shares a group with its block's first BN); ResNet-50: 49/53.

    Args:
      model: the model.
      variables: its variables (only shapes are used).
      image_shape: one chunk's shape ``[B, H, W, C]``.
      dtype: image dtype.

    Returns:
      Tuple of groups, each a tuple of layer paths.
    """
    return _levels_cached(model, _var_struct(variables), tuple(int(s) for s in image_shape),
                          jnp.dtype(dtype))


@functools.lru_cache(maxsize=16)
def _carry_plan(model: nn.Module, var_struct, shape: tuple, dtype, mask_dtype) -> tuple:
    """The staged plan of ``suff(norm_stats, variables, images, mask)``: stage k makes
    group k's statistics; the inputs of group g become ready at stage g + 1."""
    variables = jax.tree.unflatten(var_struct[0], var_struct[1])
    placeholder = running_norm_stats(variables)
    groups = _levels_cached(model, var_struct, shape, dtype)
    level = {p: g for g, group in enumerate(groups) for p in group}

    def suff(norm_stats, variables, images, mask):
        _, upd = model.apply({**variables, "norm_stats": norm_stats}, images,
                             norm_mode="given", stats_mask=mask, mutable=["suff_stats"])
        return upd["suff_stats"]

    args = (placeholder, variables, jax.ShapeDtypeStruct(shape, dtype),
            jax.ShapeDtypeStruct(shape[:1], mask_dtype))
    closed = jax.make_jaxpr(suff)(*args)
    stat_paths = tuple(_path(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(placeholder)[0])
    out_paths = tuple(_path(kp) for kp, _ in
                      jax.tree_util.tree_flatten_with_path(jax.eval_shape(suff, *args))[0])
    n_var = len(var_struct[1])
    # Every chunk's shift is the layer's running mean (a fixed input), so merging the
    # chunks' shifted sums is plain addition (what merge_suff does for equal shifts).
    plan = staged.plan(closed, [level[p[:-1]] + 1 for p in stat_paths] + [0] * (n_var + 2),
                       [False] * (len(stat_paths) + n_var) + [True, True],
                       [level[p[:-1]] for p in out_paths],
                       ["same" if p[-1] == "shift" else "sum" for p in out_paths])
    return plan, stat_paths, out_paths


def carry_bytes(model: nn.Module, variables: Variables, image_shape: Sequence[int],
                dtype: Any = jnp.float32, mask_dtype: Any = jnp.bool_) -> int:
    """Bytes of carried activations that `plate_stats`' carried path holds at its peak,
    per chunk (in its store: device, host RAM or disk).

    Found by tracing (no compute). Per image: divide by the chunk size; a plate of
    ``n`` chunks needs ``n * carry_bytes`` (padded chunks count in full).

    Args:
      model: the model.
      variables: its variables (only shapes are used; `jax.eval_shape` output works).
      image_shape: one chunk's shape ``[B, H, W, C]``.
      dtype, mask_dtype: image and mask dtypes.

    Returns:
      Bytes per chunk.
    """
    shape = tuple(int(s) for s in image_shape)
    plan = _carry_plan(model, _var_struct(variables), shape, jnp.dtype(dtype),
                       jnp.dtype(mask_dtype))[0]
    return plan.peak_nbytes
