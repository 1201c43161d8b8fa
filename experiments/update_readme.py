"""Writes the generated results tables of the README and of docs/results.md.

    python experiments/update_readme.py runs/quickstart/results.json runs/domain_gap_both/results.json
    python experiments/update_readme.py --target docs/results.md runs/quickstart/results.json ...

Each target file holds one generated block, between `<!-- results:start -->` and
`<!-- results:end -->`: README.md the headline tables (the quickstart and domain_gap),
docs/results.md every study's table. The block is replaced by one Markdown table per
results.json file, in the order given (as the study's `results.md`: mean ± std (n) per
method and split), each followed by the seeds and training sources recorded in the file's
config, so the numbers on the page are the code's output. A table's heading is one level
below the last heading before the block (`### quickstart` under README's `## Results`,
`## quickstart` under docs/results.md's `# Results`).

A target without both markers, in that order, is an error that names the file and the
markers; nothing is written then.
"""

from __future__ import annotations

import argparse
import json
import re

from jaxadapt.eval import reports

START, END = "<!-- results:start -->", "<!-- results:end -->"
TARGETS = ("README.md", "docs/results.md")


def section(paths: list[str], level: int = 2) -> str:
    """The Markdown of every results file, in the order given, headed at `level` (## = 2)."""
    parts = []
    for path in paths:
        with open(path) as f:
            payload = json.load(f)
        rows = reports.load_rows(path)
        table = reports.markdown_table(rows, title=payload["study"]).rstrip()
        parts.append(re.sub(r"^## ", "#" * level + " ", table, count=1))
        cfg = payload["config"]
        parts.append(f"\n_`configs/{payload['study']}.py`: seeds {list(cfg.get('seeds', []))}, "
                     f"training source(s) {list(cfg.get('train_sources', []))}._\n")
    return "\n".join(parts)


def heading_level(text: str, before: int) -> int:
    """One more than the level of the last Markdown heading before offset `before` (at most 6)."""
    levels = [len(m.group(1)) for m in re.finditer(r"^(#{1,6}) ", text[:before], re.M)]
    return min((levels[-1] if levels else 0) + 1, 6)


def replace_block(text: str, body_paths: list[str], target: str) -> str:
    """`text` with its generated block rewritten from `body_paths`.

    Raises:
      SystemExit: `text` lacks a marker, or they come in the wrong order.
    """
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise SystemExit(f"error: {target} lacks the markers {START} ... {END} (in that order) "
                         "around its generated results; add them where the tables belong")
    body = section(body_paths, level=heading_level(text, start))
    return text[:start] + f"{START}\n{body}\n{END}" + text[end + len(END):]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results.json files, in the order to show")
    parser.add_argument("--target", default="README.md",
                        help=f"the Markdown file whose generated block to rewrite, e.g. {' or '.join(TARGETS)}")
    args = parser.parse_args()
    with open(args.target) as f:
        text = f.read()
    new = replace_block(text, args.results, args.target)
    with open(args.target, "w") as f:
        f.write(new)
    print(f"wrote {len(args.results)} table(s) into {args.target}")


if __name__ == "__main__":
    main()
