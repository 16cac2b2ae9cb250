"""The README and the docs/ pages: every relative link and anchor resolves, the README gives the
two commands CI relies on, and every docs page links back to the README and is linked from it.

Anchors follow GitHub's rule: the heading's text, lower-cased, with everything but letters,
digits, `_`, `-` and spaces dropped, spaces turned into `-`, and `-1`, `-2`, ... appended to
repeats. Links and headings inside fenced code blocks and inline code are not links."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
HTML_ID = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose(text: str) -> str:
    """The text without fenced code blocks (kept as blank lines) and without inline code."""
    out, fence = [], ""
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
                fence = ""
            out.append("")
        elif m:
            fence = m.group(1)
            out.append("")
        else:
            out.append(line)
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", "\n".join(out), flags=re.DOTALL)


def slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found: set[str] = set()
    fence = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        m = FENCE.match(line)
        if fence:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
                fence = ""
            continue
        if m:
            fence = m.group(1)
            continue
        h = HEADING.match(line)
        if h:
            base = slug(h.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        found.update(HTML_ID.findall(line))
    return found


def links(path: Path) -> list[str]:
    text = prose(path.read_text(encoding="utf-8"))
    return INLINE_LINK.findall(text) + REF_DEF.findall(text)


def relative_links(path: Path) -> list[str]:
    return [t for t in links(path) if t and not SCHEME.match(t) and not t.startswith("//")]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_and_anchors_resolve(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(
                f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}"
            )
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_readme_gives_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert "## The two commands" in text
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    assert "make demo" in section and "make test" in section


@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_docs_page_links_back_and_is_linked(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert text.startswith("# "), f"{page.name}: starts with its title"
    head = text.split("\n## ", 1)[0]
    assert any(t.partition("#")[0] == "../README.md" for t in INLINE_LINK.findall(prose(head))), (
        f"{page.name}: link back to ../README.md before its first section"
    )
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    assert page.resolve() in linked, f"README.md does not link docs/{page.name}"


def test_checker_sees_links_and_anchors(tmp_path: Path) -> None:
    """The checker itself: GitHub's anchors, links in code ignored, repeats numbered."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n## Notes\n```\n## Not a heading\n```\n## Notes\n")
    assert anchors(page) == {"title", "notes", "notes-1"}
    assert slug("One decoding step: `dlf_rs.fuse_step`") == "one-decoding-step-dlf_rsfuse_step"
    assert (
        slug('Speculative DLF (`speculative=k` or `"auto"`)')
        == "speculative-dlf-speculativek-or-auto"
    )
    assert slug("Choosing `solver` and `support_k`") == "choosing-solver-and-support_k"
    sample = "a [x](a.md#b) `[y](no.md)` ![i](p.png)\n```\n[z](code.md)\n```\n[w]: ref.md\n"
    assert sorted(INLINE_LINK.findall(prose(sample)) + REF_DEF.findall(prose(sample))) == [
        "a.md#b",
        "p.png",
        "ref.md",
    ]
