#!/usr/bin/env bash
# Writes docs/quickstart_masks.png, the picture README.md shows: runs the README's quick start as its test does
# (tests/test_docs.py) and keeps the picture that the quick start saves. Run it in the project's environment,
# with the demo photos in ../shared/data/images beside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
picture="$(mktemp --suffix .png)"
rm -f "$picture"  # so that a skipped test, which writes nothing, is told apart from a passed one
QUICKSTART_PICTURE="$picture" python -m pytest -q -p no:cacheprovider \
    "tests/test_docs.py::test_quick_start_runs_as_written_and_draws_the_mask"
test -f "$picture" || { echo "error: the quick start did not run (skipped?), docs/quickstart_masks.png is unchanged" >&2; exit 1; }
mv "$picture" docs/quickstart_masks.png
echo "wrote docs/quickstart_masks.png"
