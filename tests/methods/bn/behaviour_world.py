"""A tiny planted world for behaviour tests of the adaptation methods.

Images are 32 px, 3 channels, a few Gaussian "cells" on a noisy background. A class is
planted as *biology*: class k brightens the cells in channel k (by a factor that varies
from image to image, so one image alone is ambiguous); negative controls (DMSO) carry
no effect. Each plate then gets a planted *technical* shift, the batch effect: a gain
and an offset per channel applied to every image of the plate, controls included.
Training plates see the shift in mild form, the test plate in strong form (gains and
offsets chosen to push one channel up and another down, so the class read from raw
intensities flips).

Models are trained with the package's own train steps (`jaxadapt.train.steps` for ERM,
`jaxadapt.methods.bn.arm.make_episodic_train_step` for (CS-)ARM-BN), jitted on one device,
and evaluated through each method's public ``predict_unit`` on `ArrayUnit`, an
in-memory implementation of `jaxadapt.methods.base.Unit`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxadapt.methods.base import UnitBatch
from jaxadapt.methods.bn import arm, shares
from jaxadapt.models.resnet import BasicBlock, ResNet
from jaxadapt.train import steps
from jaxadapt.train.state import create_train_state


SIZE, C, K = 32, 3, 3  # image side, channels, classes (class k acts on channel k)
N_CELLS, CELL_SIGMA = 8, 4.0
CLASS_EFFECT = 1.0  # cells of channel k are (1 + effect * u), u ~ U(0.5, 1.5)
PER_PLATE, CONTROLS = 96, 64  # perturbed images (balanced) and controls per plate
TRAIN_PLATES = 6
GAIN = 1.8  # test plate's channel gain (one up, one down)
OFFSET = 1.0  # test plate's channel offsets, in units of a cell's base brightness
L, N, E = 32, 64, 4  # test chunk / episode perturbed size, episode controls, episodes/step


@dataclasses.dataclass
class Plate:
    """One plate: perturbed images with labels, and its controls (all float32 NHWC)."""

    images: np.ndarray
    labels: np.ndarray
    controls: np.ndarray


def _cells(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, SIZE, SIZE] cell masks: sums of Gaussian blobs at random places."""
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    centres = rng.uniform(4, SIZE - 4, size=(n, N_CELLS, 2)).astype(np.float32)
    d2 = ((yy[None, None] - centres[..., 0, None, None]) ** 2
          + (xx[None, None] - centres[..., 1, None, None]) ** 2)
    return np.exp(-d2 / (2 * CELL_SIGMA**2)).sum(1)


def _images(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Raw images [n, SIZE, SIZE, C]; label -1 = control (no effect)."""
    n = len(labels)
    cells = _cells(rng, n)
    # Cell-to-cell (here image-to-image) heterogeneity of every channel's brightness.
    level = rng.lognormal(0.0, 0.15, size=(n, C)).astype(np.float32)
    effect = np.ones((n, C), np.float32)
    treated = labels >= 0
    effect[treated, labels[treated]] += CLASS_EFFECT * rng.uniform(0.5, 1.5, treated.sum())
    img = cells[..., None] * (level * effect)[:, None, None, :]
    return img + rng.normal(0.0, 0.1, size=img.shape).astype(np.float32)


def make_plate(rng: np.random.Generator, gain: np.ndarray, offset: np.ndarray,
               per_plate: int = PER_PLATE, controls: int = CONTROLS) -> Plate:
    """A plate of balanced perturbed images + controls, shifted by gain and offset."""
    labels = np.arange(per_plate) % K
    rng.shuffle(labels)
    x = _images(rng, labels) * gain + offset
    c = _images(rng, -np.ones(controls, np.int64)) * gain + offset
    return Plate(x.astype(np.float32), labels, c.astype(np.float32))


def mild_shift(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Training plates: overall gain within +-20 %, channel gains +-10 %, offsets +-0.1."""
    gain = np.exp(rng.uniform(-0.2, 0.2) + rng.uniform(-0.1, 0.1, C))
    return gain.astype(np.float32), rng.uniform(-0.1, 0.1, C).astype(np.float32)


def strong_shift(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The test plate: one channel brighter (x GAIN, + OFFSET), another dimmer (/ GAIN,
    - OFFSET), the third as is (which channels: drawn)."""
    order = rng.permutation(C)
    gain = np.array([GAIN, 1.0 / GAIN, 1.0])[order]
    offset = np.array([OFFSET, -OFFSET, 0.0])[order]
    return gain.astype(np.float32), offset.astype(np.float32)


@dataclasses.dataclass
class World:
    """Training plates, a held-out mildly shifted plate, the strongly shifted test plate,
    and the normalization."""

    train: list[Plate]
    mild: Plate
    test: Plate
    mean: np.ndarray
    std: np.ndarray

    @functools.cached_property
    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """All training plates' perturbed images and labels, pooled (ERM's view)."""
        return (np.concatenate([p.images for p in self.train]),
                np.concatenate([p.labels for p in self.train]))

    def norm(self, x: np.ndarray) -> np.ndarray:
        """Per-channel standardization with the training images' statistics."""
        return ((x - self.mean) / self.std).astype(np.float32)


def make_world(seed: int) -> World:
    """Generate the world of data seed `seed`."""
    rng = np.random.default_rng(seed)
    train = [make_plate(rng, *mild_shift(rng)) for _ in range(TRAIN_PLATES)]
    mild = make_plate(rng, *mild_shift(rng))
    test = make_plate(rng, *strong_shift(rng))
    pixels = np.concatenate([p.images for p in train]).reshape(-1, C)
    return World(train, mild, test, pixels.mean(0), pixels.std(0))


@dataclasses.dataclass
class ArrayUnit:
    """An in-memory `jaxadapt.methods.base.Unit`: padded batches of images, plus controls."""

    name: str
    images: np.ndarray
    control_images: np.ndarray
    batch_size: int = L

    def batches(self) -> Iterator[UnitBatch]:
        for start in range(0, len(self.images), self.batch_size):
            x = self.images[start : start + self.batch_size]
            pad = self.batch_size - len(x)
            mask = np.arange(self.batch_size) < len(x)
            yield UnitBatch(np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]), mask)

    def controls(self, count: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        n = len(self.control_images)
        return self.control_images[rng.choice(n, size=count, replace=count > n)]

    def all_controls(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self.control_images), self.batch_size):
            yield self.control_images[start : start + self.batch_size]


def plate_unit(world: World, plate: Plate, name: str,
               classes: list[int] | None = None) -> tuple[ArrayUnit, np.ndarray]:
    """The plate as a unit (optionally only images of `classes`), and its labels."""
    keep = np.ones(len(plate.labels), bool) if classes is None else np.isin(plate.labels, classes)
    unit = ArrayUnit(name, world.norm(plate.images[keep]), world.norm(plate.controls))
    return unit, plate.labels[keep]


# ------------------------------------------------------------------------------ training

MODEL = ResNet(stage_sizes=(1, 1), block_cls=BasicBlock, width=8, stem="small",
               num_classes=K, in_channels=C)
LEARNING_RATE = 3e-3


def _init(seed: int, tx: optax.GradientTransformation):
    key = jax.random.key(seed, impl="rbg")
    return create_train_state(MODEL, tx, key, (1, SIZE, SIZE, C))


def _erm_batch(world: World, rng: np.random.Generator) -> dict[str, Any]:
    """A batch of L perturbed images mixed over the training plates (as ERM draws them)."""
    x, y = world.pooled
    pick = rng.choice(len(y), size=L, replace=False)
    return {"image": world.norm(x[pick]), "label": y[pick].astype(np.int32),
            "mask": np.ones(L, bool)}


def _episode_batch(world: World, rng: np.random.Generator, n_controls: int) -> dict[str, Any]:
    """E episodes, each L perturbed + `n_controls` controls of one random training plate."""
    img, lab, ctl = [], [], []
    for _ in range(E):
        p = world.train[rng.integers(len(world.train))]
        i = rng.choice(len(p.labels), size=L, replace=False)
        j = rng.choice(len(p.controls), size=n_controls, replace=False)
        img.append(world.norm(np.concatenate([p.images[i], p.controls[j]])))
        lab.append(np.concatenate([p.labels[i], -np.ones(n_controls, np.int64)]))
        ctl.append(np.arange(L + n_controls) >= L)
    return {"image": np.stack(img), "label": np.stack(lab).astype(np.int32),
            "is_control": np.stack(ctl)}


def train(world: World, step_factory: Callable, batch_fn: Callable, n_steps: int,
          episode: tuple[int, int] | None, seed: int) -> dict[str, Any]:
    """Runs `n_steps` jitted steps of `step_factory(model, tx)` on `batch_fn(world, rng)`.

    An episodic recipe's variables record its episode shape (L, N), as the package's
    trainer records it, so that the share check of the predictors can read it.
    """
    tx = optax.adam(LEARNING_RATE)
    state = _init(seed, tx)
    step = jax.jit(step_factory(MODEL, tx))
    rng = np.random.default_rng(seed)
    for _ in range(n_steps):
        state, _ = step(state, jax.tree.map(jnp.asarray, batch_fn(world, rng)))
    variables = state.variables()
    return variables if episode is None else shares.with_episode_shape(variables, *episode)


#: Trainer name (a Method's ``trainer``) -> (step factory, batch function, steps, episode
#: shape (L, N) or None). Step counts give every trainer the same number of perturbed
#: images (400 * L = 100 * E * L).
TRAINERS: dict[str, tuple[Callable, Callable, int, tuple[int, int] | None]] = {
    "erm": (steps.make_train_step, _erm_batch, 400, None),
    "arm_bn": (arm.make_episodic_train_step, lambda w, r: _episode_batch(w, r, 0), 100, (L, 0)),
    "cs_arm_bn": (arm.make_episodic_train_step, lambda w, r: _episode_batch(w, r, N), 100, (L, N)),
    # BEN: the same episodes, perturbed rows normalized with their controls' statistics.
    "ben": (functools.partial(arm.make_episodic_train_step, controls_from=L),
            lambda w, r: _episode_batch(w, r, N), 100, (L, N)),
}


def train_all(world: World, names, seed: int) -> dict[str, dict[str, Any]]:
    """Trainer name -> trained variables, for each name in `names`."""
    return {n: train(world, *TRAINERS[n], seed) for n in names}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose argmax is the label."""
    return float(np.mean(np.argmax(logits, -1) == labels))
