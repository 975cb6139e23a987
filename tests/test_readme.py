"""The README stays true: its configuration reference is the schema's, its commands exist, its training table is
the committed results'."""

import re
from pathlib import Path

from moba_train.config import reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_configuration_reference_equals_the_schema():
    block = re.search(r"<!-- config-reference:start -->\n(.*)\n<!-- config-reference:end -->", README, re.S)
    assert block, "README lost its configuration reference markers"
    assert block.group(1).strip() == reference_markdown().strip(), "regenerate it: python -m moba_train.config"


def test_quick_start_targets_exist_in_the_makefile_and_ci_runs_the_test_command():
    targets = set(re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), re.M))
    assert {"install", "demo", "test", "data", "bench", "lint"} <= targets
    assert "make install demo" in README and "make install test" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make install test" in ci


def test_recipes_and_scripts_named_in_the_readme_exist():
    for path in set(re.findall(r"\b((?:configs|scripts|examples)/[\w./]+\.(?:yaml|py))", README)):
        assert (ROOT / path).is_file(), path


def test_the_training_table_is_generated_from_the_results_it_names():
    """The README's training table is what `scripts/bench_train.py --table` makes of the committed result files
    that the README's command lists, in that order."""
    import json
    import runpy

    command = README.split("python scripts/bench_train.py\n--table ")[1].split("`")[0]
    paths = command.split()
    assert paths and all(p.startswith("bench/results/train-") for p in paths)
    table = runpy.run_path(str(ROOT / "scripts/bench_train.py"))["markdown_table"](
        [json.loads((ROOT / p).read_text()) for p in paths])
    assert table in README
