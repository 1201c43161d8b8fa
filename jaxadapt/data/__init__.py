"""Data: the site table, stores, splits, samplers and pipelines, and three wings.

The shared core: `schema` (the site table), `store` (array_record stores), `fileio`,
`splits` (in-domain / new batch / new source), `subsets`, `sampling` (plate episodes,
evaluation units, label shift), `pipeline` (grain batches, `DataView`), `transforms`,
`views` (DINO multi-crop views), `pairs` (cross-batch pairs). The wings: `sim` (the
built-in simulator), `jump` (JUMP-CP images from the Cell Painting Gallery), `profiles`
(CellProfiler well profiles); `worlds.load_world` picks the wing a study reads, and is
the only module that reaches into them.
"""

from jaxadapt.data.pipeline import DataView
from jaxadapt.data.schema import CHANNELS, DMSO, NO_LABEL, SiteTable
from jaxadapt.data.splits import make_splits
from jaxadapt.data.worlds import load_world

__all__ = ["CHANNELS", "DMSO", "DataView", "NO_LABEL", "SiteTable", "load_world", "make_splits"]
