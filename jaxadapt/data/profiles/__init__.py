"""CellProfiler well profiles: loaded into the site-table schema, normalized per plate.

`tables` loads well-level JUMP profiles (parquet, csv) into a `SiteTable` plus a feature
matrix; `norm` normalizes each plate against its DMSO wells; `config` checks the
`config.data.profiles` section.
"""

from jaxadapt.data.profiles.config import section_problems
from jaxadapt.data.profiles.norm import METHODS as NORMALIZATIONS
from jaxadapt.data.profiles.tables import NONFINITE_POLICIES, UNLABELLED_POLICIES

__all__ = ["NONFINITE_POLICIES", "NORMALIZATIONS", "UNLABELLED_POLICIES", "section_problems"]
