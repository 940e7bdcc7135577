"""The documentation's links and the code's references to it resolve inside the repository.

Every relative link in README.md, docs/*.md and benchmarks/RESULTS.md names a file of the repo and,
with an anchor, a heading of that file; every docs/<page>.md (or benchmarks/RESULTS.md) that a
comment or docstring under the code folders cites exists, and so does the heading it cites, as
`page.md#anchor` or `page.md, "Heading"` / `page.md, section "Heading"`.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")),
             "benchmarks/RESULTS.md"]
CODE_FOLDERS = ["ratpt", "kernels", "benchmarks", "launch", "data_prep", "tests"]

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
CITATION = re.compile(r"\b((?:docs/[\w.-]+|benchmarks/RESULTS)\.md)"
                      r"(?:#([\w-]+)|,\s*(?:section\s+)?[\"“]([^\"”]+)[\"”])?")


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: Path) -> set[str]:
    """The anchors of every heading of `markdown` (a repeated heading gets -1, -2, … as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", markdown.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = anchor(match.group(1))
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return found


def broken_links(markdown: Path, root: Path = REPO) -> list[str]:
    """The relative links of `markdown` that name no file under `root`, or no heading of it."""
    text = INLINE_CODE.sub("", FENCE.sub("", markdown.read_text()))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, fragment = target.partition("#")
        file = (markdown.parent / path).resolve() if path else markdown
        if not file.exists() or root.resolve() not in (file, *file.parents):
            broken.append(f"{target}: no such file in the repository")
        elif fragment and (file.suffix != ".md" or fragment not in anchors(file)):
            broken.append(f"{target}: no heading #{fragment} in {file.relative_to(root.resolve())}")
    return broken


def code_files() -> list[Path]:
    own = Path(__file__).resolve()
    return [p for folder in CODE_FOLDERS for p in sorted((REPO / folder).rglob("*"))
            if p.suffix in (".py", ".sh") and p.resolve() != own and ".venv" not in p.parts]


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_relative_link_resolves_to_a_file_and_heading_of_the_repository(document):
    assert (REPO / document).is_file(), f"{document} is missing"
    assert broken_links(REPO / document) == [], f"broken links in {document}"


def test_every_docs_page_the_code_cites_exists_with_the_cited_heading():
    missing = []
    for source in code_files():
        for number, line in enumerate(source.read_text(errors="replace").splitlines(), 1):
            for page, fragment, heading in CITATION.findall(line):
                where = f"{source.relative_to(REPO)}:{number}"
                if not (REPO / page).is_file():
                    missing.append(f"{where}: {page} does not exist")
                elif (fragment or heading) and (fragment or anchor(heading)) not in anchors(REPO / page):
                    missing.append(f"{where}: {page} has no heading {fragment or heading!r}")
    assert missing == []


def test_a_link_to_a_missing_file_or_heading_is_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Compiled engines\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#compiled-engines) [web](https://example.org) `[code](nowhere.md)`\n"
                    "[gone](docs/b.md) [no heading](docs/a.md#overlap) [self](#a-readme)\n\n# A README\n")
    assert broken_links(page, tmp_path) == ["docs/b.md: no such file in the repository",
                                            "docs/a.md#overlap: no heading #overlap in docs/a.md"]
