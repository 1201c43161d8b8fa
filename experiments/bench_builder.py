"""Throughput of the JUMP store builder: site images/s, local engine and Beam DirectRunner.

Generates a one-plate gallery of N sites (5 uncompressed 16-bit TIFFs per site, as JUMP
ships them, pixels drawn from a gamma distribution) in a temp dir, then builds the store
with each engine from scratch and prints sites/s. The table/header check (`plan_build`)
is timed on its own too: it is part of every build.

  python experiments/bench_builder.py --sites 256 --size 512
  python experiments/bench_builder.py --engines beam \
      --beam_args "--direct_num_workers=2 --direct_running_mode=multi_processing"
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import tempfile
import time

import numpy as np
import tifffile

from jaxadapt.data import schema
from jaxadapt.data.jump import build as jump_build, images as jump_images


CLASS = "JCP2022_025848"


def make_gallery(root: str, n_sites: int, size: int, seed: int = 0) -> tuple[str, str]:
    """Writes N sites of `size` x `size` px and their load_data/well tables; returns paths."""
    rng = np.random.default_rng(seed)
    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir)
    rows, wells = [], {}
    for n in range(n_sites):
        well_idx, site = divmod(n, 9)
        well = f"{chr(ord('A') + well_idx // 24 % 16)}{well_idx % 24 + 1:02d}"
        wells[well] = schema.DMSO if well_idx % 2 == 0 else CLASS
        row = {"Metadata_Source": "source_x", "Metadata_Batch": "B1", "Metadata_Plate": "P1",
               "Metadata_Well": well, "Metadata_Site": str(site + 1)}
        for k, ch in enumerate(schema.CHANNELS):
            name = f"r{well_idx:03d}f{site + 1:02d}p01-ch{k + 1}sk1fk1fl1.tiff"
            pix = rng.gamma(2.0, 300.0, (size, size)).astype(np.uint16)
            tifffile.imwrite(os.path.join(img_dir, name), pix)
            row[f"FileName_Orig{ch}"], row[f"PathName_Orig{ch}"] = name, img_dir
        rows.append(row)
    ld = os.path.join(root, "load_data.csv")
    with open(ld, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    well_csv = os.path.join(root, "well.csv")
    with open(well_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Metadata_Source", "Metadata_Plate", "Metadata_Well", "Metadata_JCP2022"])
        w.writerows([["source_x", "P1", k, v] for k, v in wells.items()])
    return ld, well_csv


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, default=256, help="sites in the generated gallery")
    p.add_argument("--size", type=int, default=512, help="raw site height = width (px)")
    p.add_argument("--workers", type=int, default=2, help="local engine reader threads")
    p.add_argument("--engines", default="local,beam")
    p.add_argument("--beam_args", default="",
                   help="Beam pipeline flags, e.g. '--direct_num_workers=2 "
                        "--direct_running_mode=multi_processing'")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ld, wells = make_gallery(tmp, args.sites, args.size)
        mb = sum(os.path.getsize(os.path.join(tmp, "images", f))
                 for f in os.listdir(os.path.join(tmp, "images"))) / 2**20
        print(f"gallery: {args.sites} sites x 5 channels of {args.size}x{args.size} uint16 "
              f"({mb:.0f} MB) written in {time.perf_counter() - t0:.1f} s")
        prep = {"downsample": 2, "upper_percentile": 99.99, "lower_percentile": 0.0,
                "image_size": None}
        t0 = time.perf_counter()
        jump_build.plan_build(ld, wells, {CLASS: 0}, prep=prep, channels=schema.CHANNELS,
                              image_root=None, path_map=None, moa_map=None,
                              control_compounds=(schema.DMSO,), drop_unlabelled=False,
                              num_workers=args.workers)
        dt = time.perf_counter() - t0
        print(f"plan (tables + TIFF header checks): {dt:.2f} s, {args.sites / dt:.0f} sites/s")
        for engine in args.engines.split(","):
            beam_options = None
            if engine == "beam" and args.beam_args:
                # pylint: disable-next=g-import-not-at-top
                from apache_beam.options import pipeline_options
                beam_options = pipeline_options.PipelineOptions(args.beam_args.split())
            t0 = time.perf_counter()
            source, _ = jump_images.build_jump_store(
                ld, wells, {CLASS: 0}, os.path.join(tmp, f"store_{engine}"), engine=engine,
                num_workers=args.workers, progress_every_s=1e9, beam_options=beam_options)
            dt = time.perf_counter() - t0
            assert len(source) == args.sites
            flags = f" {args.beam_args}" if engine == "beam" and args.beam_args else ""
            print(f"engine={engine}{flags}: {args.sites} sites in {dt:.2f} s = "
                  f"{args.sites / dt:.1f} site images/s (whole build, plan included)")


if __name__ == "__main__":
    main()
