"""Every reference in the docs and in code comments resolves inside the repository.

The files are read as text (Python modules with :mod:`ast`); nothing of the project is imported.

- A Markdown link, and every repository path a page names (``fedpsmos/...``, ``tests/test_x.py``, ...), in
  ``docs/*.md``, ``README.md`` and ``bench/README.md`` exists; a path with ``*`` or ``{...}`` matches at least
  one file, ``test_x.py::test_name`` names a function of that test file, and a link's ``#anchor`` is a
  heading of the page it points to.
- A section citation, ``docs/x.md "Section"`` (also ``docs/x.md, "A" and "B"``, ``README, "Section"`` and,
  inside a page, ``see "Section"``), anywhere in the package, scripts, workflow, config, docs, bench or tests
  names a heading of that page. A heading ``Name (note)`` may be cited as ``"Name"``.
- A dotted name ``fedpsmos.module.name`` resolves to a module of the package and a name defined in it (read
  with :mod:`ast`), and a Sphinx role ``:func:`name``` names something the package defines.
"""

from __future__ import annotations

import ast
import bisect
import builtins
import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# The pages whose links and repository paths are checked.
PAGES = ("docs/*.md", "README.md", "bench/README.md")
# The files whose section citations and package names are checked.
CITING = (
    "fedpsmos/**/*.py",
    "scripts/*.py",
    "workflow/**/*.smk",
    "workflow/**/*.rst",
    "workflow/**/*.yaml",
    "config/**/*.yaml",
    "config.yaml",
    "Snakefile",
    "profiles/**/*.yaml",
    "bench/*.py",
    "tests/*.py",
    *PAGES,
)
# First path components that name repository files (output folders such as results/ or data/ are not).
TOP_LEVEL = r"fedpsmos|scripts|workflow|config|docs|bench|tests|profiles|envs|\.ci"
REPO_PATH = re.compile(
    rf"(?<![\w./~$-])(?:(?:{TOP_LEVEL})/[\w./{{}}*,-]*|Snakefile\b|config\.yaml\b|pyproject\.toml\b)"
)
# ``tests/test_x.py::test_y``, ``test_x.py::test_y`` and a following ``::test_z`` of the same file.
TEST_REF = re.compile(r"(?:(?<![\w/])(?:tests/)?(test_\w+\.py))?::(\w+)")
LINK = re.compile(r"\]\(([^()\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
CITE = re.compile(
    r"(?<![\w/])(?P<page>docs/[\w-]+\.md|README(?:\.md)?)`*(?:\]\([^)\s]*\))?,?\s*\"(?P<section>[^\"]{1,150})\""
)
MORE = re.compile(r"\s*(?:,\s*|\band\s+|\bor\s+)\"(?P<section>[^\"]{1,150})\"")
SEE = re.compile(r"\bsee \"(?P<section>[^\"]{1,150})\"")
DOTTED = re.compile(r"(?<![\w.])fedpsmos(?:\.[A-Za-z_]\w*)+")
# ``rounds.aggregate_round`` or ``Trainer.end_epoch(...)`` inside backticks (not a dotted ``fedpsmos.`` name).
SHORT_NAME = re.compile(r"`(?!fedpsmos\.)([A-Za-z_]\w*)\.([A-Za-z_]\w*)(?=[`(])")
FILE_ENDINGS = {"yaml", "yml", "py", "md", "json", "csv", "png", "pt", "npz", "parquet", "txt", "tsv", "html"}
ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc):`~?\.?([\w.]+)`")


@dataclass(frozen=True)
class Problem:
    """One reference that does not resolve."""

    file: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.what}"


def files(patterns: tuple[str, ...]) -> list[Path]:
    """The repository files matching ``patterns`` (glob, relative to the repository root), sorted.

    This file is left out: its hand-made examples do not resolve on purpose.
    """
    found = {p for pattern in patterns for p in REPO.glob(pattern) if p.is_file()}
    return sorted(found - {Path(__file__).resolve()})


def rel(path: Path) -> str:
    """``path`` relative to the repository root, with ``/``."""
    return path.resolve().relative_to(REPO).as_posix() if path.is_absolute() else path.as_posix()


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a Markdown text outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to ``-``."""
    text = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower())
    return text.replace(" ", "-")


@cache
def headings(page: str) -> frozenset[str]:
    """The section names a page can be cited by: each heading, also without a trailing ``(note)``.

    Parameters
    ----------
    page:
        Path relative to the repository root.
    """
    names: set[str] = set()
    for _, line in prose_lines((REPO / page).read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match:
            name = " ".join(match.group(2).replace("`", "").split())
            names.add(name)
            names.add(re.sub(r"\s*\([^()]*\)$", "", name))
    return frozenset(names)


def flatten(text: str) -> tuple[str, list[int]]:
    """One line of text with each line's indentation and comment marker (``#``, ``//``) removed.

    A citation may wrap across lines of a comment or docstring. Returns the flat text and the offset at
    which each original line starts in it (for line numbers).
    """
    parts, starts, offset = [], [], 0
    for line in text.splitlines():
        piece = re.sub(r"^\s*(?:#+|//)?\s*", "", line)
        starts.append(offset)
        parts.append(piece)
        offset += len(piece) + 1
    return " ".join(parts), starts


def cited_sections(text: str, page: str) -> Iterator[tuple[int, str, str]]:
    """``(line, cited page, section)`` of every section citation in ``text`` (a file at ``page``).

    Parameters
    ----------
    text:
        The file's content.
    page:
        The file's path relative to the repository root (``see "X"`` in a page cites that page).
    """
    flat, starts = flatten(text)

    def line_of(pos: int) -> int:
        return bisect.bisect_right(starts, pos)

    for match in CITE.finditer(flat):
        target = "README.md" if match["page"].startswith("README") else match["page"]
        yield line_of(match.start()), target, match["section"]
        end = match.end()
        while more := MORE.match(flat, end):
            yield line_of(more.start("section")), target, more["section"]
            end = more.end()
    if page.endswith(".md"):
        for match in SEE.finditer(flat):
            yield line_of(match.start()), page, match["section"]


def section_problems(text: str, page: str) -> list[Problem]:
    """Section citations in ``text`` (the file at ``page``) whose page or heading does not exist."""
    problems = []
    for line, target, section in cited_sections(text, page):
        if not (REPO / target).is_file():
            problems.append(Problem(page, line, f"cites {target} (no such file)"))
        elif " ".join(section.replace("`", "").split()) not in headings(target):
            problems.append(Problem(page, line, f'cites {target} "{section}": no such section'))
    return problems


def path_exists(token: str) -> bool:
    """Whether a repository path exists; ``*`` and ``{...}`` parts must match at least one file."""
    token = token.rstrip("/")
    if "*" in token or "{" in token:
        pattern = re.sub(r"\{[^{}]*\}", "*", token)
        return any(REPO.glob(pattern))
    return (REPO / token).exists()


def test_function_exists(test_file: Path, name: str) -> bool:
    """Whether ``test_file`` defines a function ``name`` (a parametrised id ``name[...]`` included)."""
    return re.search(rf"^\s*def {re.escape(name)}\(", test_file.read_text(encoding="utf-8"), re.M) is not None


test_function_exists.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def page_path_problems(text: str, page: str) -> list[Problem]:
    """Links and repository paths of a Markdown page (outside code blocks) that do not resolve."""
    problems = []
    base = (REPO / page).parent
    for number, line in prose_lines(text):
        for match in LINK.finditer(line):
            target = match.group(1)
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file_part, _, anchor = target.partition("#")
            resolved = (base / file_part).resolve() if file_part else (REPO / page)
            if not resolved.exists():
                problems.append(Problem(page, number, f"link to {target}: no such file"))
            elif anchor and resolved.suffix == ".md":
                if anchor not in {slug(h) for h in headings(rel(resolved))}:
                    problems.append(Problem(page, number, f"link to {target}: no such heading"))
        for match in REPO_PATH.finditer(line):
            path = match.group(0).rstrip(".,;")
            if not path_exists(path):
                problems.append(Problem(page, number, f"{path}: no such file in the repository"))
        test_file: Path | None = None
        for match in TEST_REF.finditer(line):
            test_file = REPO / "tests" / match.group(1) if match.group(1) else test_file
            if test_file is None:
                problems.append(Problem(page, number, f"{match.group(0)}: which test file?"))
            elif not test_file.is_file():
                problems.append(Problem(page, number, f"{rel(test_file)}: no such test file"))
            elif not test_function_exists(test_file, match.group(2)):
                problems.append(Problem(page, number, f"{match.group(0)}: no such test function"))
    return problems


@cache
def parsed(module: str) -> ast.Module | None:
    """The syntax tree of a package module (``fedpsmos.x.y``); ``None`` when there is no such module."""
    base = REPO.joinpath(*module.split("."))
    source = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    return ast.parse(source.read_text(encoding="utf-8")) if source.is_file() else None


@cache
def module_names(module: str) -> frozenset[str] | None:
    """Top-level names of a package module (``fedpsmos.x.y``), read with :mod:`ast`; ``None``: no module."""
    tree = parsed(module)
    if tree is None:
        return None
    names: set[str] = set()
    base = REPO.joinpath(*module.split("."))
    if base.is_dir():
        names |= {p.stem for p in base.glob("*.py")} | {p.name for p in base.iterdir() if p.is_dir()}
    for node in tree.body:
        names |= defined_names(node)
    return frozenset(names)


def defined_names(node: ast.stmt) -> set[str]:
    """Names a module- or class-level statement defines (functions, classes, assignments, imports)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    if isinstance(node, (ast.If, ast.Try)):
        return {n for child in node.body for n in defined_names(child)}
    return set()


@cache
def class_members(module: str, name: str) -> frozenset[str] | None:
    """Names defined in the body of class ``name`` of a package module; ``None`` when it is not a class."""
    tree = parsed(module)
    for node in tree.body if tree is not None else []:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return frozenset(n for child in node.body for n in defined_names(child))
    return None


def dotted_problem(name: str) -> str | None:
    """Why ``fedpsmos.a.b.c`` does not resolve, or ``None`` when it does."""
    parts = name.split(".")
    split = max(i for i in range(1, len(parts) + 1) if module_names(".".join(parts[:i])) is not None)
    module, rest = ".".join(parts[:split]), parts[split:]
    if not rest:
        return None
    names = module_names(module) or frozenset()
    if rest[0] not in names:
        return f"{name}: {module} defines no {rest[0]}"
    if len(rest) > 1:
        members = class_members(module, rest[0])
        if members is not None and rest[1] not in members:
            return f"{name}: {module}.{rest[0]} has no {rest[1]}"
    return None


@cache
def package_definitions() -> frozenset[str]:
    """Every function, class, method, argument and assigned name in the package, scripts, bench and tests."""
    names: set[str] = set()
    for source in files(("fedpsmos/**/*.py", "scripts/*.py", "bench/*.py", "tests/*.py")):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.stmt):
                names |= defined_names(node)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    module_paths = files(("fedpsmos/**/*.py",))
    names |= {p.stem for p in module_paths} | {p.parent.name for p in module_paths}
    return frozenset(names)


def external(name: str) -> bool:
    """Whether a role names a builtin (``ValueError``) or another library's object (``numpy.percentile``)."""
    first = name.split(".")[0]
    if hasattr(builtins, first):
        return True
    return "." in name and first not in package_definitions() and importlib.util.find_spec(first) is not None


def name_problems(text: str, page: str) -> list[Problem]:
    """Dotted package names and Sphinx roles in ``text`` (the file at ``page``) that do not resolve."""
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        for match in DOTTED.finditer(line):
            why = dotted_problem(match.group(0).rstrip("."))
            if why:
                problems.append(Problem(page, number, why))
        for match in ROLE.finditer(line):
            if match.group(1).startswith("fedpsmos.") or external(match.group(1)):
                continue  # checked as a dotted name; another library's name
            missing = [p for p in match.group(1).split(".") if p not in package_definitions()]
            if missing:
                problems.append(Problem(page, number, f"{match.group(0)}: {missing[0]} is not defined"))
    return problems


@cache
def modules_by_stem() -> dict[str, list[str]]:
    """Dotted names of the package modules by last component (``rounds``: ``fedpsmos.federated.rounds``)."""
    found: dict[str, list[str]] = {}
    for source in files(("fedpsmos/**/*.py",)):
        parts = source.relative_to(REPO).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        found.setdefault(parts[-1], []).append(".".join(parts))
    return found


@cache
def classes_by_name() -> dict[str, list[tuple[str, str]]]:
    """``(module, class)`` of every class the package defines at module level, by class name."""
    found: dict[str, list[tuple[str, str]]] = {}
    for stem_modules in modules_by_stem().values():
        for module in stem_modules:
            for name in module_names(module) or ():
                if class_members(module, name) is not None:
                    found.setdefault(name, []).append((module, name))
    return found


@cache
def config_keys() -> frozenset[str]:
    """``section.key`` of every key the configuration schema declares (``federated.retries``)."""
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text(encoding="utf-8"))
    return frozenset(
        f"{section}.{key}"
        for section, spec in schema["properties"].items()
        for key in (spec.get("properties") or {})
    )


def short_name_problem(owner: str, name: str) -> str | None:
    """Why ``owner.name`` (a module's last component or a class of the package) does not resolve, or ``None``.

    A configuration key (``preprocessing.spacing``) passes, and so do names whose owner is neither a module
    nor a class of the package (``torch.save``, ``sitk.DICOMOrient``): another library's.
    """
    if f"{owner}.{name}" in config_keys():
        return None
    if owner in modules_by_stem():
        if not any(name in (module_names(m) or ()) for m in modules_by_stem()[owner]):
            return f"{owner}.{name}: no module {owner} of the package defines {name}"
    elif owner in classes_by_name():
        if not any(name in (class_members(m, c) or ()) for m, c in classes_by_name()[owner]):
            return f"{owner}.{name}: class {owner} has no {name}"
    return None


def page_name_problems(text: str, page: str) -> list[Problem]:
    """Backticked ``module.function`` and ``Class.method`` names of a Markdown page that do not resolve."""
    problems = []
    for number, line in prose_lines(text):
        for match in SHORT_NAME.finditer(line):
            if match.group(2) in FILE_ENDINGS:
                continue
            why = short_name_problem(match.group(1), match.group(2))
            if why:
                problems.append(Problem(page, number, why))
    return problems


def report(problems: list[Problem]) -> str:
    """One line per problem."""
    return "\n".join(str(p) for p in problems)


def test_links_and_repository_paths_in_pages_exist() -> None:
    problems = [
        p for page in files(PAGES) for p in page_path_problems(page.read_text(encoding="utf-8"), rel(page))
    ]
    assert not problems, "paths that do not resolve:\n" + report(problems)


def test_section_citations_name_existing_headings() -> None:
    problems = [
        p for src in files(CITING) for p in section_problems(src.read_text(encoding="utf-8"), rel(src))
    ]
    assert not problems, "section citations that do not resolve:\n" + report(problems)


def test_package_names_in_docs_and_code_resolve() -> None:
    problems = [p for src in files(CITING) for p in name_problems(src.read_text(encoding="utf-8"), rel(src))]
    problems += [
        p for page in files(PAGES) for p in page_name_problems(page.read_text(encoding="utf-8"), rel(page))
    ]
    assert not problems, "package names that do not resolve:\n" + report(problems)


# The checks themselves, on hand-made text.


def test_a_citation_wrapped_across_comment_lines_is_found_and_checked() -> None:
    text = '# see docs/design.md "The CPU\n#   default run" and docs/design.md, "Losses" and "No such"\n'

    found = list(cited_sections(text, "config.yaml"))
    problems = section_problems(text, "config.yaml")

    assert found == [
        (1, "docs/design.md", "The CPU default run"),
        (2, "docs/design.md", "Losses"),
        (2, "docs/design.md", "No such"),
    ]
    assert [str(p) for p in problems] == ['config.yaml:2: cites docs/design.md "No such": no such section']


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[x](design.md)", None),
        ("[x](design.md#losses)", None),
        ("[x](design.md#no-such-heading)", "link to design.md#no-such-heading: no such heading"),
        ("[x](nowhere.md)", "link to nowhere.md: no such file"),
        ("the code (`fedpsmos/federated/fedavg.py`).", None),
        ("`fedpsmos/federated/no_such.py`", "fedpsmos/federated/no_such.py: no such file in the repository"),
        ("`config/real/*.yaml`, `workflow/report/table{n}.rst`", None),
        ("`tests/test_doc_references.py::test_no_such`", "no such test function"),
        ("`test_doc_references.py::test_no_such`", "no such test function"),
        ("`test_doc_references.py::test_page_paths_are_checked`, `::test_no_such`", "no such test function"),
        ("`tests/test_doc_references.py::test_page_paths_are_checked[...]`", None),
        ("`results/{model}/metrics.csv`, `data/real/BTCV/`, `fedpsmos/atomic.py:20`", None),
        ("```\nfedpsmos/inside_a_code_block.py\n```", None),
    ],
)
def test_page_paths_are_checked(text: str, problem: str | None) -> None:
    problems = page_path_problems(text, "docs/page.md")

    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0].what


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("fedpsmos.federated.fedavg.aggregate", None),
        ("``fedpsmos.training.trainer.Trainer.end_epoch``", None),
        ("fedpsmos.federated.fedavg.no_such", "fedpsmos.federated.fedavg defines no no_such"),
        ("fedpsmos.training.trainer.Trainer.no_such", "Trainer has no no_such"),
        (":func:`~fedpsmos.federated.paths.site_model_path`", None),
        (":func:`no_such_function`", "no_such_function is not defined"),
        (":meth:`Trainer.end_epoch`", None),
        (":class:`ValueError`, :func:`numpy.percentile`", None),
    ],
)
def test_package_names_are_checked(text: str, problem: str | None) -> None:
    problems = name_problems(text, "fedpsmos/x.py")

    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0].what


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("`fedavg.aggregate(states, counts)` and `Trainer.end_epoch(loss)`", None),
        ("`torch.save`, `sitk.DICOMOrient`, `config.yaml`, `rounds.csv`, `federated.retries`", None),
        ("`rounds.aggregate_round`", "no module rounds of the package defines aggregate_round"),
        ("`Trainer.no_such()`", "class Trainer has no no_such"),
    ],
)
def test_short_names_in_pages_are_checked(text: str, problem: str | None) -> None:
    problems = page_name_problems(text, "docs/page.md")

    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0].what
