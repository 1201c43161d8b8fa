"""Merges one-replicate results.json files of a study (e.g. seeds run separately) into one.

    python experiments/merge_results.py --out runs/domain_gap_3seeds \
        runs/dg_seed0/results.json runs/dg_seed1/results.json runs/dg_seed2/results.json

Each input must hold single-replicate rows (n = 1: one seed and training source each), of
the same study; the output's rows are mean +- std over the inputs, written as
results.{json,md,csv,png} by the same code as a study run, with the inputs' configs kept.
"""

from __future__ import annotations

import argparse
import json

from jaxadapt.eval import reports


def merged_scores(paths: list[str]) -> tuple[str, list[reports.Score], list[dict]]:
    """(study, one Score per input row, the inputs' configs).

    Raises:
      SystemExit: inputs of different studies, or rows that already aggregate replicates.
    """
    studies, scores, configs = set(), [], []
    for path in paths:
        with open(path) as f:
            payload = json.load(f)
        studies.add(payload["study"])
        configs.append(payload["config"])
        for row in reports.load_rows(path):
            if row.n != 1:
                raise SystemExit(f"{path}: row {row.method}/{row.split}/{row.metric} aggregates "
                                 f"{row.n} replicates; merge single-replicate results only")
            scores.append(reports.Score(row.method, row.split, row.metric, row.mean,
                                        row.setting, run=path))
    if len(studies) != 1:
        raise SystemExit(f"the inputs hold different studies {sorted(studies)}; merge one study")
    return studies.pop(), scores, configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="single-replicate results.json files")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args()
    study, scores, configs = merged_scores(args.results)
    rows = reports.aggregate(scores)
    seeds = sorted({s for c in configs for s in c.get("seeds", [])})
    sources = sorted({s for c in configs for s in c.get("train_sources", [])})
    config = dict(configs[0], seeds=seeds, train_sources=sources, merged_from=args.results)
    paths = reports.write_results(args.out, study, config, rows)
    print(reports.markdown_table(rows, title=study))
    print(f"merged {len(args.results)} files into {paths['json']}")


if __name__ == "__main__":
    main()
