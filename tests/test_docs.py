"""The README stays one a newcomer can enter, its test command stays the one CI runs, and every
relative link in the README and docs/ leads to a file (and a heading) that exists."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _outside_code(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    for line in _outside_code(path.read_text()):
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            yield slug if n == 0 else f"{slug}-{n}"


def test_the_readme_is_short_and_says_where_to_read_more():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 240  # torchattacks' README is 233 lines; the records live in docs/
    for page in ("docs/results.md", "docs/training.md", "docs/kernels.md", "docs/guide.md"):
        assert f"]({page})" in text, page


def test_the_readme_test_command_is_the_one_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = [line for line in (REPO / ".ci/run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert len(ci) == 1 and f"\n{ci[0]}\n" in readme


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for line in _outside_code(page.read_text()):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            file, _, anchor = target.partition("#")
            dest = (page.parent / file) if file else page
            if not dest.exists():
                broken.append(target)
            elif anchor and dest.suffix == ".md" and anchor not in set(anchors(dest)):
                broken.append(target)
    assert not broken, f"{page.name}: {broken}"


def test_the_readme_shows_what_the_main_job_prints(tmp_path, monkeypatch):
    """The block after "It prints:" is exactly `pssr purify samples/ purified/`'s output (run on a copy
    of samples/ from its parent folder, so the relative paths are the README's)."""
    import shutil

    import torch
    from click.testing import CliRunner

    from pssr_cli.main import cli

    text = (REPO / "README.md").read_text()
    m = re.search(r"`pssr purify samples/ purified/` purifies.*?It prints:\n\n```\n(.*?)```", text, re.S)
    assert m, "the README's main-job section lost its output block"
    shutil.copytree(REPO / "samples", tmp_path / "samples")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = CliRunner().invoke(cli, ["purify", "samples/", "purified/", "-q"])
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output
    assert r.stdout == m.group(1), f"README:\n{m.group(1)}\nprinted:\n{r.stdout}"
