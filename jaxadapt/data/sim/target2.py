"""The real JUMP-Target-2 plate behind the `jump_target2` simulator preset (CODA's screen).

Facts come from `resources/jump-target/JUMP-Target-2_layout.csv` (see ORIGIN.md there; no
other file is read): 384 wells, 64 DMSO-only wells, 301 compounds + DMSO = 302 JCP2022 ids
(282 compounds in one well, 19 in two). MoA classes follow CODA's recipe as far as it is
public (the reference keeps the TARGET2 compounds that have an MoA; its table of 135
compounds in 54 classes is not published): a compound is labelled when its Drug Repurposing
Hub annotation holds exactly one MoA and at least `MIN_COMPOUNDS_PER_CLASS` TARGET2
compounds share that MoA. On the shipped annotation this gives 145 compounds in 58
classes. Every other compound (several MoAs, none, or an MoA no other compound shares)
keeps its annotation in the `moa` field but gets `NO_LABEL`.
"""

from __future__ import annotations

import collections
import csv
import functools
import pathlib

from jaxadapt.data.schema import DMSO, NO_LABEL


LAYOUT_CSV = pathlib.Path(__file__).parent / "resources" / "jump-target" / "JUMP-Target-2_layout.csv"
#: CODA's main sources (four microscope types) and the two it uses for auxiliary tests.
MAIN_SOURCES: tuple[str, ...] = ("source_3", "source_5", "source_8", "source_11")
AUX_SOURCES: tuple[str, ...] = ("source_7", "source_10")
#: A class needs this many single-MoA compounds (one compound cannot be told from its MoA).
MIN_COMPOUNDS_PER_CLASS = 2


@functools.lru_cache(maxsize=None)
def layout() -> tuple[tuple[str, str, str], ...]:
    """Returns ((well, JCP2022 id, MoA annotation), ...) of the 384 wells, file order.

    The annotation is every Repurposing Hub MoA of the compound, sorted and '|'-joined;
    "" for DMSO and for the 6 compounds without one.
    """
    with open(LAYOUT_CSV, newline="") as f:
        return tuple((r["Metadata_Well"], r["Metadata_JCP2022"], r["moa"]) for r in csv.DictReader(f))


@functools.lru_cache(maxsize=None)
def moa_classes() -> tuple[str, ...]:
    """Returns the sorted MoA class names; label k is class k."""
    per_compound = {jcp: moa for _, jcp, moa in layout() if jcp != DMSO}
    single = collections.Counter(m for m in per_compound.values() if m and "|" not in m)
    return tuple(sorted(m for m, n in single.items() if n >= MIN_COMPOUNDS_PER_CLASS))


def compound_label(moa: str) -> int:
    """Returns the class index of a compound's MoA annotation, NO_LABEL if it is no class."""
    classes = moa_classes()
    return classes.index(moa) if moa in classes else NO_LABEL


def plate_layout() -> list[tuple[str, str, str, int]]:
    """Returns [(well, compound, moa, label)] of one TARGET2 plate, sorted by well."""
    return sorted((well, jcp, moa, NO_LABEL if jcp == DMSO else compound_label(moa))
                  for well, jcp, moa in layout())
