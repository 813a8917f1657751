"""The docs stay true: every setting is in configs/README.md, every Markdown link and
anchor resolves (GitHub's rules), a link label or code span naming a repository file
names one that exists, and a figure quoted next to a results file is in that file."""

from __future__ import annotations

import json
import re
import subprocess
import unicodedata
from functools import cache
from pathlib import Path

import pytest
from pydantic import AliasChoices

from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
# the folders and files a code span may name as a path of this repository
TRACKED_TOP = ("service/", "models/", "configs/", "tests/", "benchmarks/", ".ci/")
PATH_LIKE = re.compile(r"^(\.\./)*[\w.-]+(/[\w.-]+)*\.(md|py|ya?ml|json|toml|env|csv|txt)$")


def markdown_files() -> list[Path]:
    """Every .md file of the repository (tracked, or new and not ignored)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.md"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return sorted(ROOT / p for p in out if (ROOT / p).is_file())


def prose(text: str) -> str:
    """The text outside fenced code blocks (their lines blanked, so line numbers hold)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else line)
    return "\n".join(lines)


def without_code_spans(line: str) -> str:
    return re.sub(r"(`+)(.+?)\1", "", line)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text lower-cased, every character but
    letters, digits, spaces, hyphens and underscores dropped, spaces turned to hyphens.

    >>> slug("Data rules: time stamps, retries, bounds"), slug("`tsad evaluate` & --rows")
    ('data-rules-time-stamps-retries-bounds', 'tsad-evaluate----rows')
    """
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its label
    text = re.sub(r"[`*]|<[^>]+>", "", text).strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """The anchors of a Markdown file's headings (repeats get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path.read_text()).splitlines():
        if m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
        out.update(re.findall(r'<a\s+(?:name|id)="([^"]+)"', line))
    return frozenset(out)


LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(path: Path) -> list[tuple[int, str, str]]:
    """(line, label, target) of every inline link outside code."""
    out = []
    for n, line in enumerate(prose(path.read_text()).splitlines(), 1):
        for m in LINK.finditer(without_code_spans(line)):
            out.append((n, m.group(1), m.group(2)))
    return out


def link_problem(doc: Path, label: str, target: str) -> str | None:
    """Why the link is broken, or None."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not checked offline
        return None
    file_part, _, anchor = target.partition("#")
    dest = (doc.parent / file_part).resolve() if file_part else doc
    if not dest.is_relative_to(ROOT):
        return f"{target} leaves the repository (a clone has no {file_part})"
    if not dest.exists():
        return f"{target}: no such file"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"{target}: {dest.relative_to(ROOT)} has no heading with anchor #{anchor}"
    named = label.strip("`* ").split(":")[0].split(",")[0].strip("`* ")
    if PATH_LIKE.match(named) and not named_path_exists(doc, named):
        return f"label {label!r} names a file that does not exist"
    return None


def named_path_exists(doc: Path, named: str) -> bool:
    """A path a doc names, read from the doc's folder or from the repository root."""
    return any((base / named).exists() for base in (doc.parent, ROOT))


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_anchor_resolves(doc):
    broken = [f"{doc.relative_to(ROOT)}:{n}: {problem}" for n, label, target in links(doc)
              if (problem := link_problem(doc, label, target))]
    assert not broken, "\n".join(broken)


def code_span_paths(doc: Path) -> list[tuple[int, str]]:
    """(line, path) of code spans in prose naming a file of this repository."""
    out = []
    for n, line in enumerate(prose(doc.read_text()).splitlines(), 1):
        for span in re.findall(r"`([^`\s]+)`", line):
            path = span.rstrip(".,:;")
            if path.startswith(TRACKED_TOP) and PATH_LIKE.match(path):
                out.append((n, path))
    return out


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_a_doc_names_exists(doc):
    missing = [f"{doc.relative_to(ROOT)}:{n}: `{path}` does not exist"
               for n, path in code_span_paths(doc) if not named_path_exists(doc, path)]
    assert not missing, "\n".join(missing)


def env_names(name: str, field) -> list[str]:  # noqa: ANN001
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(a) for a in alias.choices]
    return [f"TSAD_{name.upper()}"]


def test_every_setting_is_in_configs_readme():
    """configs/README.md says it lists every setting: each field of Settings, by one of
    the environment names it is read from, in a code span."""
    text = (ROOT / "configs" / "README.md").read_text()
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]*)`", text))
    missing = [f"{name} ({' or '.join(env_names(name, field))})"
               for name, field in Settings.model_fields.items()
               if not documented & set(env_names(name, field))]
    assert not missing, "configs/README.md does not list: " + ", ".join(missing)


# --- figures: a number quoted beside a results file is in that file -----------------------
# benchmarks/results/X(.md|.json), or a bare `X.md` of that folder
RESULTS = re.compile(r"benchmarks/results/([\w.-]+?)(?:\.(?:md|json))?\b(?![/\w])"
                     r"|`([\w.-]+)\.(?:md|json)`")
# decimals (a size in KiB, KB, MB is computed, not measured) and hit counts such as 4/5
FIGURE = re.compile(r"(?<![\w.])\d{1,3}(?:,\d{3})*\.\d+(?![\w.])(?!\s?(?:KiB|KB|MB|GB)\b)"
                    r"|(?<![\w.,])\d+/\d+(?![\w/])")


def blocks(doc: Path) -> list[tuple[int, str]]:
    """(first line, text) of each paragraph, list item or table row, outside code."""
    out: list[tuple[int, str]] = []
    start, lines = 0, []
    for n, line in enumerate(prose(doc.read_text()).splitlines() + [""], 1):
        item = re.match(r"^\s*([*-]|\d+\.|\|)\s", line)
        if not line.strip() or item:
            if lines:
                out.append((start, " ".join(lines)))
            start, lines = n, []
            if item and line.lstrip().startswith("|"):  # a table row stands alone
                out.append((n, line))
                continue
        if line.strip():
            start, lines = (start or n), lines + [line]
    return out


@cache
def results_text(name: str, commit: str | None = None) -> str | None:
    """A results file's markdown and JSON, numbers as written there (None: no such file),
    as committed at ``commit`` when given (prose quoting an earlier run names its commit)."""
    texts = []
    for suffix in (".md", ".json"):
        path = f"benchmarks/results/{name}{suffix}"
        if commit is None:
            if (ROOT / path).exists():
                texts.append((ROOT / path).read_text())
            continue
        shown = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, text=True,
                               capture_output=True)
        texts += [shown.stdout] if shown.returncode == 0 else []
    return "\n".join(texts) if texts else None


def figure_in(figure: str, text: str) -> bool:
    """The figure as a results file writes it: the same digits, or a JSON number that
    rounds to it (0.1564 is quoted as 0.16, 71.3912 as 71.39)."""
    plain = figure.replace(",", "")
    if re.search(rf"(?<![\d.]){re.escape(plain)}(?!\d)", text.replace(",", "")):
        return True
    if "/" in plain:
        return False
    value, half = float(plain), 0.5 * 10.0 ** -len(plain.split(".")[1]) + 1e-9
    for number in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", text):
        for scale in (1, 100):  # a share written as 0.7139 and quoted as 71.39
            if abs(float(number) * scale - value) <= half:
                return True
    return False


def figure_problems(doc: Path) -> list[str]:
    problems = []
    for n, text in blocks(doc):
        names = sorted({name for m in RESULTS.finditer(text) if (name := m.group(1) or (
            m.group(2) if results_text(m.group(2)) is not None else None))})
        if not names:
            continue
        missing = [name for name in names if results_text(name) is None]
        problems += [f"{doc.relative_to(ROOT)}:{n}: benchmarks/results/{name}: no such "
                     "results file" for name in missing]
        commits = re.findall(r"\bcommit ([0-9a-f]{7,40})\b", text)
        source = "\n".join(results_text(name, commit) or "" for name in names
                           for commit in (None, *commits))
        problems += [f"{doc.relative_to(ROOT)}:{n}: {figure} is in none of {names}"
                     for figure in FIGURE.findall(without_code_spans(text))
                     if not figure_in(figure, source)]
    return problems


READMES = [p for p in markdown_files() if p.name == "README.md"
           and not p.is_relative_to(ROOT / "benchmarks" / "results")]


@pytest.mark.parametrize("doc", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_figures_beside_a_results_file_are_in_it(doc):
    """A paragraph, list item or table row that names benchmarks/results/X quotes only
    figures (decimals, hits like 3/5) that X.md or X.json holds: when a benchmark is run
    again, the prose that quotes the old run fails here until it is brought up to date."""
    problems = figure_problems(doc)
    assert not problems, "\n".join(problems)


def test_the_checkers_catch_what_they_are_for(tmp_path):
    """Each checker fails on the fault it exists for (a checker that cannot fail is no
    check)."""
    doc = ROOT / "service" / "README.md"
    assert link_problem(doc, "x", "../README.md#no-such-heading")
    assert link_problem(doc, "x", "../README.md#security-and-durability") is None
    assert link_problem(doc, "alerts.md", "README.md")  # a label naming no file
    assert link_problem(doc, "x", "../../shared/DESIGN.md")  # outside the clone
    assert not figure_in("3/5", "| nyc_taxi | 4/5 |") and figure_in("4/5", "| x | 4/5 |")
    assert figure_in("0.16", '{"alerts_per_day": 0.1564}') and not figure_in("0.17", "0.1564")
    json.dumps(sorted(anchors(ROOT / "README.md")))  # the README has headings
    assert "security-and-durability" in anchors(ROOT / "README.md")
