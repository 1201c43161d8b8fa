"""The BatchNorm family's checks of how its episodic recipes split work over devices.

Run by `jaxadapt.eval.validation` on a built study, as the `device_check` of the
arm_bn, cs_arm_bn and ben recipes (`jaxadapt.methods.registry.TRAINERS`).
"""

from __future__ import annotations

from typing import Any

from jaxadapt.config_rules import get, guarded
from jaxadapt.methods.bn import episodic


def episode_problems(cfg: Any) -> list[str]:
    """The episodes per step, split over processes x local devices (whole episodes).

    Args:
      cfg: the study config.

    Returns:
      One message per problem, naming the key, the value and the fix.
    """
    return guarded(episodic.check_episodes, get(cfg, "arm.episodes_per_step"))
