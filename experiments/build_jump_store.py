"""Builds the JUMP image stores of one or more plates ahead of a study (local or on Beam).

One store per load_data table, cached under --data_dir by the same key a study computes,
so a study run later with the same tables and options reuses them. Flags this script
does not know are handed to Apache Beam as pipeline options (engine "beam"), e.g.

  python experiments/build_jump_store.py --engine beam \\
      --load_data '/data/cpg0016-jump/source_4/workspace/load_data_csv/*/*/load_data.csv.gz' \\
      --well_csv /data/metadata/well.csv.gz --plate_csv /data/metadata/plate.csv.gz \\
      --labels labels.csv --path_map s3://cellpainting-gallery/=/data/ --data_dir /shared/stores \\
      --runner=FlinkRunner --flink_master=flink-jm:8081 --environment_type=LOOPBACK
"""

from __future__ import annotations

import argparse
import csv
import glob
import logging
import sys

from jaxadapt.data import jump_images, schema


def read_labels(path: str) -> tuple[dict[str, int], dict[str, str]]:
    """Reads a label table (`Metadata_JCP2022`, `label`, optional `moa`) -> maps.

    Raises:
      ValueError: naming the file and the missing column.
    """
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("Metadata_JCP2022", "label") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"label table {path} lacks column(s) {missing}; it needs "
                             "Metadata_JCP2022 (compound) and label (class index 0..K-1)")
        rows = list(reader)
    labels = {r["Metadata_JCP2022"]: int(r["label"]) for r in rows}
    moa = {r["Metadata_JCP2022"]: r.get("moa", "") or "" for r in rows}
    return labels, moa


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our flags, and the rest (Beam pipeline options)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load_data", nargs="+", required=True, help="load_data files or globs")
    p.add_argument("--well_csv", required=True)
    p.add_argument("--labels", required=True, help="csv: Metadata_JCP2022,label[,moa]")
    p.add_argument("--plate_csv", default=None)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--path_map", action="append", default=[], help="PREFIX=LOCAL, repeatable")
    p.add_argument("--engine", choices=("local", "beam"), default="local")
    p.add_argument("--image_size", type=int, default=None)
    p.add_argument("--downsample", type=int, default=2)
    p.add_argument("--upper_percentile", type=float, default=99.99)
    p.add_argument("--illum", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--on_bad_site", choices=("raise", "skip"), default="raise")
    p.add_argument("--shard_sites", type=int, default=256)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--no_header_check", action="store_true",
                   help="skip the per-file TIFF header scan (very large builds)")
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
    """Builds every store; returns their directories' record counts as lines."""
    args, beam_args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    files = sorted({f for pattern in args.load_data for f in (glob.glob(pattern) or [pattern])})
    path_map = {}
    for item in args.path_map:
        prefix, sep, local = item.partition("=")
        if not sep:
            raise ValueError(f"--path_map {item!r}: use PREFIX=LOCAL")
        path_map[prefix] = local
    if beam_args and args.engine != "beam":
        raise ValueError(f"unknown flags {beam_args} (Beam options need --engine beam)")
    beam_options = None
    if args.engine == "beam":
        # pylint: disable-next=g-import-not-at-top
        from apache_beam.options import pipeline_options
        beam_options = pipeline_options.PipelineOptions(beam_args)
    labels, moa = read_labels(args.labels)
    lines = []
    for ld in files:
        source, table = jump_images.build_jump_store(
            ld, args.well_csv, labels, args.data_dir, channels=schema.CHANNELS,
            image_size=args.image_size, downsample=args.downsample,
            upper_percentile=args.upper_percentile, path_map=path_map, moa_map=moa,
            engine=args.engine, plate_csv=args.plate_csv,
            illum={"auto": None, "on": True, "off": False}[args.illum],
            on_bad_site=args.on_bad_site, shard_sites=args.shard_sites,
            num_workers=args.workers, beam_options=beam_options,
            check_headers=not args.no_header_check)
        lines.append(f"{ld}: {len(source)} sites, plates {table.unique('plate').tolist()}")
        print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
