"""README.md's table of headline results, written from the headline section of docs/BENCHMARKS.md.

    python scripts/readme_headline.py          # rewrite the table in README.md
    python scripts/readme_headline.py --check  # exit 1 if README.md's table is not what docs/BENCHMARKS.md gives

The table lies between the two marker lines below. It holds every table of the first section whose
heading starts with "## Headline", rows copied as they are, under a first column naming the registered
model that the text before each table mentions first, and it links to that section, which gives the
commands, the machine and the date. So a figure in the README is never typed, only copied.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from student_models import list_models

REPO = Path(__file__).resolve().parents[1]
BEGIN = "<!-- headline table: written by scripts/readme_headline.py from docs/BENCHMARKS.md, do not edit -->"
END = "<!-- end of the headline table -->"


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text, lowercased, without punctuation, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def headline_section(benchmarks: str) -> tuple[str, str]:
    """(heading text, body) of the first "## Headline" section."""
    match = re.search(r"^## (Headline[^\n]*)\n(.*?)(?=^## |\Z)", benchmarks, re.M | re.S)
    if match is None:
        raise ValueError('docs/BENCHMARKS.md has no section whose heading starts with "## Headline"')
    return match.group(1).strip(), match.group(2)


def tables(body: str) -> list[tuple[str, list[str]]]:
    """Each Markdown table of `body` as (the text since the previous table, its lines)."""
    found, before, current = [], [], []
    for line in body.splitlines():
        if line.startswith("|"):
            current.append(line)
            continue
        if current:
            found.append(("\n".join(before), current))
            before, current = [], []
        before.append(line)
    if current:
        found.append(("\n".join(before), current))
    return found


def model_named(text: str, models: list[str]) -> str:
    """The registered model that `text` names first."""
    positions = {m: hit.start() for m in models if (hit := re.search(rf"(?<![\w.]){re.escape(m)}(?![\w.])", text))}
    if not positions:
        raise ValueError(f"no registered model ({', '.join(models)}) is named before a headline table:\n{text}")
    return min(positions, key=positions.get)


def headline_block(benchmarks: str) -> str:
    """The README's block, markers included."""
    heading, body = headline_section(benchmarks)
    found = tables(body)
    if not found:
        raise ValueError(f"the section '## {heading}' of docs/BENCHMARKS.md has no table")
    header = found[0][1][:2]
    rows = []
    for before, lines in found:
        if lines[:2] != header:
            raise ValueError(f"the headline tables have different columns: {header[0]} and {lines[0]}")
        model = model_named(before, list_models())
        rows += [f"| {model} {line}" for line in lines[2:]]
    link = f"[docs/BENCHMARKS.md, {heading}](docs/BENCHMARKS.md#{github_slug(heading)})"
    intro = f"From {link}, which gives the commands, the machine and the weights; each ratio is measured in one run."
    table = [f"| model {header[0]}", f"|---{header[1]}", *rows]
    return "\n".join([BEGIN, intro, "", *table, END])


def with_block(readme: str, block: str) -> str:
    """`readme` with the text between the markers (markers included) replaced by `block`."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md lacks the marker lines {BEGIN!r} and {END!r}")
    return readme[:start] + block + readme[end + len(END) :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that README.md's table is current")
    args = parser.parse_args(argv)
    readme_path = REPO / "README.md"
    readme = readme_path.read_text()
    updated = with_block(readme, headline_block((REPO / "docs" / "BENCHMARKS.md").read_text()))
    if args.check:
        if updated != readme:
            print("README.md's headline table differs from docs/BENCHMARKS.md: run python scripts/readme_headline.py")
            return 1
        return 0
    readme_path.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
