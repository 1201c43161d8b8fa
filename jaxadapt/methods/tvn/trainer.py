"""The `tvn` recipe: a frozen extractor's embeddings of the training source -> TVN + linear head.

The extractor is another recipe's model, loaded from (or trained into) *that* recipe's
checkpoint, the sibling of this run's directory (`<checkpoint_dir>/<source>/seed<k>/
<erm|dino>-<hash>`), so a study scoring both `erm` and `tvn` trains the ResNet once.
With `tvn.extractor="file"` the embeddings are the user's array and nothing is trained.
The TVN map and the head (seconds to fit) are checkpointed in this run's directory.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from jaxadapt.data import sampling as samplers
from jaxadapt.methods.tvn import head as tvn_head
from jaxadapt.train.checkpoint import Checkpointer


log = logging.getLogger(__name__)
Variables = dict[str, Any]


def embed_rows(embed, variables: Variables, view, rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Frozen embeddings of `rows` (evaluation transform), in row order.

    Every process embeds every row (the training split is read once per replicate).

    Args:
      embed: `(variables, images) -> [B, D]` from `tvn_head.make_embedder`.
      variables: the extractor's variables.
      view: the DataView.
      rows: int rows.
      batch_size: rows per forward pass.

    Returns:
      float64 [len(rows), D].
    """
    index, mask = samplers.padded_batches(rows, batch_size)
    out = [np.asarray(embed(variables, b["image"]), np.float64)[m]
           for b, m in zip(view.eval_batches(index), mask)]
    return np.concatenate(out)


def _restore(run_dir: str) -> Variables | None:
    """The checkpointed TVN map and head, or None before the first fit."""
    with Checkpointer(os.path.join(run_dir, "tvn_head"), max_to_keep=1, async_save=False) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            return None
        meta = ckpt.restore_meta(step)
        k, d, c = meta["out_dim"], meta["in_dim"], meta["num_classes"]
        template = {"tvn": {"mean": np.zeros(d), "scale": np.zeros(d),
                            "components": np.zeros((d, k)), "pc_std": np.zeros(k)},
                    "head": {"weights": np.zeros((k, c), np.float32),
                             "bias": np.zeros((c,), np.float32)}}
        _, payload, _ = ckpt.restore_latest(template)
        return jax.tree.map(np.asarray, jax.device_get(payload))


def make_tvn_trainer(model, config: ml_collections.ConfigDict,
                     extractor: tuple[Callable, str] | None = None):
    """Builds the `tvn` training function once per study.

    Args:
      model: the study's architecture (the extractor for "erm"; the ViT for "dino").
      config: the study config; reads `tvn`, `model.num_classes` and
        `train.eval_batch_size`.
      extractor: for `tvn.extractor` "erm" or "dino", that recipe's training function
        and checkpoint key (`jaxadapt.methods.registry` passes them), so the frozen
        extractor is the very model that recipe trains and checkpoints; None for "file".

    Returns:
      `train(view, rows, run_dir, seed) -> {"extractor", "tvn", "head"}`.

    Raises:
      ValueError: `extractor` missing for a model extractor, or given for "file".
    """
    t = config.tvn
    tcfg = tvn_head.TransformConfig(bool(t.per_unit), bool(t.coral), float(t.coral_lam))
    head_cfg = {"steps": int(t.head_steps), "learning_rate": float(t.head_lr),
                "weight_decay": float(t.head_weight_decay)}
    from_file = t.extractor == "file"
    if from_file != (extractor is None):
        raise ValueError(f"tvn.extractor={t.extractor!r} needs "
                         f"{'no' if from_file else 'its'} extractor recipe; build the tvn "
                         "trainer through jaxadapt.methods.registry.build_trainers")
    if not from_file:
        extractor_train, extractor_key = extractor
        embed = tvn_head.make_embedder(model, t.extractor)

    def train(view, rows: dict[str, np.ndarray], run_dir: str, seed: int) -> Variables:
        extractor: Variables = {}
        if not from_file:
            extractor_dir = os.path.join(os.path.dirname(run_dir), extractor_key)
            extractor = extractor_train(view, rows, extractor_dir, seed)
        fitted = _restore(run_dir)
        if fitted is None:
            fitted = _fit(view, rows["train"], extractor)
            _save(run_dir, fitted, config.model.num_classes)
        return {"extractor": extractor, **fitted}

    def _fit(view, train_rows: np.ndarray, extractor: Variables) -> Variables:
        table = view.table
        if from_file:
            arr = tvn_head.load_embedding_file(t.embeddings_file, len(table))
            emb = np.asarray(arr[train_rows], np.float64)
        else:
            emb = embed_rows(embed, extractor, view, train_rows, config.train.eval_batch_size)
        head = tvn_head.fit_head_pipeline(
            emb, table["is_control"][train_rows], table["plate"][train_rows],
            table["label"][train_rows], tcfg, num_classes=config.model.num_classes,
            head=head_cfg, min_variance=float(t.min_variance))
        log.info("tvn: %d training rows, %d -> %d dimensions", len(train_rows), emb.shape[1],
                 head.tvn.out_dim)
        return tvn_head.head_variables(head)

    return train


def _save(run_dir: str, fitted: Variables, num_classes: int) -> None:
    d, k = fitted["tvn"]["components"].shape
    meta = {"in_dim": int(d), "out_dim": int(k), "num_classes": int(num_classes)}
    with Checkpointer(os.path.join(run_dir, "tvn_head"), max_to_keep=1, async_save=False) as ckpt:
        ckpt.save(0, fitted, meta)
