"""Every relative link in README.md and docs/**/*.md points at a file that exists, and every `#anchor` at a heading
of its target, so that moving or splitting a page cannot leave a dead link behind; and README's Layout table names
every module where it lives. Reads files only."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])

# [text](target) and ![alt](target), the target up to whitespace or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's fragment in a page, duplicates numbered as GitHub numbers them."""
    found: set[str] = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        anchor = base = github_anchor(heading)
        count = 0
        while anchor in found:
            count += 1
            anchor = f"{base}-{count}"
        found.add(anchor)
    return found


def relative_links(page: Path) -> list[str]:
    """The page's links outside code fences that are neither absolute URLs nor mail addresses."""
    targets = LINK.findall(FENCE.sub("", page.read_text()))
    return [target for target in targets if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path_part, _, fragment = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif fragment and destination.suffix == ".md" and fragment not in anchors(destination):
            broken.append(f"{target}: no heading #{fragment} in {destination.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_anchor_rule() -> None:
    assert github_anchor("The image (`deploy/image/`, `make image`)") == "the-image-deployimage-make-image"
    assert github_anchor("Keys (token authorization)") == "keys-token-authorization"


def layout_rows() -> dict[str, str]:
    """README's Layout table: package folder -> what its row says."""
    section = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)/` \| (.+) \|$", section, re.MULTILINE)
    return {folder: text for folder, text in rows}


def test_the_layout_table_names_every_module() -> None:
    """Every module of the worker runtime, the tools, the scripts and the Locust files is named in its folder's row."""
    rows = layout_rows()
    unnamed = []
    for package in ("camserve", "camserve_tools", "scripts", "load_tests"):
        for module in sorted((ROOT / package).rglob("*.py")):
            folder = str(module.parent.relative_to(ROOT))
            if module.name != "__init__.py" and f"`{module.name}`" not in rows.get(folder, ""):
                unnamed.append(str(module.relative_to(ROOT)))
    assert unnamed == []
