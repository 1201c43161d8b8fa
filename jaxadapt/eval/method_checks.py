"""Checks that span the methods: retrieval's packages, the training loop, devices, adapt_on.

`train_problems` checks the training loop; `retrieval_problems` the optional metrics
extra; `device_problems` (run on an otherwise valid config) builds the methods and
checks their adaptation subsets (`adapt_on_problem`) and how their trainers split
batches and episodes over processes and devices. Each family's checks of its own
sections live beside it (`jaxadapt.methods.*.checks`). Part of `validation.validate`.
"""

from __future__ import annotations

from typing import Any

from jaxadapt.config_rules import get, guarded
from jaxadapt.eval import retrieval
from jaxadapt.methods import registry
from jaxadapt.models import build_model
from jaxadapt.train import supervised
from jaxadapt.train.loop import FitConfig


def retrieval_problems(cfg: Any) -> list[str]:
    """`eval.retrieval` needs copairs (and pandas): the optional `metrics` extra.

    Args:
      cfg: the study config.

    Returns:
      One message if retrieval is asked for and its packages are missing, else none.
    """
    missing = retrieval.missing_requirements() if get(cfg, "eval.retrieval") is True else []
    if not missing:
        return []
    return [f"config.eval.retrieval=True scores copairs mAP, but {missing} is not installed; "
            "pip install -e \".[metrics]\" (or set --config.eval.retrieval=False)"]


def train_problems(cfg: Any) -> list[str]:
    """The training loop's settings, checked by the loop's own FitConfig.

    Args:
      cfg: the study config.

    Returns:
      One message per problem, naming the key, the value and the fix.
    """
    t = cfg.train
    try:
        FitConfig(num_epochs=t.num_epochs, patience=t.patience, log_every_steps=t.log_every_steps,
                  stop_after_epochs=t.stop_after_epochs or None, progress=False)
    except ValueError as err:
        return [str(err).replace("FitConfig.", "config.train.", 1)]
    return []


def device_problems(cfg: Any) -> list[str]:
    """What needs the built methods: their adaptation subsets, their trainers being
    registered, and the batch sizes and episode counts those trainers split over devices.

    On several processes (hosts) each process reads its own equal share of every batch:
    a batch size must divide by processes x local devices, and so must the episodes
    per step of an episodic trainer (on one host they need not). Builds the model and
    each method (cheap: nothing is initialized or compiled) to learn which trainers the
    study runs; so it runs on an otherwise valid config only.

    Args:
      cfg: the study config.

    Returns:
      One message per problem, naming the key, the value and the fix.
    """
    model = build_model(cfg.model)
    methods = [registry.make_method(n, model, cfg, {}) for n in cfg.methods]
    adapt_problems = _adapt_on_problems(cfg, methods)
    if adapt_problems:
        return adapt_problems
    names = {m.trainer for m in methods}
    unknown = sorted(names - set(registry.trainer_names()))
    if unknown:
        return [f"config.methods={tuple(cfg.methods)!r} need training recipes {unknown}, which "
                f"are not registered; known trainers: {registry.trainer_names()}"]
    recipes = [registry.get(n) for n in sorted(names)]
    out = []
    for key in sorted({k for r in recipes for k in r.device_batch_fields}):
        out += guarded(supervised.check_batch_size, get(cfg, key), f"config.{key}")
    for check in dict.fromkeys(r.device_check for r in recipes if r.device_check):
        out += check(cfg)
    return out


def adapt_on_problem(method: Any, adapt_on: str) -> str | None:
    """Why `method` cannot run with adaptation subset `adapt_on`; None if it can.

    Args:
      method: a `jaxadapt.methods.base.Method`.
      adapt_on: the subset selector (`jaxadapt.data.subsets`).

    Returns:
      The message, or None ("unit", a method that adapts once per unit, or one that
      ignores adaptation).
    """
    if adapt_on == "unit" or method.adapts_on_subset or "adapt_on" in method.ignores:
        return None
    return (f"method {method.name!r} adapts on the very batches it scores, so it cannot adapt "
            f"on adapt_on={adapt_on!r} and score the whole unit; score it with adapt_on='unit' "
            "or use a method that adapts once per unit (e.g. adabn_plate, ben, cs_arm_bn_plate)")


def _adapt_on_problems(cfg: Any, methods: list) -> list[str]:
    """Methods asked (by eval.adapt_on or the sweep) to adapt on a subset they cannot use."""
    sweep = get(cfg, "sweep") or ()
    chosen = {s["adapt_on"] for s in sweep if "adapt_on" in s} | {get(cfg, "eval.adapt_on")}
    found = [adapt_on_problem(m, a) for m in methods for a in sorted(chosen)]
    return [f for f in found if f]

