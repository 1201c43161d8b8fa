"""Exact BN statistics of a whole plate, streamed in chunks (`plate_stats`).

A plate's context (thousands of images) does not fit one device batch. Its statistics
are pooled from per-chunk sufficient statistics (count, shifted sum, sum of squares),
group of BN layers by group (`jaxadapt.adapt.bn_levels`), never averaged over chunks:

- the *carried* path runs the model once, cut into stages (`jaxadapt.adapt.staged`),
  keeping activations between stages on the device, in host RAM or on disk;
- the *recompute* path streams every chunk from the input once per group.

Import `plate_stats` from `jaxadapt.adapt.bn`.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from typing import Any, Callable, Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxadapt.adapt import staged
from jaxadapt.adapt.base import Variables
from jaxadapt.adapt.bn_levels import _carry_plan, _var_struct, carry_bytes, layer_levels
from jaxadapt.adapt.bn_tree import Chunk, NormStats, check_finite, running_norm_stats
from jaxadapt.models.norm import merge_suff, norm_stats_from_suff

# The logger of the public face, `jaxadapt.adapt.bn`, as before the split: log
# configuration (and tests) that name it keep seeing which path ran.
log = logging.getLogger("jaxadapt.adapt.bn")


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
      per group (`jaxadapt.adapt.staged`); stage k runs on every chunk only the layers
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
