"""CellProfiler well profiles: loaded into the site-table schema, normalized per plate.

`tables` loads well-level JUMP profiles (parquet, csv) into a `SiteTable` plus a feature
matrix; `norm` normalizes each plate against its DMSO wells; `config` checks the
`config.data.profiles` section.
"""

from jaxadapt._faces import lazy_face

_EXPORTS = {
    "NONFINITE_POLICIES": "jaxadapt.data.profiles.tables",
    "NORMALIZATIONS": "jaxadapt.data.profiles.norm:METHODS",
    "UNLABELLED_POLICIES": "jaxadapt.data.profiles.tables",
    "section_problems": "jaxadapt.data.profiles.config",
}
__getattr__, __dir__, __all__ = lazy_face(__name__, _EXPORTS)
