"""The one protocol runner: train on source domains, adapt and predict per target unit, score.

Every method plugs in through `jaxadapt.methods.base.Method`; this loop is never copied
per method. A replicate is one (training source, seed) pair; its trained models are
checkpointed under the workdir, so a re-run resumes instead of retraining.
"""

from __future__ import annotations

import collections
import copy
import logging
import os
from typing import Any, Iterable, Mapping, NamedTuple

import jax
import flax.linen as nn
import ml_collections
import numpy as np

from jaxadapt.data import sampling as samplers, splits as splits_lib, subsets
from jaxadapt.data.pipeline import DataView
from jaxadapt.eval import metrics, retrieval, validation
from jaxadapt.eval.method_checks import adapt_on_problem
from jaxadapt.eval.sweep_checks import sweep_problems
from jaxadapt.eval.reports import Score
from jaxadapt.eval.units import PipelineUnit
from jaxadapt.methods import registry
from jaxadapt.methods.base import Method, Variables


log = logging.getLogger(__name__)

# (data view, rows of each split, checkpoint dir, seed) -> trained variables. Built once
# per study, so jitted steps compile once and serve every replicate.
TrainFn = registry.TrainFn


class Replicate(NamedTuple):
    """One independent repetition of a study: a training source and a seed."""

    train_source: str
    seed: int

    @property
    def run_id(self) -> str:
        return f"train_source={self.train_source},seed={self.seed}"


def training_key(cfg: ml_collections.ConfigDict, trainer: str) -> str:
    """A short hash of everything that determines the weights a trainer produces.

    Checkpoints live under this key, so studies that share `config.checkpoint_dir`
    reuse a trained model only when it was trained the same way; any other change
    trains anew instead of silently reusing a model trained differently. What enters
    the hash is what the recipe declares (`jaxadapt.methods.recipe.Trainer`): the
    common sections (data, splits, model) and its own (e.g. train, arm), without the
    fields it never reads, nor the settings of the data sources the study does not read
    (`jaxadapt.methods.recipe.unused_data_keys`: a simulator study's keys are those it had before
    real data and profiles).

    Args:
      cfg: the study config.
      trainer: the training recipe's name.

    Returns:
      `<trainer>-<12 hex digits>`.

    Raises:
      ValueError: an unknown recipe, naming the known ones.
    """
    return registry.checkpoint_key(cfg, trainer)


class TrainerSpec(NamedTuple):
    """A training recipe and the config overrides a method needs from it.

    Attributes:
      name: the recipe (`erm`, `arm_bn`, `cs_arm_bn`, ...).
      overrides: sorted ((dotted config key, value), ...) applied to the study config
        before training, e.g. (("arm.n_controls", 128),); () for the config as it is.
    """

    name: str
    overrides: tuple[tuple[str, Any], ...] = ()


def _get(cfg: ml_collections.ConfigDict, path: str) -> Any:
    node = cfg
    for key in path.split("."):
        if not hasattr(node, "keys") or key not in node:
            raise ValueError(f"training override {path!r}: the config has no such key; "
                             "use a dotted key of the study config, e.g. 'arm.n_controls'")
        node = node[key]
    return node


def trainer_spec(method: Method, cfg: ml_collections.ConfigDict) -> TrainerSpec:
    """The canonical recipe a method's weights come from.

    Overrides the recipe never reads (`Trainer.reads`: outside its sections, or among
    its ignored fields) or that equal the config's value are dropped, so that
    identically trained models are built and stored once.

    Args:
      method: the method.
      cfg: the study config.

    Returns:
      The TrainerSpec.
    """
    recipe = registry.get(method.trainer)
    keep = [(k, v) for k, v in method.train_overrides if recipe.reads(k) and _get(cfg, k) != v]
    return TrainerSpec(method.trainer, tuple(sorted(keep, key=lambda kv: kv[0])))


def training_config(cfg: ml_collections.ConfigDict, spec: TrainerSpec) -> ml_collections.ConfigDict:
    """The study config with a spec's overrides applied (a copy; `cfg` is unchanged).

    Args:
      cfg: the study config.
      spec: from `trainer_spec`.

    Returns:
      `cfg` itself without overrides, else a changed deep copy.
    """
    if not spec.overrides:
        return cfg
    out = copy.deepcopy(cfg)
    for path, value in spec.overrides:
        _get(out, path)  # names a missing key
        *parents, leaf = path.split(".")
        node = out
        for key in parents:
            node = node[key]
        node[leaf] = value
    return out


def build_trainers(model: nn.Module, methods: Iterable[tuple[dict, Method]],
                   cfg: ml_collections.ConfigDict) -> dict[TrainerSpec, TrainFn]:
    """One training function per distinct recipe the methods need, each built once.

    Args:
      model: the architecture.
      methods: (setting, method) pairs from `method_settings`.
      cfg: the study config.

    Returns:
      TrainerSpec -> training function (built with the spec's training config).
    """
    specs = sorted({trainer_spec(m, cfg) for _, m in methods}, key=repr)
    return {spec: registry.build_trainers(model, training_config(cfg, spec), {spec.name})[spec.name]
            for spec in specs}


def checkpoint_path(cfg: ml_collections.ConfigDict, rep: Replicate, trainer: str, workdir: str) -> str:
    """Where a replicate's trained model lives: `<checkpoint_dir>/<source>/seed<k>/<training_key>`.

    Args:
      cfg: the config the model is trained with (`training_config` of the study config
        and the recipe's overrides); `checkpoint_dir` ("" means `<workdir>/checkpoints`).
      rep: the replicate.
      trainer: the training recipe's name.
      workdir: the study's run directory.

    Returns:
      The directory path.
    """
    root = cfg.get("checkpoint_dir") or os.path.join(workdir, "checkpoints")
    return os.path.join(root, rep.train_source, f"seed{rep.seed}", training_key(cfg, trainer))


def replicates(cfg: ml_collections.ConfigDict) -> list[Replicate]:
    """The study's replicates: every training source (leave-one-source-out fold) x seed."""
    return [Replicate(s, int(seed)) for s in cfg.train_sources for seed in cfg.seeds]


def swept_settings(cfg: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """The settings a study sweeps (`config.sweep`), e.g. [{"alpha": 0.01}, {"L": 16, "N": 0}].

    Keys the runner understands: `L` (test batch = context size), `alpha` (Dirichlet
    label shift; "balanced" for none), `unit` (adaptation unit), `adapt_on` (the subset of
    a unit methods adapt on, `jaxadapt.data.subsets`); any other key (e.g. `N`, the
    control count) is read by the methods. An empty sweep is one empty setting.

    Raises:
      ValueError: (a `validation.ConfigError`) naming each malformed setting, key and value.
    """
    problems = sweep_problems(cfg.get("sweep"))
    if problems:
        raise validation.ConfigError(problems)
    return [dict(s) for s in (cfg.get("sweep") or ({},))]


#: Setting keys the runner itself reads (how test units and batches are cut, and which
#: subset of a unit methods adapt on).
RUNNER_KEYS = ("L", "alpha", "unit", "adapt_on")


def method_settings(model: nn.Module, cfg: ml_collections.ConfigDict,
                    sweep: list[dict[str, Any]]) -> list[tuple[dict[str, Any], Method]]:
    """Every (setting, method) pair to score, without repeats over ignored keys.

    A setting is projected onto the runner's keys plus the keys the method declares, so
    e.g. arm_bn under a sweep of N in {0, 16, 128} is scored once per L, not three times.

    Args:
      model: the architecture.
      cfg: the study config; its `methods`, in table order, are built
        (`jaxadapt.methods.registry.make_method`).
      sweep: from `swept_settings`.

    Returns:
      (projected setting, method) pairs, each method built once per distinct setting.
    """
    pairs, seen = [], set()
    for name in cfg.methods:
        probe = registry.make_method(name, model, cfg, {})
        for setting in sweep:
            keep = tuple(k for k in RUNNER_KEYS if k not in probe.ignores) + probe.setting_keys
            projected = {k: v for k, v in setting.items() if k in keep}
            key = (name, tuple(sorted(projected.items(), key=lambda kv: kv[0])))
            if key not in seen:
                seen.add(key)
                method = registry.make_method(name, model, cfg, projected) if projected else probe
                pairs.append((projected, method))
    return pairs


def make_units(table, rows: np.ndarray, setting: Mapping[str, Any],
               cfg: ml_collections.ConfigDict, replicate_seed: int) -> list[samplers.EvalUnit]:
    """Cuts a split into target units and test batches as the setting asks.

    Args:
      table: metadata of every record.
      rows: the split's rows (perturbed and control).
      setting: one swept setting (`L`, `alpha`, `unit`, `adapt_on` are used here).
      cfg: study config (defaults `eval.batch_size`, `eval.unit`, `eval.adapt_on`,
        `eval.seed`).
      replicate_seed: the replicate's seed; label-shift draws depend on
        (`eval.seed`, replicate seed, unit), so every replicate sees its own draws.
        Balanced chunks are shuffled by `eval.seed` alone (identical across replicates).

    Returns:
      The split's units, each with padded batches of size L and its control rows, and
      its adaptation subset (`EvalUnit.adaptation`) when `adapt_on` is not "unit".

    Raises:
      ValueError: an unknown unit or `adapt_on`, naming the valid ones.
    """
    batch_size = int(setting.get("L", cfg.eval.batch_size))
    unit = setting.get("unit", cfg.eval.unit)
    alpha = setting.get("alpha", "balanced")
    if alpha == "balanced":
        units = samplers.eval_units(table, rows, unit=unit, batch_size=batch_size,
                                    seed=cfg.eval.seed)
    else:
        units = samplers.label_shift_units(table, rows, alpha=float(alpha), batch_size=batch_size,
                                           num_classes=cfg.model.num_classes, unit=unit,
                                           seed=(int(cfg.eval.seed), int(replicate_seed)))
    return subsets.with_adaptation(table, units, adapt_on(setting, cfg), batch_size)


def adapt_on(setting: Mapping[str, Any], cfg: ml_collections.ConfigDict) -> str:
    """The adaptation subset a setting asks for: its `adapt_on`, else `eval.adapt_on`."""
    return setting.get("adapt_on", cfg.eval.get("adapt_on", "unit"))


def check_adapt_on(method: Method, setting: Mapping[str, Any],
                   cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError when a method is asked to adapt on a subset it cannot use.

    Args:
      method: the method.
      setting: its projected setting.
      cfg: the study config.
    """
    problem = adapt_on_problem(method, adapt_on(setting, cfg))
    if problem:
        raise ValueError(problem)


def score_units(method: Method, variables: Variables, view: DataView,
                units: Iterable[samplers.EvalUnit], num_classes: int,
                events: collections.Counter | None = None) -> np.ndarray:
    """Adapts and predicts on every unit; returns the confusion matrix summed over units.

    On several processes (hosts) the units are dealt out round-robin (process p adapts
    and scores units p, p + P, ...; a unit is never split, so its adaptation is that of
    one process), and the confusion matrices and the `Method.counts` events are summed
    over processes: every process returns the same totals as a one-process run. A
    method whose adaptation is itself data-parallel over every host
    (`Method.spans_processes`: ODA, CODA) runs every unit on every process together
    instead, and each process already holds the totals.

    Args:
      method: the method under test.
      variables: trained model variables (on this process's devices).
      view: data access.
      units: target units from `make_units` (the same list on every process).
      num_classes: K.
      events: optional counter that receives the units' events (`Method.counts`; on
        several processes only those names are summed over processes).

    Returns:
      int64 confusion matrix [K, K].
    """
    cm = np.zeros((num_classes, num_classes), np.int64)
    local: collections.Counter = collections.Counter()
    # A collective method (Method.spans_processes) runs every unit on every process.
    dealt = jax.process_count() > 1 and not method.spans_processes
    units = list(units)
    for spec in units[jax.process_index()::jax.process_count()] if dealt else units:
        target = PipelineUnit(view, spec, spec.rows.shape[1])
        logits = method.predict_unit(variables, target)
        local.update(target.events)
        labels = target.labels()
        if len(logits) != len(labels):
            raise RuntimeError(
                f"method {method.name} returned {len(logits)} predictions for the "
                f"{len(labels)} samples of unit {spec.name}: a predict_unit must score every sample"
            )
        cm += metrics.confusion_matrix(labels, np.argmax(logits, -1), num_classes)
    if dealt:
        names = sorted(set(method.counts))
        cm, counts = sum_over_processes(
            (cm, np.array([local[n] for n in names], np.int64)))
        local = collections.Counter(dict(zip(names, counts.tolist())))
    if events is not None:
        events.update(local)
    return cm


def sum_over_processes(tree: Any) -> Any:
    """Sums a pytree of integer NumPy arrays over all processes (every process gets it).

    Args:
      tree: same structure and shapes on every process; counts below 2**31.

    Returns:
      The tree of int64 sums.
    """
    from jax.experimental import multihost_utils

    # int32 on the wire: without jax_enable_x64 an int64 would be narrowed anyway.
    gathered = multihost_utils.process_allgather(
        jax.tree.map(lambda x: np.asarray(x, np.int32), tree))
    return jax.tree.map(lambda x: np.asarray(x, np.int64).sum(0), gathered)


def run_replicate(rep: Replicate, cfg: ml_collections.ConfigDict, view: DataView,
                  rows: dict[str, np.ndarray], methods: Iterable[tuple[dict, Method]],
                  trainers: Mapping[TrainerSpec, TrainFn], workdir: str) -> list[Score]:
    """Trains what the methods need for one replicate, then scores every method and split.

    Besides accuracy and macro-F1, a split's rows count what a method's configured
    fallbacks did (`Method.counts`, e.g. `units_short_of_controls`) and, under label shift,
    `label_shift_short_batches`: test batches short of L because a class was taken whole.
    With `eval.retrieval`, methods with `Method.embed_unit` also get `map_replicate` and
    `map_moa` (copairs mAP of well profiles, `jaxadapt.eval.retrieval`).

    Args:
      rep: the replicate.
      cfg: study config (eval_splits, eval.unit, eval.batch_size, model.num_classes).
      view: data access normalized with this replicate's training statistics.
      rows: split name -> table rows, from `splits.make_splits`; a pair split
        `source:<a>-><b>` of `cfg.eval_splits` is scored only by replicates trained
        on a (`splits.split_rows`).
      methods: (setting, method) pairs to score; a method built for a setting.
      trainers: from `build_trainers`.
      workdir: run directory; checkpoints go below it.

    Returns:
      One Score per (method, split, metric); a setting carries the notes of the
      method's `check` (e.g. an allowed control-share mismatch).
    """
    trained: dict[TrainerSpec, Variables] = {}
    scores = []
    for setting, method in methods:
        spec = trainer_spec(method, cfg)
        if spec not in trained:
            if spec not in trainers:
                raise ValueError(
                    f"method {method.name!r} needs trainer {spec.name!r}"
                    f"{f' with {dict(spec.overrides)}' if spec.overrides else ''}, which this "
                    f"study does not provide (trainers: {sorted(t.name for t in trainers)})")
            run_dir = checkpoint_path(training_config(cfg, spec), rep, spec.name, workdir)
            trained[spec] = trainers[spec](view, rows, run_dir, rep.seed)
        check_adapt_on(method, setting, cfg)
        notes = dict(method.check(trained[spec])) if method.check else {}
        scores += _score_splits(rep, cfg, view, rows, {**setting, **notes}, method, trained[spec])
    return scores


def _score_splits(rep: Replicate, cfg: ml_collections.ConfigDict, view: DataView,
                  rows: dict[str, np.ndarray], setting: dict, method: Method,
                  variables: Variables) -> list[Score]:
    """One method under one setting on every evaluation split."""
    scores = []
    for split in cfg.eval_splits:
        split_rows = splits_lib.split_rows(view.table, rows, split, rep.train_source,
                                             cfg.eval.matrix_diagonal)
        if split_rows is None:  # a source pair trained on another replicate's source
            continue
        units = make_units(view.table, split_rows, setting, cfg, rep.seed)
        events: collections.Counter = collections.Counter()
        cm = score_units(method, variables, view, units, cfg.model.num_classes, events)
        values = {method.metric_prefix + k: v for k, v in metrics.scores(cm).items()}
        values.update({name: float(events[name]) for name in method.counts})
        if setting.get("alpha", "balanced") != "balanced":
            values["label_shift_short_batches"] = float(sum(u.short_batches for u in units))
        if method.embed_unit is not None and cfg.eval.get("retrieval", False):
            values.update(retrieval.split_retrieval(method, variables, view, units))
        for metric, value in values.items():
            scores.append(Score(method.name, split, metric, value, setting, run=rep.run_id))
        log.info("%s %s%s %s: accuracy %.3f", rep.run_id, method.name, f" {setting}" if setting else "",
                 split, metrics.accuracy(cm))
    return scores
