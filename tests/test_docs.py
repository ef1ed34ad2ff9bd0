"""The README stays a newcomer's page and every link in it and in docs/ resolves inside the repository."""

import re
from pathlib import Path

from tests.conftest import REPO

LINK = re.compile(r"\]\(([^)\s]+)\)")


def pages() -> list[Path]:
    return [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]


def test_every_relative_link_resolves_inside_the_repository():
    broken = []
    for page in pages():
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:|#", target):  # a web address, mailto:, or an anchor on the same page
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists() or REPO.resolve() not in path.parents:
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken


def test_the_readme_is_short_and_points_nowhere_outside_the_repository():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert all("../shared" not in page.read_text() for page in pages())
