"""The README stays true: its configuration reference is the schema's, its commands exist."""

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
