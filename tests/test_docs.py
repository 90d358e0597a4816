"""The documents a fresh clone needs are in it: every repository path that README.md and docs/
name exists, and every "docs/design.md section N" cited in code names a section that exists."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/design.md", "docs/performance.md", "benchmarks/README.md"]
# a path-like token: one or more folders, then a file with one of the project's extensions
PATH_TOKEN = re.compile(r"(?<![\w./-])((?:[\w.-]+/)+[\w.-]+\.(?:py|md|h|cpp|cu|json|png|txt|sh|toml|ini))(?![\w/])")
MD_LINK = re.compile(r"\]\(([^)#\s]+)\)")
SECTION_CITATION = re.compile(r"docs/design\.md,? section (\d+)")


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / line for line in out.splitlines() if line]


def _resolves(doc: Path, target: str) -> bool:
    """A path in a document is relative to the document, to the repository root, or to the
    folder the text is describing (the layout trees list paths under rsir_kernels/, csrc/,
    benchmarks/). CI runs from a fresh clone, so there "exists" means "is in the repository"."""
    return any((base / target).exists() for base in (doc.parent, ROOT, ROOT / "rsir_kernels", ROOT / "csrc",
                                                        ROOT / "benchmarks", ROOT / "rsir_kernels" / "backends"))


@pytest.mark.parametrize("name", DOCS)
def test_paths_named_in_documents_exist(name):
    doc = ROOT / name
    text = doc.read_text()
    named = set(PATH_TOKEN.findall(text)) | {t for t in MD_LINK.findall(text) if "://" not in t}
    named = {t for t in named if not t.split("/")[0].isupper()}  # OUTPUT/last.pt: a placeholder
    assert named, f"{name} names no path: the pattern is broken"
    missing = sorted(t for t in named if not _resolves(doc, t))
    assert not missing, f"{name} names paths that a fresh clone lacks: {missing}"


def test_design_sections_cited_in_code_exist():
    headings = {int(n) for n in re.findall(r"^## (\d+)\.", (ROOT / "docs/design.md").read_text(), re.M)}
    assert headings, "docs/design.md has no numbered sections"
    bad = []
    for path in _tracked_files():
        if path.suffix not in {".py", ".h", ".cpp", ".cu", ".md", ".sh", ".txt"} or not path.is_file():
            continue
        for number in SECTION_CITATION.findall(path.read_text(errors="replace")):
            if int(number) not in headings:
                bad.append(f"{path.relative_to(ROOT)}: section {number}")
    assert not bad, f"citations of docs/design.md sections that do not exist: {bad}"


def test_no_citation_points_outside_the_repository():
    """The design and the performance record live in docs/; the contract document and the
    benchmark notebook that preceded them are not in the repository, so nothing may cite them."""
    stale = re.compile(r"(?<![\w/])(DESIGN\.md|benchmarks/NOTES\.md|NOTES\.md)")
    bad = [f"{path.relative_to(ROOT)}:{n}" for path in _tracked_files()
           if path.suffix in {".py", ".h", ".cpp", ".cu", ".md", ".sh", ".txt"} and path.is_file()
           and path != Path(__file__).resolve()
           for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if stale.search(line)]
    assert not bad, f"citations of documents outside the repository: {bad}"
