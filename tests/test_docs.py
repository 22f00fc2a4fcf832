"""The user documentation stays in step with the code: every option is documented, every relative link resolves."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from peft_tsrs import RegularizerConfig

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_regularizer_option_is_documented():
    documented = set(re.findall(r"^\| `(\w+)` \|", (ROOT / "docs" / "options.md").read_text(), re.M))
    fields = {f.name for f in dataclasses.fields(RegularizerConfig) if not f.name.startswith("_")}
    assert fields - documented == set(), "add these fields to docs/options.md"
    assert documented - fields == set(), "docs/options.md names fields RegularizerConfig no longer has"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
    for anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
        file, name = anchor
        linked = page if not file else page.parent / file
        headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
        slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
        assert name in slugs, f"{page.name} links to a missing heading #{name} of {linked.name}"
