"""The profile MLP: the ResNet's call signature and variables, BN statistics as arguments."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxadapt import config as defaults
from jaxadapt.methods.bn import plate_stats as bn_plate
from jaxadapt.models import build_model
from jaxadapt.models.mlp import MLP


D, K, W = 12, 3, 8
EPS = 1e-5


def _model_and_vars(rng):
    cfg = ml_collections.ConfigDict({"name": "mlp", "num_classes": K, "in_channels": D,
                                     "width": W, "mlp_hidden_layers": 2})
    model = build_model(cfg)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 1, 1, D), jnp.float32))
    # Non-trivial running statistics and affine parameters, so every path is visible.
    stats = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 2.0, a.shape), jnp.float32),
                         variables["batch_stats"])
    params = dict(variables["params"])
    for name in ("bn1", "bn2"):
        params[name] = {"scale": jnp.asarray(rng.uniform(0.5, 2.0, W), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=W), jnp.float32)}
    return model, {"params": params, "batch_stats": stats}


def _np_forward(v, x, mask=None):
    """NumPy restatement: Dense -> BN (running stats, or masked batch stats) -> ReLU, x2, head."""
    p, s = v["params"], v["batch_stats"]
    h = np.asarray(x, np.float64)
    for i in (1, 2):
        h = h @ np.asarray(p[f"dense{i}"]["kernel"], np.float64)
        if mask is None:
            mean, var = np.asarray(s[f"bn{i}"]["mean"]), np.asarray(s[f"bn{i}"]["var"])
        else:
            sel = h[mask]
            mean, var = sel.mean(0), ((sel - sel.mean(0)) ** 2).mean(0)
        h = (h - mean) / np.sqrt(var + EPS) * np.asarray(p[f"bn{i}"]["scale"]) \
            + np.asarray(p[f"bn{i}"]["bias"])
        h = np.maximum(h, 0.0)
    head = p["head"]
    return h @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"]), h


def test_layout_matches_the_bn_family_contract():
    model, v = _model_and_vars(np.random.default_rng(0))
    assert isinstance(model, MLP)
    assert set(v["params"]) == {"dense1", "bn1", "dense2", "bn2", "head"}
    assert set(v["batch_stats"]) == {"bn1", "bn2"}
    assert set(v["batch_stats"]["bn1"]) == {"mean", "var"}
    assert v["params"]["dense1"]["kernel"].shape == (D, W)
    assert "bias" not in v["params"]["dense1"]  # the BN shift replaces it


def test_running_batch_and_given_statistics_match_numpy():
    rng = np.random.default_rng(1)
    model, v = _model_and_vars(rng)
    x = rng.normal(1.0, 2.0, (10, D)).astype(np.float32)
    logits, feats = model.apply(v, jnp.asarray(x))  # eval: running statistics
    want, want_f = _np_forward(v, x)
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(feats, want_f, rtol=1e-4, atol=1e-4)
    # [B, 1, 1, D] (a profile record as the pipeline serves it) is the same input.
    np.testing.assert_allclose(model.apply(v, jnp.asarray(x[:, None, None]))[0], logits, rtol=1e-6)
    # Train mode: statistics of the masked rows only, running averages updated.
    mask = np.array([1, 1, 0, 1, 1, 0, 1, 1, 1, 0], bool)
    (b_logits, _), upd = model.apply(v, jnp.asarray(x), norm_mode="batch",
                                     stats_mask=jnp.asarray(mask), mutable=["batch_stats"])
    np.testing.assert_allclose(b_logits, _np_forward(v, x, mask)[0], rtol=1e-4, atol=1e-4)
    h1 = x.astype(np.float64) @ np.asarray(v["params"]["dense1"]["kernel"], np.float64)
    sel = h1[mask]
    np.testing.assert_allclose(upd["batch_stats"]["bn1"]["mean"],
                               0.9 * np.asarray(v["batch_stats"]["bn1"]["mean"]) + 0.1 * sel.mean(0),
                               rtol=1e-4, atol=1e-5)
    assert not np.allclose(b_logits, logits, atol=1e-3)  # train and eval modes differ
    # Given statistics (e.g. a plate's, from sufficient statistics) act as running ones.
    given = {"params": v["params"], "batch_stats": v["batch_stats"],
             "norm_stats": v["batch_stats"]}
    np.testing.assert_allclose(model.apply(given, jnp.asarray(x), norm_mode="given")[0], logits,
                               rtol=1e-5, atol=1e-5)


def test_plate_statistics_from_sufficient_stats_equal_batch_statistics():
    """AdaBN's exact whole-plate statistics (chunked sufficient statistics) work on the MLP."""
    rng = np.random.default_rng(2)
    model, v = _model_and_vars(rng)
    x = rng.normal(0.5, 1.5, (12, 1, 1, D)).astype(np.float32)
    stats = bn_plate.plate_stats(model, v, [jnp.asarray(x[:5]), jnp.asarray(x[5:])])
    got = model.apply({**v, "norm_stats": stats}, jnp.asarray(x), norm_mode="given")[0]
    want = model.apply(v, jnp.asarray(x), norm_mode="batch")[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bad_input_and_config_are_named():
    model, v = _model_and_vars(np.random.default_rng(3))
    with pytest.raises(ValueError, match="expected \\[batch, 12\\]"):
        model.apply(v, jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="expected \\[batch, 12\\]"):
        model.apply(v, jnp.zeros((2, 4, 4, D)))
    with pytest.raises(ValueError, match="hidden_layers=0"):
        MLP(num_classes=2, in_channels=D, hidden_layers=0).init(jax.random.key(0),
                                                                jnp.zeros((1, D)))
    cfg = defaults.get_defaults().model
    cfg.name = "mlp"
    cfg.in_channels = D
    assert build_model(cfg).hidden_layers == cfg.mlp_hidden_layers == 2
    with pytest.raises(ValueError, match="config.model.name to one of .*'mlp'"):
        build_model({"name": "mlpx", "num_classes": 2})
