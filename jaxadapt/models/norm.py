"""Batch normalization whose statistics are an argument, not a hidden switch.

`BatchNorm` is a Flax linen layer with the same parameter and collection names as
`flax.linen.BatchNorm` (`params/{scale,bias}`, `batch_stats/{mean,var}`), so
checkpoints and tree paths carry over, but the source of its statistics is chosen per
call with ``mode``:

- ``"running"``: the running averages in the ``batch_stats`` collection.
- ``"batch"``: mean / variance of the input over every axis but the last, restricted to
  the rows ``b`` with ``mask[b]`` True (e.g. a plate's perturbed wells plus its DMSO
  controls, never the padding). Gradients flow through these statistics. When
  ``batch_stats`` is mutable the running averages are updated. A *float* mask is a
  per-row weight (>= 0): weighted mean and variance, ``sum_b w_b x_b / sum_b w_b``, so
  that e.g. a plate's controls can carry a fixed share of the statistics whatever their
  number (`jaxadapt.methods.bn.arm.cs_arm_bn_plate`); weight 0 acts as mask False.
- ``"given"``: mean / variance from the collection ``norm_stats`` at the same tree path
  as ``batch_stats``; a layer without an entry there falls back to ``"batch"``
  statistics (without touching the running averages). This lets a caller fix the
  statistics of layers ``< l`` (e.g. computed over a whole plate) and take layer ``l``
  from the batch.

Variance is always the two-pass mean of squared deviations from the mean, biased
(ddof 0) as in train-mode BN; never ``E[x^2] - E[x]^2``, which Flax uses by default
(``use_fast_variance=True``) and which loses all precision for large-mean float32 input.

Running averages follow the Flax convention ``ra = m * ra + (1 - m) * new`` with
``m = momentum = 0.9`` and the *biased* batch variance. PyTorch instead uses
``momentum = 0.1`` on the *new* value (``ra = 0.9 ra + 0.1 new`` -- the same decay) but
stores the *unbiased* (ddof 1) variance; convert with ``n / (n - 1)`` when importing.

Sufficient statistics: when the collection ``suff_stats`` is mutable, each layer stores
its input's masked ``{count, shift, sum, sumsq}`` with ``shift`` = the layer's running
mean, ``sum = sum(x - shift)`` and ``sumsq = sum((x - shift)^2)`` over the selected rows
and all spatial positions (with float row weights: weighted sums, and ``count`` the
float total weight). With a common shift these add exactly across chunks and
devices (`merge_suff` also handles different shifts); `stats_from_suff` turns them into
(mean, var). The shifted frame keeps float32 sums small as long as the running mean is
within a few standard deviations of the data mean (true for a trained model).
A layer called twice in one ``apply`` keeps only the last call's statistics.

Empty context: an all-False ``mask`` raises ``ValueError`` when the mask is concrete;
under ``jit`` it cannot be seen statically, so the layer then normalizes with its
running averages instead (and leaves them unchanged). No NaN either way; a zero
variance (one 1x1 image, constant input) is handled by ``epsilon``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

#: The statistics sources a `BatchNorm` call can use.
MODES: tuple[str, ...] = ("running", "batch", "given")

#: Keys of one layer's sufficient statistics.
SUFF_KEYS: tuple[str, ...] = ("count", "shift", "sum", "sumsq")

Array = jax.Array


def _concrete(mask: Any) -> np.ndarray | None:
    """The mask as a NumPy array, or None when it is traced (value unknown statically)."""
    try:
        return np.asarray(mask)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def is_weights(mask: Any) -> bool:
    """True when a row mask is a float array of per-row weights (not a bool selection)."""
    return mask is not None and jnp.issubdtype(jnp.result_type(mask), jnp.floating)


def check_mask(x: Array, mask: Any | None) -> Array | None:
    """Validate a row mask (or row weights) for input ``x``.

    Args:
      x: the layer input, batch axis first.
      mask: None (all rows) or shape ``[B]``: bool / int (nonzero entries select rows) or
        float per-row weights (>= 0, finite; 0 = not selected).

    Returns:
      None, a bool array ``[B]``, or (float mask) float32-or-wider weights ``[B]``.

    Raises:
      ValueError: wrong shape, a concrete mask that selects no row, or concrete weights
        that are negative or not finite.
    """
    if mask is None:
        return None
    if tuple(np.shape(mask)) != (x.shape[0],):
        raise ValueError(
            f"BatchNorm mask has shape {tuple(np.shape(mask))}, expected ({x.shape[0]},) "
            "= one entry per row of the batch; pass stats_mask with the batch size"
        )
    weights = is_weights(mask)
    concrete = _concrete(mask)
    if concrete is not None and weights and not (np.isfinite(concrete) & (concrete >= 0)).all():
        raise ValueError(
            f"BatchNorm row weights must be finite and >= 0, got min {np.min(concrete)!r}; "
            "pass 0 for rows outside the context")
    if concrete is not None and not (concrete > 0 if weights else concrete.astype(bool)).any():
        raise ValueError(
            "BatchNorm mask selects no row (all False): batch statistics need at least "
            "one row; include context rows (e.g. controls) or use mode='running'"
        )
    if weights:
        return jnp.asarray(mask).astype(jnp.promote_types(jnp.result_type(mask), jnp.float32))
    return jnp.asarray(mask).astype(bool)


def _row_select(x: Array, mask: Array | None) -> tuple[Array | None, Array]:
    """Per-row selector broadcastable to x, and the number (bool mask; int32) or total
    weight (float weights) of selected elements per channel."""
    positions = int(np.prod(x.shape[1:-1], dtype=np.int64))
    if mask is None:
        return None, jnp.asarray(x.shape[0] * positions, jnp.int32)
    sel = mask.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    if is_weights(mask):
        return sel, jnp.sum(mask) * positions
    count = jnp.sum(mask.astype(jnp.int32)) * positions
    return sel, count


def _masked_sum(v: Array, sel: Array | None) -> Array:
    axes = tuple(range(v.ndim - 1))
    if sel is None:
        return jnp.sum(v, axis=axes)
    # where (not multiply alone) so that inf/NaN in unselected padding rows cannot leak in.
    if is_weights(sel):
        return jnp.sum(jnp.where(sel > 0, v * sel.astype(v.dtype), 0.0), axis=axes)
    return jnp.sum(jnp.where(sel, v, 0.0), axis=axes)


def _safe_count(count: Array, dtype: Any) -> Array:
    """The count as a divisor: itself when positive, 1 when empty (then sums are 0)."""
    return jnp.where(count > 0, count, 1).astype(dtype)


def masked_moments(x: Array, mask: Array | None = None) -> tuple[Array, Array, Array]:
    """Two-pass masked mean and biased variance over all axes but the last.

    Args:
      x: input ``[B, ..., C]``.
      mask: None, bool ``[B]`` selecting the rows that define the statistics, or float
        ``[B]`` row weights (weighted mean and biased weighted variance).

    Returns:
      ``(mean [C], var [C], count [])`` in float32 (at least); count is the number of
      selected elements per channel (the total weight for float weights). With
      ``count == 0`` mean and var are 0 (no NaN).
    """
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(dtype)
    sel, count = _row_select(x, mask)
    n = _safe_count(count, dtype)
    mean = _masked_sum(xf, sel) / n
    var = _masked_sum(jnp.square(xf - mean), sel) / n
    return mean, var, count


def masked_suff_stats(x: Array, mask: Array | None, shift: Array) -> dict[str, Array]:
    """Sufficient statistics of ``x`` in the frame shifted by ``shift``.

    Args:
      x: input ``[B, ..., C]``.
      mask: None, bool ``[B]``, or float ``[B]`` row weights (weighted sums).
      shift: ``[C]``, e.g. the layer's running mean.

    Returns:
      ``{"count": [], "shift": [C], "sum": [C], "sumsq": [C]}``; count is int32, or the
      float total weight for float weights.
    """
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    shift = jnp.asarray(shift, dtype)
    sel, count = _row_select(x, mask)
    d = x.astype(dtype) - shift
    return {
        "count": count.astype(dtype if is_weights(mask) else jnp.int32),
        "shift": shift,
        "sum": _masked_sum(d, sel),
        "sumsq": _masked_sum(jnp.square(d), sel),
    }


def _is_suff(node: Any) -> bool:
    return isinstance(node, Mapping) and set(node.keys()) == set(SUFF_KEYS)


def stats_from_suff(suff: Mapping[str, Array]) -> tuple[Array, Array]:
    """Mean and biased variance from one layer's sufficient statistics.

    Args:
      suff: ``{count, shift, sum, sumsq}`` of one layer.

    Returns:
      ``(mean, var)``; var is clipped at 0 against rounding; zero count gives
      ``(shift, 0)``.
    """
    s = jnp.asarray(suff["sum"])
    n = _safe_count(jnp.asarray(suff["count"]), s.dtype)
    d = s / n
    var = jnp.maximum(jnp.asarray(suff["sumsq"]) / n - jnp.square(d), 0.0)
    return jnp.asarray(suff["shift"]) + d, var


def _merge_layer(a: Mapping[str, Array], b: Mapping[str, Array]) -> dict[str, Array]:
    na, nb = jnp.asarray(a["count"]), jnp.asarray(b["count"])
    # Re-centre both on the shift of the larger part: a no-op when shifts agree (then
    # this is plain addition), exact algebra otherwise.
    target = jnp.where(na >= nb, a["shift"], b["shift"])
    out_sum, out_sq = 0.0, 0.0
    for part, n in ((a, na), (b, nb)):
        delta = part["shift"] - target
        nf = n.astype(delta.dtype)
        out_sum = out_sum + part["sum"] + nf * delta
        out_sq = out_sq + part["sumsq"] + 2.0 * delta * part["sum"] + nf * jnp.square(delta)
    return {"count": na + nb, "shift": target, "sum": out_sum, "sumsq": out_sq}


def merge_suff(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Merge sufficient statistics of two disjoint sets of rows.

    Args:
      a, b: one layer's ``{count, shift, sum, sumsq}``, or trees of them with the same
        structure (e.g. two ``suff_stats`` collections from two chunks of a plate).

    Returns:
      The statistics of the union, same structure.
    """
    if _is_suff(a):
        return _merge_layer(a, b)
    if set(a.keys()) != set(b.keys()):
        raise ValueError(
            f"merge_suff: trees differ (keys {sorted(a)} vs {sorted(b)}); merge "
            "statistics of the same model"
        )
    return {k: merge_suff(a[k], b[k]) for k in a}


def norm_stats_from_suff(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a ``suff_stats`` tree into a ``norm_stats`` tree of ``{mean, var}``.

    Args:
      tree: as returned in the ``suff_stats`` collection (possibly merged).

    Returns:
      The same paths with ``{"mean", "var"}`` leaves, ready for mode ``"given"``.
    """
    if _is_suff(tree):
        mean, var = stats_from_suff(tree)
        return {"mean": mean, "var": var}
    return {k: norm_stats_from_suff(v) for k, v in tree.items()}


class BatchNorm(nn.Module):
    """Batch normalization with explicit statistics source (see module docstring).

    Attributes:
      momentum: decay of the running averages (Flax convention, 0.9).
      epsilon: added to the variance.
      use_scale, use_bias: learn an affine scale / bias.
      dtype: output dtype (default: promote input and param dtypes).
      param_dtype: dtype of scale and bias.
      scale_init, bias_init: initializers (zero ``scale_init`` for residual branches).
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array, *, mode: str, mask: Array | None = None) -> Array:
        """Normalize ``x`` [B, ..., C] over all axes but the last.

        Args:
          x: input, channels last.
          mode: "running", "batch" or "given".
          mask: optional ``[B]`` rows that define batch statistics (all rows if None);
            bool, or float per-row weights.

        Returns:
          The normalized, scaled and shifted input.
        """
        if mode not in MODES:
            raise ValueError(f"BatchNorm mode={mode!r}; use one of {MODES}")
        mask = check_mask(x, mask)
        feat = x.shape[-1]
        stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (feat,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (feat,), jnp.float32)
        initializing = self.is_initializing()

        if self.is_mutable_collection("suff_stats") and not initializing:
            shift = jax.lax.stop_gradient(ra_mean.value)
            for k, v in masked_suff_stats(jax.lax.stop_gradient(x), mask, shift).items():
                self.put_variable("suff_stats", k, v)

        if mode == "running":
            mean, var = ra_mean.value, ra_var.value
        elif mode == "given" and self.has_variable("norm_stats", "mean"):
            if not self.has_variable("norm_stats", "var"):
                raise ValueError(
                    f"norm_stats of layer {'/'.join(self.path)} has 'mean' but no 'var'; "
                    "give both (e.g. from norm_stats_from_suff)"
                )
            mean = self.get_variable("norm_stats", "mean")
            var = self.get_variable("norm_stats", "var")
        else:  # "batch", or "given" without an entry for this layer
            mean, var = self._batch_stats(x, mask, ra_mean, ra_var, mode == "batch")

        mean = jnp.asarray(mean, stat_dtype)
        inv = jax.lax.rsqrt(jnp.asarray(var, stat_dtype) + self.epsilon)
        if self.use_scale:
            scale = self.param("scale", self.scale_init, (feat,), self.param_dtype)
            inv = inv * scale.astype(stat_dtype)
        y = (x.astype(stat_dtype) - mean) * inv
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (feat,), self.param_dtype)
            y = y + bias.astype(stat_dtype)
        out_dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        return y.astype(out_dtype)

    def _batch_stats(self, x, mask, ra_mean, ra_var, update: bool) -> tuple[Array, Array]:
        """Masked batch statistics; running averages updated when allowed."""
        mean, var, count = masked_moments(x, mask)
        have = count > 0
        # Empty context under jit: fall back to the running averages (documented).
        mean = jnp.where(have, mean, ra_mean.value.astype(mean.dtype))
        var = jnp.where(have, var, ra_var.value.astype(var.dtype))
        if update and self.is_mutable_collection("batch_stats") and not self.is_initializing():
            m = self.momentum
            new_mean = m * ra_mean.value + (1.0 - m) * jax.lax.stop_gradient(mean)
            new_var = m * ra_var.value + (1.0 - m) * jax.lax.stop_gradient(var)
            ra_mean.value = new_mean.astype(ra_mean.value.dtype)
            ra_var.value = new_var.astype(ra_var.value.dtype)
        return mean, var
