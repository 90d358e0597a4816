"""The documents a fresh clone needs are in it: every repository path that README.md and docs/
name exists, every relative link resolves (to a file, and an #anchor to one of its headings),
every "docs/design.md section N" cited in code names a section that exists, and the README
stays short and runnable: at most 10,000 characters, every `make` target, `python -m` module,
script and trainer `--flag` it shows exists."""
from __future__ import annotations

import ast
import functools
import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "benchmarks/README.md"] + sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
# the user-facing documents whose commands are checked (the README and the user guides)
COMMAND_DOCS = ["README.md", "docs/usage.md", "docs/training.md", "docs/deployment.md"]
README_LIMIT = 10_000
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


# ---- links and anchors ----------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _blocks(text: str) -> tuple[list[tuple[str, str]], str]:
    """The fenced code blocks as (language, body), and the text outside them."""
    blocks, prose, lang, body = [], [], None, []
    for line in text.splitlines():
        fence = re.match(r"^\s*```\s*([\w+-]*)", line)
        if fence and lang is None:
            lang, body = fence.group(1), []
        elif fence:
            blocks.append((lang, "\n".join(body)))
            lang = None
        elif lang is None:
            prose.append(line)
        else:
            body.append(line)
    return blocks, "\n".join(prose)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than - and _ dropped, spaces
    to hyphens (inline code and emphasis marks go with the punctuation)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.lru_cache(maxsize=None)
def _anchors(path: Path) -> frozenset:
    seen, out = {}, set()
    for line in _blocks(path.read_text())[1].splitlines():
        m = re.match(r"#{1,6} (.+?)#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return frozenset(out)


@pytest.mark.parametrize("name", DOCS)
def test_links_resolve(name):
    """A relative link is relative to its document (as GitHub reads it): the file must exist, and
    an #anchor must be a heading of the target Markdown file."""
    doc = ROOT / name
    bad = []
    for target in LINK.findall(_blocks(doc.read_text())[1]):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):        # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            bad.append(f"{target}: no file {path}")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            bad.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not bad, f"{name}: broken links {bad}"


# ---- the README: short, and every command it shows runs ---------------------------------------

def test_readme_is_short():
    n = len((ROOT / "README.md").read_text())
    assert n <= README_LIMIT, f"README.md has {n} characters, more than {README_LIMIT}: move details to docs/"


def _commands(text: str) -> list[str]:
    """Command lines: every line of a shell code block (continuation lines joined, comments cut)
    and every inline code span (which may wrap a line)."""
    blocks, prose = _blocks(text)
    out = []
    for lang, body in blocks:
        if lang in ("", "bash", "sh", "shell", "console"):
            out += [line.split(" #")[0].strip() for line in body.replace("\\\n", " ").splitlines()]
    out += [" ".join(span.split()) for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", prose)]
    return [c for c in out if c]


def _make_targets() -> set:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([\w.%/-]+(?:[ \t]+[\w.%/-]+)*)[ \t]*:(?!=)", line)
        if m:
            targets.update(m.group(1).split())
    return targets


@pytest.mark.parametrize("name", COMMAND_DOCS)
def test_make_targets_exist(name):
    targets = _make_targets()
    shown = {t for c in _commands((ROOT / name).read_text()) for m in re.finditer(r"(?:^|[;&|(]\s*)make((?:\s+[\w.=/-]+)+)", c)
             for t in m.group(1).split() if "=" not in t and not t.startswith("-")}
    if name == "README.md":
        assert {"bench", "test"} <= shown, "the README's quick start lost make bench / make test"
    missing = sorted(shown - targets)
    assert not missing, f"{name} shows make targets the Makefile lacks: {missing}"


def _module_exists(module: str) -> bool:
    rel = ROOT / module.replace(".", "/")
    if (rel.with_suffix(".py")).is_file() or (rel / "__init__.py").is_file() or (rel / "__main__.py").is_file():
        return True
    if (ROOT / module.split(".")[0]).exists():       # a package of this repository: files only
        return False
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@pytest.mark.parametrize("name", COMMAND_DOCS)
def test_python_modules_and_scripts_exist(name):
    bad = []
    for c in _commands((ROOT / name).read_text()):
        if not re.search(r"\b(python3?|torchrun)\b", c):
            continue
        c = re.sub(r"""(['"]).*?\1""", "", c)          # python -c "...": code, not a module
        bad += [f"-m {m}" for m in re.findall(r"(?:^|\s)-m\s+([\w.]+)", c) if not _module_exists(m)]
        bad += [p for p in re.findall(r"\bpython3?\s+(?:-\S+\s+)*([\w./-]+\.py)\b", c) if not (ROOT / p).is_file()]
    assert not bad, f"{name} runs modules or scripts that do not exist: {bad}"


@functools.lru_cache(maxsize=None)
def _trainer_flags() -> frozenset:
    """The trainer's options: every `add_argument("--x", ...)` in the package that `python -m
    rsir_kernels.train` runs (read, not imported: wherever its modules live in that package, and
    whatever state the rest of the tree is in), `--no-x` for BooleanOptionalAction, and --help."""
    flags = {"--help"}
    train = ROOT / "rsir_kernels" / "train"
    for path in sorted(train.rglob("*.py")) + [p for p in [train.with_suffix(".py")] if p.is_file()]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "add_argument"):
                continue
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                     and a.value.startswith("--")]
            flags.update(names)
            if any(k.arg == "action" and "BooleanOptionalAction" in ast.unparse(k.value) for k in node.keywords):
                flags.update("--no-" + n[2:] for n in names)
    assert {"--data", "--model", "--resume"} <= flags, "the trainer's argparse was not found under rsir_kernels/train"
    return frozenset(flags)


# options of torchrun and SLURM that docs/training.md names beside the trainer's
NOT_TRAINER_FLAGS = {"--max-restarts", "--shutdown-timeout", "--signals-to-handle", "--signal", "--nproc_per_node",
                     "--nnodes", "--node-rank", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id", "--standalone"}


@pytest.mark.parametrize("name", ["README.md", "docs/training.md"])
def test_trainer_flags_exist(name):
    """Every --flag shown after `-m rsir_kernels.train` in a command, and (in the README and the
    training guide) every inline `--flag ...` span, is an option of the trainer."""
    shown = set()
    for c in _commands((ROOT / name).read_text()):
        if "rsir_kernels.train" in c:
            shown.update(re.findall(r"(?<![\w-])(--[\w-]+)", c.split("rsir_kernels.train", 1)[1]))
        elif c.startswith("--"):
            shown.update(f for f in re.findall(r"(?<![\w-])(--[\w-]+)", c) if f not in NOT_TRAINER_FLAGS)
    assert shown, f"{name} shows no trainer option: the pattern is broken"
    missing = sorted(shown - _trainer_flags())
    assert not missing, f"{name} shows trainer options that python -m rsir_kernels.train does not have: {missing}"
