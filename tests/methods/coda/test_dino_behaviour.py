"""DINO learns: on planted clusters its teacher sharpens and its prototypes recover them.

A behaviour check of the whole step (loss, centring, sharpening, EMA teacher, optimizer,
last-layer freeze): four Gaussian clusters, views = the cluster centre plus noise. A
broken centre (e.g. added instead of subtracted), a teacher that does not follow the
student or a loss that compares a view with itself leaves the teacher uniform or
collapsed onto one prototype.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.methods.coda import dino, dino_optim
from jaxadapt.models.vit import DINOHead


K, B = 64, 64
CENTRES = np.random.default_rng(0).normal(size=(4, 16)) * 2


class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, crops):
        x = jnp.concatenate([c.reshape(c.shape[0], -1) for c in crops])
        x = nn.Dense(32)(nn.gelu(nn.Dense(64)(x)))
        return DINOHead(K, 64, 16)(x)


def _batch(step):
    r = np.random.default_rng(step)
    lab = r.integers(0, 4, B)
    g = CENTRES[lab][:, None] + r.normal(size=(B, 2, 16)) * 0.5
    loc = CENTRES[lab][:, None] + r.normal(size=(B, 4, 16)) * 0.8
    return {"global": jnp.asarray(g.reshape(B, 2, 1, 1, 16), jnp.float32),
            "local": jnp.asarray(loc.reshape(B, 4, 1, 1, 16), jnp.float32)}, lab


def test_teacher_sharpens_and_its_prototypes_are_the_planted_clusters():
    net = TinyNet()
    b0, _ = _batch(0)
    params = net.init(jax.random.PRNGKey(0), [b0["global"][:, 0]])["params"]
    sched = dino_optim.make_dino_schedules(epochs=6, niter_per_ep=100, batch_size=B,
                                           base_lr=4e-3, warmup_epochs=1,
                                           warmup_teacher_temp_epochs=3)
    opt = dino_optim.make_dino_optimizer(sched)
    step = jax.jit(dino.make_dino_step(lambda p, c: net.apply({"params": p}, c), opt, sched))
    state = dino.create_dino_state(params, opt, jax.random.PRNGKey(1), K)
    for t in range(600):
        state, metrics = step(state, _batch(t)[0])
    batch, lab = _batch(10_000)
    assign = np.asarray(net.apply({"params": state.teacher}, [batch["global"][:, 0]])).argmax(1)
    purity = sum(np.bincount(lab[assign == a]).max() for a in np.unique(assign)) / B
    assert float(metrics["teacher_entropy"]) < 0.5 * np.log(K)  # far from uniform
    # one prototype per cluster (a random or frozen teacher scatters them over ~11)
    assert 4 <= len(np.unique(assign)) <= 6
    assert purity > 0.95
