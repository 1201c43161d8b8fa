"""Writes the README's results section from studies' results.json files.

    python experiments/update_readme.py runs/erm/results.json runs/domain_gap/results.json ...

Replaces the text between `<!-- results:start -->` and `<!-- results:end -->` in
README.md with one Markdown table per file (as `results.md`), plus the command line
recorded in each file's config, so the README's numbers are the code's output.
"""

from __future__ import annotations

import argparse
import json
import re

from jaxadapt.eval import reports

START, END = "<!-- results:start -->", "<!-- results:end -->"


def section(paths: list[str]) -> str:
    """The Markdown of every results file, in the order given."""
    parts = []
    for path in paths:
        with open(path) as f:
            payload = json.load(f)
        rows = reports.load_rows(path)
        parts.append(reports.markdown_table(rows, title=payload["study"]).rstrip())
        cfg = payload["config"]
        parts.append(f"\n_`configs/{payload['study']}.py`: seeds {list(cfg.get('seeds', []))}, "
                     f"training source(s) {list(cfg.get('train_sources', []))}._\n")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results.json files")
    parser.add_argument("--readme", default="README.md")
    args = parser.parse_args()
    text = open(args.readme).read()
    if START not in text or END not in text:
        raise SystemExit(f"{args.readme} lacks the markers {START} ... {END}")
    body = section(args.results)
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda m: f"{START}\n{body}\n{END}", text, flags=re.S)
    with open(args.readme, "w") as f:
        f.write(new)
    print(f"wrote {len(args.results)} table(s) into {args.readme}")


if __name__ == "__main__":
    main()
