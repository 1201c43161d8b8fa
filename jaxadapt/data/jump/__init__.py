"""JUMP-CP images from the Cell Painting Gallery into the cached image store.

`load_data` reads CellProfiler load_data tables and JUMP's metadata into sites;
`checks` checks tables and TIFF headers before any pixel is read; `sites` reads and
preprocesses one site; `build` plans a build; `shards` (local, resumable) and `beam`
(Apache Beam) write the store; `images.build_jump_store` is the entry point.
"""
