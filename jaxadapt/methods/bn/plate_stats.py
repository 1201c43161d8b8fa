"""Exact BN statistics of a whole plate, streamed in chunks (`plate_stats`).

A plate's context (thousands of images) does not fit one device batch. Its statistics
are pooled from per-chunk sufficient statistics (count, shifted sum, sum of squares),
group of BN layers by group (the BN layers' dependency levels, found by tracing:
`layer_levels`, `carry_bytes`), never averaged over chunks:

- the *carried* path runs the model once, cut into stages (`jaxadapt.methods.bn.staged`),
  keeping activations between stages on the device, in host RAM or on disk;
- the *recompute* path streams every chunk from the input once per group.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from typing import Any, Callable, Iterable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxadapt.methods.base import Variables
from jaxadapt.methods.bn import staged
from jaxadapt.methods.bn.stats import Chunk, LayerPath, NormStats, check_finite, running_norm_stats
from jaxadapt.models.norm import merge_suff, norm_stats_from_suff


# The logger of the public face, `jaxadapt.methods.bn.stats`, as before the split: log
# configuration (and tests) that name it keep seeing which path ran.
log = logging.getLogger(__name__)


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
_finalize = jax.jit(norm_stats_from_suff)


#: Where `plate_stats` may keep carried activations ("auto": device, else host RAM).
CARRY: tuple[str, ...] = ("auto", "device", "host", "disk", "recompute")


def _carry_tiers(carry: str, budget: float | None, spill_dir: str | None) -> list:
    """``[(store kind, budget bytes)]`` to try in order; none means recompute."""
    if carry not in CARRY:
        raise ValueError(f"plate_stats: carry={carry!r}; use one of {CARRY}")
    if budget is not None and not budget >= 0:
        raise ValueError(f"plate_stats: carry_budget={budget!r}; give bytes >= 0 "
                         "(0: recompute, None: half of the free memory)")
    if carry == "auto":
        kinds = (["disk"] if spill_dir is not None else
                 ["device", "host"] if jax.default_backend() != "cpu" else ["device"])
    else:
        kinds = [] if carry == "recompute" else [carry]
    return [(k, staged.free_bytes(k, spill_dir) / 2 if budget is None else float(budget))
            for k in kinds]


def _plate_stats_carried(model, variables, chunks, first, kind: str, budget: float,
                         spill_dir: str | None) -> NormStats | None:
    """Plate statistics in one staged pass; None if the carry would exceed ``budget``."""
    plan, stat_paths, out_paths = _carry_plan(
        model, _var_struct(variables), first[0].shape, first[0].dtype, first[1].dtype)
    init = traverse_util.flatten_dict(running_norm_stats(variables))
    inputs = [init[p] for p in stat_paths] + jax.tree.leaves(variables) + [None, None]
    index = {p: i for i, p in enumerate(stat_paths)}

    def finish(k, outs):
        suff: dict = {}
        for j, value in outs.items():
            suff.setdefault(out_paths[j][:-1], {})[out_paths[j][-1]] = value
        new = {}
        for layer, s in suff.items():
            for key, value in _finalize(s).items():
                new[index[layer + (key,)]] = value
        return new

    store = staged.CarryStore(kind, spill_dir)
    try:
        if not staged.run(plan, inputs, chunks, store, finish, budget):
            return None
        where = {"device": f"{jax.default_backend()} device", "host": "host",
                 "disk": f"disk under {spill_dir or tempfile.gettempdir()}"}[kind]
        log.info("plate_stats: carried path (%d stages = one forward pass; %.1f KiB/image, "
                 "peak %.3g MiB on the %s, budget %.3g MiB)", len(plan.stages),
                 plan.peak_nbytes / len(first[0]) / 2**10, store.peak / 2**20, where,
                 budget / 2**20)
    finally:
        store.close()
    return traverse_util.unflatten_dict({p: inputs[index[p]] for p in stat_paths})


def _rechunk(chunks: Iterable[Chunk], size: int | None,
             check: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Fixed-size, padded ``(images, mask)`` chunks (one compiled shape), finite-checked."""
    k = 0
    for item in chunks:
        images, mask = item if isinstance(item, tuple) else (item, None)
        images = np.asarray(images)
        mask = np.ones(len(images), bool) if mask is None else _mask_or_weights(mask)
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
                    m = np.concatenate([m, np.zeros(pad, m.dtype)])
                yield im, m
        k += 1


def _mask_or_weights(mask: Any) -> np.ndarray:
    """A chunk's bool row mask, or its float row weights passed through unchanged."""
    mask = np.asarray(mask)
    return mask if np.issubdtype(mask.dtype, np.floating) else mask.astype(bool)


def _reiterable(chunks: Iterable[Chunk] | Callable[[], Iterable[Chunk]]):
    if callable(chunks):
        return chunks
    if iter(chunks) is chunks:  # a one-shot iterator: keep its chunks on the host
        chunks = list(chunks)
    return lambda: chunks


def plate_stats(model: nn.Module, variables: Variables,
                image_batches: Iterable[Chunk] | Callable[[], Iterable[Chunk]],
                *, chunk_size: int | None = None, truncate: bool = False,
                carry: str = "auto", carry_budget: float | None = None,
                spill_dir: str | None = None) -> NormStats:
    """Exact BN statistics over a context larger than one batch (a whole plate).

    Equals `context_stats` of one joint train-mode pass over all selected images, with
    peak device memory bounded by the chunk size. Layer l's statistics depend on layers
    < l being normalized with the *whole-context* statistics, so the layers are finalized
    group by group (`layer_levels`; ResNet-18: 17 groups, ResNet-50: 49). Unlike the
    reference code, variances are pooled, never averaged over batches. Two paths, with
    the same result (one log line says which ran and why):

    - *carried* (default where memory allows): the traced model is cut into one stage
      per group (`jaxadapt.methods.bn.staged`); stage k runs on every chunk only the layers
      that group k's statistics newly need, sums their sufficient statistics and
      finalizes them; the activations later stages read wait in between (`carry_bytes`
      per chunk): on the device where they fit (on a CPU backend that is host RAM),
      else in host RAM, or on disk. In all one forward pass (plus any host copies).
    - *recompute*: pass k streams every chunk from the input with ``norm_mode="given"``
      (groups < k final, later ones placeholders that group k does not read): one
      forward pass per group, no extra memory. Used when the carried state would exceed
      the budget (found out while streaming, so a source of unknown length works), or
      the model cannot be staged.

    Args:
      model: the model.
      variables: ``{"params", "batch_stats"}``.
      image_batches: ``(images [B, H, W, C], mask [B] or None)`` pairs or bare image
        arrays; a float mask holds per-row weights (weighted statistics, see
        `jaxadapt.models.norm`; give weights for every chunk or for none); a list / re-iterable, or a zero-argument callable returning a fresh
        iterable per pass (e.g. re-reading from disk). A one-shot iterator is first
        copied to host memory (the recompute path reads it once per pass).
      chunk_size: rows per device call; chunks are split / padded to it so that one
        shape is compiled (default: the first chunk's size).
      truncate: recompute path only: compile one program per group that stops after
        that group's layers (XLA drops the rest), about half the compute of full passes
        but one compile per group.
      carry: where carried activations may wait: "auto" (the device if an accelerator
        has room, else host RAM; with ``spill_dir``: disk), "device", "host", "disk", or
        "recompute" (today's path, always).
      carry_budget: bytes the carried state may take there; None: half of the free
        memory (device / host RAM / disk) at the call; 0: recompute.
      spill_dir: folder for carry="disk" (a temporary subfolder, removed at the end);
        default: the system's temporary folder.

    Returns:
      ``norm_stats`` for every BN layer.

    Raises:
      ValueError: no context image, non-finite pixels (naming chunk and rows), a mask
        of the wrong length, an unknown ``carry`` or a negative ``carry_budget``.
    """
    tiers = _carry_tiers(carry, carry_budget, spill_dir)
    source = _reiterable(image_batches)
    if chunk_size is None:
        first = next(iter(_rechunk(source(), None, check=False)), None)
        chunk_size = None if first is None else len(first[0])
    first = None if chunk_size is None else next(
        iter(_rechunk(source(), chunk_size, check=False)), None)
    if first is None:
        raise ValueError("plate_stats: the context has no image (all chunks empty or "
                         "masked); give the plate's images and/or controls")
    groups = layer_levels(model, variables, first[0].shape, first[0].dtype)
    why = "carry='recompute'"
    for kind, budget in tiers:
        if budget <= 0:
            why = f"carry_budget=0 ({kind})"
            continue
        try:
            per_chunk = carry_bytes(model, variables, first[0].shape, first[0].dtype,
                                    first[1].dtype)
        except ValueError as err:  # a model the staging cannot cut
            why = f"the model cannot be staged ({err})"
            break
        stats = _plate_stats_carried(model, variables, _rechunk(source(), chunk_size),
                                     first, kind, budget, spill_dir)
        if stats is not None:
            return stats
        why = (f"carrying {per_chunk / len(first[0]) / 2**10:.1f} KiB/image would exceed "
               f"the {kind} budget of {budget / 2**20:.3g} MiB")
    log.info("plate_stats: recompute path (%d passes): %s", len(groups), why)
    return _plate_stats_recompute(model, variables, source, chunk_size, groups, truncate)


def _plate_stats_recompute(model, variables, source, chunk_size: int, groups: tuple,
                           truncate: bool) -> NormStats:
    """One pass from the input per group (no host memory)."""
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
