"""The user documentation works as written: README.md's commands run, every link resolves, figures are copied.

README.md's fenced blocks are its commands. The one tagged ``set-up`` (install, demo, tests) is checked against
what CI installs, not run: it would reinstall the environment and start this suite again. Every other block
is the quick start and runs, in order, in a fresh folder beside a link to ``../shared``, as a user would run it
from the checkout. With ``QUICKSTART_PICTURE=PATH`` it copies the quick start's picture to PATH, which is how
scripts/quickstart_picture.sh writes docs/quickstart_masks.png.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
USER_DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
SHARED = REPO.parent / "shared"
PHOTO = SHARED / "data" / "images" / "dog.jpg"  # the quick start's photo
PICTURE = "masks.png"  # what the quick start saves
FENCE = re.compile(r"^```(\w*)[ \t]*([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HISTORY = re.compile(r"issue #?[0-9]+|was lent|(this|last|earlier|the) session (that|of)|commit [0-9a-f]{7}", re.I)


@dataclass(frozen=True)
class Block:
    language: str
    tag: str
    code: str


def fenced_blocks(text: str) -> list[Block]:
    return [Block(m.group(1), m.group(2).strip(), m.group(3)) for m in FENCE.finditer(text)]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


readme_headline = load_script("readme_headline")


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown text (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", text), re.M):
        slug = readme_headline.github_slug(heading)
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def test_set_up_installs_what_ci_installs_then_runs_the_demo_and_the_tests():
    (set_up,) = [block for block in fenced_blocks(README.read_text()) if block.tag == "set-up"]
    pins = re.search(r"pip install -q (torch==\S+ torchvision==\S+)\n", (REPO / ".ci" / "run").read_text()).group(1)
    assert set_up.code.splitlines() == [
        f'pip install {pins} && pip install -e ".[dev]" -c constraints.txt && python -m distill',
        "python -m pytest",
    ]


def test_readme_is_short_and_shows_the_quick_start_picture():
    text = README.read_text()
    assert len(text.splitlines()) <= 160
    assert "](docs/quickstart_masks.png)" in text


def test_readme_headline_table_is_the_one_docs_benchmarks_gives():
    readme = README.read_text()
    block = readme_headline.headline_block((REPO / "docs" / "BENCHMARKS.md").read_text())
    assert readme_headline.with_block(readme, block) == readme, "run python scripts/readme_headline.py"


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for doc in USER_DOCS:
        text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", doc.read_text()))  # links in code are not links
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (doc.parent / path).resolve() if path else doc
            if not linked.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and anchor not in anchors(linked.read_text()):
                broken.append(f"{doc.name}: {target} (no such heading in {linked.name})")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda d: d.name)
def test_user_docs_speak_of_the_software_not_its_history(doc):
    found = [
        f"{doc.name}:{n}: {line}" for n, line in enumerate(doc.read_text().splitlines(), 1) if HISTORY.search(line)
    ]
    assert not found, "\n".join(found)


@pytest.mark.slow
def test_quick_start_runs_as_written_and_draws_the_mask(tmp_path):
    if not PHOTO.is_file():
        pytest.skip(f"the demo photos are not beside the checkout ({PHOTO.parent})")
    work = tmp_path / "checkout"
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED, target_is_directory=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    blocks = [block for block in fenced_blocks(README.read_text()) if block.tag != "set-up"]
    assert blocks and {block.language for block in blocks} <= {"bash", "python"}, "a README block no test runs"
    for block in blocks:
        shell = ["bash", "-euo", "pipefail", "-c"] if block.language == "bash" else [sys.executable, "-c"]
        done = subprocess.run([*shell, block.code], cwd=work, env=env, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, f"README block failed:\n{block.code}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    picture = np.asarray(Image.open(work / PICTURE).convert("RGB"), dtype=np.int16)
    photo = np.asarray(Image.open(PHOTO).convert("RGB"), dtype=np.int16)
    assert picture.shape == photo.shape
    assert np.abs(picture - photo).mean() > 1, "the picture is the photo: no mask was drawn"
    if target := os.environ.get("QUICKSTART_PICTURE"):
        shutil.copyfile(work / PICTURE, REPO / target)
