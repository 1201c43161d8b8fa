"""BatchNorm statistics as data: context, whole-plate and controls-only statistics.

Statistics here are ``norm_stats`` pytrees (``{layer path: {"mean", "var"}}``, the
paths of the ``batch_stats`` collection) that a model consumes with
``norm_mode="given"`` (see `jaxadapt.models.norm`). Three ways to get them:

- `context_stats`: one train-mode pass over a context batch; every layer is normalized
  with the context's own statistics, exactly as train-mode BN does.
- `plate_stats`: exact statistics of a context larger than one batch (a whole plate of
  thousands of images), streamed in chunks with peak memory bounded by the chunk size.
  Never an average of per-chunk variances (the reference code's defect).
- per-batch statistics inside the forward pass (`norm_mode="batch"`).

The methods built on them are in `jaxadapt.adapt.adabn` (AdaBN, whole-plate
variants) and `jaxadapt.adapt.ben` (BEN).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxadapt.adapt.base import Variables
from jaxadapt.models.norm import merge_suff, norm_stats_from_suff

log = logging.getLogger(__name__)

NormStats = dict[str, Any]
Chunk = tuple[Any, Any]  # (images [B, H, W, C], mask [B] bool or None)
LayerPath = tuple[str, ...]


# --------------------------------------------------------------------------- checks


def check_finite(images: Any, mask: Any | None = None, *, what: str = "context") -> None:
    """Raise if any selected image holds NaN or Inf (cheap host/device reduction).

    Args:
      images: ``[B, H, W, C]`` array (NumPy or JAX).
      mask: optional bool ``[B]``; only selected rows are checked (padding may be junk,
        BN never reads it).
      what: how to name the batch in the error, e.g. "context chunk 3".

    Raises:
      ValueError: naming how many non-finite values there are and in which rows.
    """
    if isinstance(images, np.ndarray):
        ok = bool(np.isfinite(images).all()) if mask is None else bool(
            np.isfinite(images[np.asarray(mask, bool)]).all())
    else:
        ok = bool(_all_finite(images, None if mask is None else jnp.asarray(mask, bool)))
    if ok:
        return
    bad = ~np.isfinite(np.asarray(images))
    if mask is not None:
        bad &= np.asarray(mask, bool).reshape((-1,) + (1,) * (bad.ndim - 1))
    rows = np.flatnonzero(bad.reshape(bad.shape[0], -1).any(1))
    raise ValueError(
        f"{what} has {int(bad.sum())} non-finite pixel values (NaN or Inf) in "
        f"{len(rows)} image(s), rows {rows[:10].tolist()}{' ...' if len(rows) > 10 else ''}; "
        "BN statistics would be NaN: drop or repair those images (or mask them out)"
    )


@jax.jit
def _all_finite(images: jax.Array, mask: jax.Array | None) -> jax.Array:
    fin = jnp.isfinite(images).reshape(images.shape[0], -1).all(1)
    return jnp.all(fin if mask is None else fin | ~mask)


def layer_paths(variables: Variables) -> list[LayerPath]:
    """Paths of the model's BN layers (those holding ``batch_stats``), sorted."""
    if "batch_stats" not in variables:
        raise ValueError(
            f"variables have collections {sorted(variables)}, no 'batch_stats': BN "
            "adaptation needs a model with BatchNorm layers (pass model.init(...) output)"
        )
    flat = traverse_util.flatten_dict(dict(variables["batch_stats"]))
    return sorted({k[:-1] for k in flat})


def check_covers(variables: Variables, norm_stats: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``norm_stats`` has an entry for every BN layer of ``variables``."""
    have = {k[:-1] for k in traverse_util.flatten_dict(dict(norm_stats))}
    missing = [p for p in layer_paths(variables) if p not in have]
    if missing:
        raise ValueError(
            f"norm_stats lack {len(missing)} BN layer(s), e.g. {'/'.join(missing[0])}; "
            "they would silently fall back to batch statistics: pass statistics of every "
            "layer (from context_stats or plate_stats of the same model)"
        )


# ------------------------------------------------------------------ jitted passes


@functools.partial(jax.jit, static_argnames=("model",))
def _context_stats(model: nn.Module, variables: Variables, images: jax.Array,
                   stats_mask: jax.Array | None) -> NormStats:
    _, upd = model.apply(variables, images, norm_mode="batch", stats_mask=stats_mask,
                         mutable=["suff_stats"])
    return norm_stats_from_suff(upd["suff_stats"])


def context_stats(model: nn.Module, variables: Variables, images: Any,
                  stats_mask: Any | None = None) -> NormStats:
    """Every BN layer's mean / biased variance over a context, in one train-mode pass.

    Each layer is normalized with the context's own statistics (as train-mode BN does),
    so the statistics of layer l are those of its input under the context's statistics
    of layers < l. Running averages are not touched. Jitted once per shape.

    Args:
      model: a model taking ``norm_mode`` / ``stats_mask`` (e.g. `ResNet`).
      variables: ``{"params", "batch_stats"}``.
      images: the context ``[B, H, W, C]``.
      stats_mask: optional bool ``[B]``; rows that define the statistics (padding never
        contributes, even if it holds NaN).

    Returns:
      ``norm_stats`` ``{layer path: {"mean": [C], "var": [C]}}`` for ``norm_mode="given"``.

    Raises:
      ValueError: non-finite pixels in the selected rows, or a mask selecting no row.
    """
    check_finite(images, stats_mask)
    mask = None if stats_mask is None else jnp.asarray(stats_mask, bool)
    if mask is not None and not bool(np.asarray(stats_mask).any()):
        raise ValueError("context_stats: stats_mask selects no row; include at least one image")
    return _context_stats(model, variables, jnp.asarray(images), mask)


@functools.partial(jax.jit, static_argnames=("model",))
def _apply_with_stats(model, variables, norm_stats, images):
    logits, _ = model.apply({**variables, "norm_stats": norm_stats}, images, norm_mode="given")
    return logits


def apply_with_stats(model: nn.Module, variables: Variables, norm_stats: NormStats,
                     images: Any) -> jax.Array:
    """Logits with fixed, precomputed BN statistics (at ERM cost; jitted once per shape).

    Args:
      model: the model.
      variables: ``{"params", "batch_stats"}``.
      norm_stats: statistics of every BN layer (`context_stats` / `plate_stats`).
      images: ``[B, H, W, C]``.

    Returns:
      float32 logits ``[B, K]``; each row depends on that row only.

    Raises:
      ValueError: norm_stats missing a layer of the model.
    """
    check_covers(variables, norm_stats)
    return _apply_with_stats(model, variables, norm_stats, jnp.asarray(images))


@functools.partial(jax.jit, static_argnames=("model",))
def _apply_with_context(model, variables, images, context, context_mask):
    x = jnp.concatenate([context, images.astype(context.dtype)])
    mask = jnp.concatenate([context_mask, jnp.zeros(images.shape[0], bool)])
    logits, _ = model.apply(variables, x, norm_mode="batch", stats_mask=mask)
    return logits[context.shape[0]:]


def apply_with_context(model: nn.Module, variables: Variables, images: Any, context: Any,
                       context_mask: Any | None = None) -> jax.Array:
    """Logits of ``images`` with BN statistics taken from a separate context batch.

    One train-mode pass over ``[context; images]`` whose statistics rows are the
    context only; equals ``apply_with_stats(context_stats(context))`` in one pass.

    Args:
      model: the model.
      variables: ``{"params", "batch_stats"}``.
      images: ``[B, H, W, C]`` to classify (they do not enter the statistics).
      context: ``[N, H, W, C]`` images that define the statistics.
      context_mask: optional bool ``[N]`` selecting context rows.

    Returns:
      float32 logits ``[B, K]``.
    """
    check_finite(context, context_mask, what="context")
    cm = (np.ones(np.shape(context)[0], bool) if context_mask is None
          else np.asarray(context_mask, bool))
    if not cm.any():
        raise ValueError("apply_with_context: context_mask selects no row; give a context")
    return _apply_with_context(model, variables, jnp.asarray(images), jnp.asarray(context),
                               jnp.asarray(cm))


@functools.partial(jax.jit, static_argnames=("model", "group"))
def _suff_pass(model, variables, norm_stats, images, mask, group=None):
    _, upd = model.apply({**variables, "norm_stats": norm_stats}, images, norm_mode="given",
                         stats_mask=mask, mutable=["suff_stats"])
    flat = traverse_util.flatten_dict(upd["suff_stats"])
    if group is None:
        return flat
    # Only this group's outputs: XLA drops every layer after it (and the head).
    return {k: v for k, v in flat.items() if k[:-1] in group}


_merge = jax.jit(merge_suff)


# ------------------------------------------------------- layer dependency levels


def _sub_jaxpr(eqn) -> Any:
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if isinstance(sub, jex.ClosedJaxpr):
            return sub.jaxpr
        if isinstance(sub, jex.Jaxpr):
            return sub
    return None


def _propagate(jaxpr, in_deps: Sequence[frozenset]) -> list[frozenset]:
    """Which inputs each output of ``jaxpr`` depends on (exact through nested calls,
    conservative -- union of all inputs -- through any other primitive)."""
    env: dict[Any, frozenset] = dict(zip(jaxpr.invars, in_deps))

    def read(v):
        return frozenset() if isinstance(v, jex.Literal) else env.get(v, frozenset())

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        sub = _sub_jaxpr(eqn)
        if sub is not None and len(sub.invars) == len(ins) and len(sub.outvars) == len(eqn.outvars):
            outs = _propagate(sub, ins)
        else:
            outs = [frozenset().union(*ins)] * len(eqn.outvars)
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _path(keypath) -> LayerPath:
    return tuple(str(getattr(k, "key", k)) for k in keypath)


def running_norm_stats(variables: Variables) -> NormStats:
    """The running averages as a ``norm_stats`` tree (what ERM normalizes with)."""
    return jax.tree.map(lambda a: a, dict(variables["batch_stats"]))


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
    out_deps = _propagate(closed.jaxpr, in_deps)
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
    flat, tree = jax.tree.flatten(variables)
    struct = (tree, tuple(jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in flat))
    return _levels_cached(model, struct, tuple(int(s) for s in image_shape), jnp.dtype(dtype))


# --------------------------------------------------------------- plate statistics


def _rechunk(chunks: Iterable[Chunk], size: int | None,
             check: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Fixed-size, padded ``(images, mask)`` chunks (one compiled shape), finite-checked."""
    k = 0
    for item in chunks:
        images, mask = item if isinstance(item, tuple) else (item, None)
        images = np.asarray(images)
        mask = np.ones(len(images), bool) if mask is None else np.asarray(mask, bool)
        if len(mask) != len(images):
            raise ValueError(
                f"plate_stats: chunk {k} has {len(images)} images but a mask of "
                f"{len(mask)}; give one mask entry per image")
        if check:
            check_finite(images, mask, what=f"context chunk {k}")
        step = size or len(images)
        for s in range(0, len(images), step):
            im, m = images[s:s + step], mask[s:s + step]
            if m.any():
                pad = step - len(im)
                if pad:
                    im = np.concatenate([im, np.zeros((pad,) + im.shape[1:], im.dtype)])
                    m = np.concatenate([m, np.zeros(pad, bool)])
                yield im, m
        k += 1


def _reiterable(chunks: Iterable[Chunk] | Callable[[], Iterable[Chunk]]):
    if callable(chunks):
        return chunks
    if iter(chunks) is chunks:  # a one-shot iterator: keep its chunks on the host
        chunks = list(chunks)
    return lambda: chunks


def plate_stats(model: nn.Module, variables: Variables,
                image_batches: Iterable[Chunk] | Callable[[], Iterable[Chunk]],
                *, chunk_size: int | None = None, truncate: bool = False) -> NormStats:
    """Exact BN statistics over a context larger than one batch (a whole plate).

    Equals `context_stats` of one joint train-mode pass over all selected images, with
    peak device memory bounded by the chunk size. Layer l's statistics depend on layers
    < l being normalized with the *whole-context* statistics, so the layers are finalized
    group by group (`layer_levels`): pass k streams every chunk with
    ``norm_mode="given"`` (groups < k: final statistics; later layers: placeholders that
    group k does not read), sums group k's shifted sufficient statistics over the chunks
    (`merge_suff`) and finalizes them. Cost: ``len(layer_levels)`` forward passes over the
    context (ResNet-18: 17, ResNet-50: 49), one compiled program (or, with
    ``truncate``, as many truncated passes, about half that compute). Unlike the reference
    code, variances are pooled, never averaged over batches.

    Args:
      model: the model.
      variables: ``{"params", "batch_stats"}``.
      image_batches: ``(images [B, H, W, C], mask [B] or None)`` pairs or bare image
        arrays; a list / re-iterable, or a zero-argument callable returning a fresh
        iterable per pass (e.g. re-reading from disk). A one-shot iterator is first
        copied to host memory (it is read once per pass).
      chunk_size: rows per device call; chunks are split / padded to it so that one
        shape is compiled (default: the first chunk's size).
      truncate: compile one program per group that stops after that group's layers
        (XLA drops the rest): about half the compute of full passes, but one compile
        per group instead of one in all -- worth it for many plates of one shape.

    Returns:
      ``norm_stats`` for every BN layer.

    Raises:
      ValueError: no context image, non-finite pixels (naming chunk and rows), or a
        mask of the wrong length.
    """
    source = _reiterable(image_batches)
    if chunk_size is None:
        first = next(iter(_rechunk(source(), None, check=False)), None)
        if first is None:
            raise ValueError("plate_stats: the context has no image (all chunks empty or "
                             "masked); give the plate's images and/or controls")
        chunk_size = len(first[0])
    first = next(iter(_rechunk(source(), chunk_size, check=False)), None)
    if first is None:
        raise ValueError("plate_stats: the context has no image (all chunks empty or "
                         "masked); give the plate's images and/or controls")
    groups = layer_levels(model, variables, first[0].shape, first[0].dtype)
    norm_stats = traverse_util.flatten_dict(running_norm_stats(variables))
    for g, group in enumerate(groups):
        total = None
        for images, mask in _rechunk(source(), chunk_size, check=g == 0):
            flat = _suff_pass(model, variables, traverse_util.unflatten_dict(norm_stats),
                              jnp.asarray(images), jnp.asarray(mask),
                              group=group if truncate else None)
            part = {p: {k: flat[p + (k,)] for k in ("count", "shift", "sum", "sumsq")}
                    for p in group}
            total = part if total is None else _merge(total, part)
        for p, s in total.items():
            st = norm_stats_from_suff(s)
            norm_stats[p + ("mean",)] = st["mean"]
            norm_stats[p + ("var",)] = st["var"]
    return traverse_util.unflatten_dict(norm_stats)
