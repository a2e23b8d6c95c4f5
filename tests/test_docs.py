"""README.md and docs/*.md: every relative link names a file that exists and every #anchor a heading in it,
and CI runs the README's test command."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(markdown: str) -> str:
    """The page without fenced code blocks: their '#' lines are comments and their brackets are code."""
    return FENCE.sub("", markdown)


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading's id; a repeated heading gets '-1', '-2', ... as on GitHub."""
    seen: dict[str, int] = {}
    ids = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(markdown), re.MULTILINE):
        base = github_anchor(heading)
        ids.add(f"{base}-{seen[base]}" if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return ids


def broken_links(page: Path) -> list[str]:
    """Relative links of `page` whose file is missing or whose #anchor is no heading of that file."""
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    return broken


def test_github_anchor_matches_githubs_ids():
    assert github_anchor("Fig. 4: reward vs number of samples") == "fig-4-reward-vs-number-of-samples"
    assert github_anchor("Why not PyPI's `image-reward` and `hpsv2`") == "why-not-pypis-image-reward-and-hpsv2"
    assert github_anchor("Scaling to 8 nodes x 8 GPUs: an estimate") == "scaling-to-8-nodes-x-8-gpus-an-estimate"
    assert anchors("# A\n```bash\n# not a heading\n```\n## A\n") == {"a", "a-1"}


def test_broken_links_are_found(tmp_path):
    (tmp_path / "other.md").write_text("# Present\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#present) [ok](#here) [web](https://example.com/x.md)\n# Here\n"
        "[gone](missing.md) [bad anchor](other.md#absent)\n```\n[in code](nowhere.md)\n```\n"
    )
    assert [link.split(":")[0] for link in broken_links(page)] == ["missing.md", "other.md#absent"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_ci_runs_the_readme_test_command():
    first_block = re.search(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), re.DOTALL | re.MULTILINE)
    commands = [line for line in first_block.group(1).splitlines() if line and not line.startswith("#")]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert commands[-1] == ".venv/bin/python -m pytest" == ci[-1]
