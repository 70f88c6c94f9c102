"""README.md and docs/*.md point only at things that exist, and stay short enough to read.

Checked in every doc: each relative markdown link (`[text](path)`, `[text](path#anchor)`,
`[text](#anchor)`) resolves to a file or folder, and an anchor to a heading of the target; each
repo file named in backticks exists (`jobs/score.py`, `anomaly_core/scoring/`,
`tests/unit/test_x.py::test_y`, `pyproject.toml`), and so does each module run as
`python -m bench.X` / `python -m jobs.X` / `python -m anomaly_core.X`. The job commands
themselves are parsed with the jobs' own flags in test_cluster_configs.py.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README_MAX_LINES = 250
LINE_MAX_CHARS = 100
REPO_PREFIXES = ("anomaly_core/", "jobs/", "bench/", "tests/", "cluster/", "docs/", ".ci/")
# Files at the repository's root that a doc may name without a folder; all-caps markdown names
# (ARCHITECTURE.md) are held to the same rule, so a doc cannot lean on a file outside the repo.
ROOT_FILE = re.compile(
    r"(pyproject\.toml|setup\.(py|cfg)|requirements[\w-]*\.txt|Makefile|\.gitignore"
    r"|LICENSE(\.\w+)?|[A-Z][A-Z_]+\.md)"
)
MODULE = re.compile(r"python -m ((?:bench|jobs|anomaly_core)(?:\.\w+)+)")
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
# What follows a file's name without being part of it: `x.py::test_name`, `x.py:120`, `x.md#part`.
SUFFIX = re.compile(r"(::[\w\[\].-]+|:\d+(-\d+)?|#[\w-]+)$")


def docs() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def prose(text: str) -> str:
    """The text without fenced code blocks (where `[x](y)` and backticks are code, not links)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link keeps its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    out, seen = set(), {}
    for line in prose(path.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    """Relative links of `path` whose file, folder or heading does not exist."""
    out = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            out.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            out.append(f"{target}: no heading #{anchor} in {dest.name}")
    return out


def expand_braces(token: str) -> list[str]:
    """`rayjob-{train,score}.yaml` -> both names (one level of braces, as docs use them)."""
    match = re.search(r"\{([^{}]*,[^{}]*)\}", token)
    if not match:
        return [token]
    return [token[: match.start()] + part + token[match.end():] for part in match.group(1).split(",")]


def named_files(path: Path) -> list[str]:
    """Repo paths a doc names in backticks or runs as modules, as paths relative to the repo."""
    text = path.read_text()
    out = []
    for span in CODE_SPAN.findall(prose(text)):
        for word in span.split():
            word = SUFFIX.sub("", word.lstrip("('\"").rstrip(".,;:)'\""))
            if "<" in word or "*" in word or "$" in word:  # a pattern, not a file
                continue
            if word.startswith(REPO_PREFIXES) or ROOT_FILE.fullmatch(word):
                out.extend(expand_braces(word))
    for module in MODULE.findall(text):  # in prose and in code blocks
        out.append(module.replace(".", "/") + ".py")
    return out


def module_or_file_exists(name: str) -> bool:
    if (REPO / name).exists():
        return True
    # `python -m a.b` is a.b.py or the package a/b/ (its __main__.py).
    return name.endswith(".py") and (REPO / name[:-3] / "__main__.py").exists()


def missing_files(path: Path) -> list[str]:
    return sorted({n for n in named_files(path) if not module_or_file_exists(n)})


def long_lines(path: Path) -> list[str]:
    return [f"{rel(path)}:{i}: {len(line)} characters"
            for i, line in enumerate(path.read_text().splitlines(), 1) if len(line) > LINE_MAX_CHARS]


@pytest.mark.parametrize("path", docs(), ids=rel)
def test_every_relative_link_resolves(path):
    broken = broken_links(path)
    assert not broken, f"{rel(path)}: broken links: {broken}"


@pytest.mark.parametrize("path", docs(), ids=rel)
def test_every_named_repo_file_exists(path):
    missing = missing_files(path)
    assert not missing, f"{rel(path)} names files the repository does not have: {missing}"


@pytest.mark.parametrize("path", docs(), ids=rel)
def test_lines_are_at_most_100_characters(path):
    long = long_lines(path)
    assert not long, "\n".join(long)


def test_readme_is_a_front_door_of_at_most_250_lines():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_the_docs_exist():
    names = {p.name for p in docs()}
    assert {"README.md", "scoring.md", "training.md", "cluster.md", "design.md",
            "benchmarks.md"} <= names


# The checks catch what they are meant to: a doc written here with one fault of each kind.


def test_the_checks_catch_a_broken_link_a_missing_file_and_a_long_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "score.py").write_text("")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "scoring.md").write_text("# Scoring\n\n## Output rows\n")
    doc = tmp_path / "README.md"
    doc.write_text(
        "# Title\n"
        "[ok](docs/scoring.md#output-rows) [here](#title) [web](https://example.com)\n"
        "[gone](docs/training.md) [no heading](docs/scoring.md#input-rows)\n"
        "`jobs/score.py:12` `jobs/train.py::test_x` `pyproject.toml` `model.json`\n"
        "`cluster/kuberay/rayjob-{train,score}.yaml` `<output>/_runs/`\n"
        "```bash\npython -m bench.ceilings --images 600\n[code](not/a/link)\n```\n"
        + "x" * 101 + "\n"
    )
    assert broken_links(doc) == [
        "docs/training.md: no such file",
        "docs/scoring.md#input-rows: no heading #input-rows in scoring.md",
    ]
    assert missing_files(doc) == [
        "bench/ceilings.py",
        "cluster/kuberay/rayjob-score.yaml",
        "cluster/kuberay/rayjob-train.yaml",
        "jobs/train.py",
        "pyproject.toml",
    ]
    assert long_lines(doc) == ["README.md:10: 101 characters"]


def test_slugs_follow_github():
    assert slug("4. Where results land, and how to read them") == (
        "4-where-results-land-and-how-to-read-them")
    assert slug("Does the job reach the node's ceiling?") == "does-the-job-reach-the-nodes-ceiling"
    assert slug("`--precision`: fp16, not bf16") == "--precision-fp16-not-bf16"
