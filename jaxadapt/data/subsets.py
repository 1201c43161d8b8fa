"""Adaptation subsets: which rows of a target unit a method adapts on.

By default a method adapts on the unit it scores. `adapt_on` selects a subset instead
("adapt on one plate, apply to the whole source"): the rows of the unit's first plate
or first batch (sorted by name), or of a named plate or batch. The subset is itself an
`EvalUnit` (its perturbed rows in padded batches, its controls), attached to the
scored unit as `EvalUnit.adaptation`; scoring still covers every row of the unit.
"""

from __future__ import annotations

import numpy as np

from jaxadapt.data import schema
from jaxadapt.data.sampling import EvalUnit, padded_batches


#: `adapt_on` values besides "plate:<name>" and "batch:<name>".
ADAPT_ON = ("unit", "first_plate", "first_batch")
_NAMED = {"plate": "plates", "batch": "batches"}


def check_adapt_on(adapt_on: str) -> None:
    """Raises ValueError for an `adapt_on` that is not a known selector.

    Args:
      adapt_on: one of `ADAPT_ON`, or "plate:<name>" / "batch:<name>".
    """
    field, sep, name = str(adapt_on).partition(":")
    if adapt_on in ADAPT_ON or (sep and field in _NAMED and name):
        return
    raise ValueError(f"adapt_on={adapt_on!r}: use one of {ADAPT_ON}, 'plate:<plate name>' or "
                     "'batch:<batch name>'")


def _first_seen(rows: np.ndarray) -> np.ndarray:
    """Distinct rows in order of first appearance (label-shift units may repeat rows)."""
    _, first = np.unique(rows, return_index=True)
    return rows[np.sort(first)]


def adaptation_unit(table: schema.SiteTable, unit: EvalUnit, adapt_on: str,
                    batch_size: int) -> EvalUnit | None:
    """The subset of `unit` a method adapts on.

    Args:
      table: the study's SiteTable.
      unit: the scored unit.
      adapt_on: "unit" (the unit itself), "first_plate" / "first_batch" (the unit's
        plate / batch first by name among its perturbed rows), or "plate:<name>" /
        "batch:<name>" (that plate / batch of the unit).
      batch_size: rows per adaptation batch.

    Returns:
      None for "unit"; else an EvalUnit named `<unit>@<plate or batch>` with the
      subset's perturbed rows (in the unit's order, each once) and its control rows.

    Raises:
      ValueError: an unknown selector, or a named plate/batch the unit lacks (naming
        the unit's plates/batches).
    """
    check_adapt_on(adapt_on)
    if adapt_on == "unit":
        return None
    field, _, wanted = adapt_on.replace("first_", "").partition(":")
    pert = _first_seen(unit.rows[unit.mask])
    names = sorted(set(table[field][pert].tolist()))
    if not wanted:
        wanted = names[0]
    elif wanted not in names:
        raise ValueError(f"adapt_on={adapt_on!r}: unit {unit.name!r} has no {field} {wanted!r}; "
                         f"its {_NAMED[field]}: {names}")
    rows = pert[table[field][pert] == wanted]
    controls = unit.control_rows[table[field][unit.control_rows] == wanted]
    batches, mask = padded_batches(rows, batch_size)
    return EvalUnit(f"{unit.name}@{wanted}", batches, mask, controls)


def with_adaptation(table: schema.SiteTable, units: list[EvalUnit], adapt_on: str,
                    batch_size: int) -> list[EvalUnit]:
    """`units`, each carrying its adaptation subset (`EvalUnit.adaptation`).

    Args:
      table, adapt_on, batch_size: as in `adaptation_unit`.
      units: the scored units.

    Returns:
      The units unchanged for adapt_on="unit"; else copies with `adaptation` set.
    """
    check_adapt_on(adapt_on)
    if adapt_on == "unit":
        return list(units)
    return [u._replace(adaptation=adaptation_unit(table, u, adapt_on, batch_size)) for u in units]
