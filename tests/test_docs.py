"""The README is a guide that links to the rest: every relative link in it, in docs/ and in the results
folders' READMEs resolves (file and #anchor), every page and results table is reachable from the README,
the README stays short, and its quick start keeps the three lines CI runs (.ci/run parses them)."""

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 470

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def documents() -> list[Path]:
    """The pages whose links are checked: the README, docs/*.md and each results folder's README."""
    return [README, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "results").glob("**/README.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    body = prose(text)
    return INLINE_LINK.findall(body) + REFERENCE_LINK.findall(body)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: inline markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(heading)
        name, n = base, 0
        while name in found:  # GitHub numbers repeated headings: name, name-1, name-2, ...
            n += 1
            name = f"{base}-{n}"
        found.add(name)
    return found


def relative_links(page: Path) -> list[tuple[str, Path, str]]:
    """`page`'s relative links as (the link, the path it names, its #anchor); external ones left out."""
    found = []
    for target in links(page.read_text(encoding="utf-8")):
        if not target or SCHEME.match(target) or target.startswith("//"):
            continue
        path_part, _, anchor = target.partition("#")
        found.append((target, (page.parent / unquote(path_part)).resolve() if path_part else page, anchor))
    return found


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Each relative link of `page` whose file, or #anchor in a markdown file, does not exist in `root`."""
    broken = []
    for target, dest, anchor in relative_links(page):
        if not dest.is_relative_to(root) or not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and unquote(anchor).lower() not in anchors(dest):
            broken.append(f"{target} (no heading with that anchor in {dest.relative_to(root)})")
    return broken


def test_relative_links_resolve():
    pages = documents()
    assert len(pages) > 1 and (ROOT / "docs").is_dir()
    broken = {str(p.relative_to(ROOT)): b for p in pages if (b := broken_links(p))}
    assert not broken, f"broken relative links: {broken}"


def test_the_checker_finds_broken_links(tmp_path):
    """The check itself: a missing file, a missing anchor and a link that leaves the repository are caught;
    links in code, external links and good anchors are not."""
    root = tmp_path.resolve()
    (root / "README.md").write_text("# Project\n\n## Quick start\n", encoding="utf-8")
    (root / "docs").mkdir()
    page = root / "docs" / "page.md"
    page.write_text(
        "# A heading, with `code`\n\n[ok](#a-heading-with-code) [ok](../README.md#quick-start) [ext](https://x.org/a)\n"
        "`[not a link](nowhere.md)`\n\n```\n[not a link](nowhere.md)\n```\n"
        "[gone](missing.md) [bad anchor](../README.md#no-such-section) [out](../../outside.md)\n",
        encoding="utf-8",
    )
    broken = broken_links(page, root)
    assert [b.split(" ")[0] for b in broken] == ["missing.md", "../README.md#no-such-section", "../../outside.md"]


def test_every_page_and_results_table_is_reachable_from_the_readme():
    """Following relative links from the README through markdown pages reaches every page in docs/ and
    every markdown file in results/: no moved figure is orphaned."""
    seen, todo = {README}, [README]
    while todo:
        page = todo.pop()
        for _, dest, _ in relative_links(page):
            if dest.is_dir() and (dest / "README.md").exists():
                dest = dest / "README.md"
            if dest.suffix == ".md" and dest.is_file() and dest not in seen:
                seen.add(dest)
                todo.append(dest)
    wanted = {*(ROOT / "docs").glob("*.md"), *(ROOT / "results").glob("**/*.md")}
    orphans = sorted(str(p.relative_to(ROOT)) for p in wanted if p.resolve() not in seen)
    assert not orphans, f"not reachable by links from README.md: {orphans}"


def test_readme_is_short_and_keeps_the_quick_start():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; keep it to {MAX_README_LINES}"
    start, end = lines.index("<!-- quickstart -->"), lines.index("<!-- /quickstart -->")
    block = [line for line in lines[start + 1 : end] if not line.startswith(("<!--", "```"))]
    assert lines[start + 1] == "```bash" and lines[end - 1] == "```"
    assert len(block) == 3, f".ci/run runs the quick start's three lines; it holds {len(block)}"
    assert block[0].split("#")[0].strip() == "pip install torch --index-url https://download.pytorch.org/whl/cpu"
