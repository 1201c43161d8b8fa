"""Data: the site table, stores, splits, samplers and pipelines, and three wings.

The shared core: `schema` (the site table), `store` (array_record stores), `fileio`,
`splits` (in-domain / new batch / new source), `subsets`, `sampling` (plate episodes,
evaluation units, label shift), `pipeline` (grain batches, `DataView`), `transforms`,
`views` (DINO multi-crop views), `pairs` (cross-batch pairs). The wings: `sim` (the
built-in simulator), `jump` (JUMP-CP images from the Cell Painting Gallery), `profiles`
(CellProfiler well profiles); `worlds.load_world` picks the wing a study reads, and is
the only module that reaches into them.
"""

from jaxadapt._faces import lazy_face

_EXPORTS = {
    "CHANNELS": "jaxadapt.data.schema",
    "DMSO": "jaxadapt.data.schema",
    "DataView": "jaxadapt.data.pipeline",
    "NO_LABEL": "jaxadapt.data.schema",
    "SiteTable": "jaxadapt.data.schema",
    "load_world": "jaxadapt.data.worlds",
    "make_splits": "jaxadapt.data.splits",
}
__getattr__, __dir__, __all__ = lazy_face(__name__, _EXPORTS)
