"""Checks a whole study config before anything is rendered or trained.

`validate(cfg)` checks every field a study reads -- types, ranges, names, and the
relations between fields (crop_size <= image_size, training sources among the
simulated ones, enough batches for the splits, batch sizes that split over the
processes and devices) -- and raises one `ConfigError` listing every problem, each naming the key,
its value and the fix. `jaxadapt.eval.study` calls it first, so a bad value fails in a
second instead of after minutes of rendering and training.

Checks that live beside the code that needs them are called from here, not restated:
the simulator design (`data.sim.design.check_config`), the split counts
(`data.splits.batch_counts`, `in_domain_fraction`), the training loop's settings
(`train.loop.FitConfig`), the device and process split of a batch
(`train.supervised.check_batch_size`, each recipe's `device_check`), the model and
method names (`models.build_model`, `methods.registry`), and each method family's own
sections (`methods.registry.config_problems`: `methods.coda.checks`,
`methods.tvn.checks`). The sweep's checks live in `sweep_checks`;
`eval.protocol.swept_settings` calls them too.

The study's checks live in modules by section, each returning a list of messages:
`jaxadapt.config_rules` (the shared helpers), `scalar_checks` (the scalar fields),
`study_checks` (seeds, methods, sources, splits, the data design, profiles),
`jump_checks` (`data.jump`), `method_checks` (retrieval, training, devices, adapt_on)
and `sweep_checks`. This module runs them in a fixed order.
"""

from __future__ import annotations

import ml_collections

from jaxadapt.config_rules import get, guarded
from jaxadapt.eval import jump_checks
from jaxadapt.eval.method_checks import device_problems, retrieval_problems, train_problems
from jaxadapt.eval.scalar_checks import scalar_problems
from jaxadapt.eval.study_checks import data_problems, profile_problems, study_problems
from jaxadapt.eval.sweep_checks import sweep_problems
from jaxadapt.methods.registry import config_problems
from jaxadapt.models import build_model


class ConfigError(ValueError):
    """Every problem of a config: `problems`, one per line of the message."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = list(problems)


_CHECKS = (scalar_problems, jump_checks.key_problems, study_problems, data_problems,
           profile_problems, train_problems, config_problems, retrieval_problems,
           lambda cfg: guarded(build_model, cfg.model),
           lambda cfg: sweep_problems(get(cfg, "sweep")))


def problems(cfg: ml_collections.ConfigDict) -> list[str]:
    """Every problem of a study config, each naming the key, its value and the fix.

    Args:
      cfg: the study config (see `jaxadapt.config.get_defaults`).

    Returns:
      The messages, in a fixed order; [] for a valid config.
    """
    out: list[str] = []
    for check in _CHECKS:
        try:
            found = check(cfg)
        except ValueError as err:  # a reused check that raises the first problem
            found = [str(err)]
        except (KeyError, AttributeError, TypeError) as err:
            found = [f"config is malformed near {err}; start from jaxadapt.config.get_defaults()"]
        out += [p for p in found if p not in out]
    if not out:
        out = device_problems(cfg)
    return out


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` (a ValueError) listing every problem of a study config.

    Args:
      cfg: the study config.

    Raises:
      ConfigError: one line per problem, each naming the key, its value and the fix.
    """
    found = problems(cfg)
    if found:
        raise ConfigError(found)
