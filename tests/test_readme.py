"""The README stays short and true: its layout block names every package and every module of the flat floors,
and only paths that exist; every relative link in the README and the docs reaches a file and, where it names
one, a heading."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250
PACKAGE_ROOTS = ("merging", "infra", "tasks", "flows", "mergeplan")
FLAT_FLOORS = ("infra", "tasks", "flows", "mergeplan")
DOCUMENTS = [README, ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def layout_block() -> list[str]:
    match = re.search(r"^## Layout\n+```\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)
    assert match, "README.md has no '## Layout' section with a fenced block"
    return match.group(1).splitlines()


def layout_paths() -> set[str]:
    """Each line names one or more paths (comma-separated, before two spaces), under the folders above it; two
    spaces of indent are one folder deeper."""
    paths: set[str] = set()
    folders: list[str] = []
    for line in layout_block():
        depth = (len(line) - len(line.lstrip(" "))) // 2
        names = re.split(r" {2,}", line.strip(), maxsplit=1)[0]
        del folders[depth:]
        for name in names.split(", "):
            paths.add("/".join([*folders, name.rstrip("/")]))
        if names.endswith("/"):
            folders.append(names.rstrip("/"))
    return paths


def outside_code(text: str) -> list[str]:
    """The lines of a markdown text that are not inside a fenced block."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(document: Path) -> set[str]:
    """GitHub's anchors for the document's headings: lower case, punctuation dropped, spaces as hyphens."""
    found: set[str] = set()
    for line in outside_code(document.read_text()):
        heading = re.match(r"#{1,6} (.*)", line)
        if heading:
            anchor = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            suffix = 0
            while (anchor if not suffix else f"{anchor}-{suffix}") in found:
                suffix += 1
            found.add(anchor if not suffix else f"{anchor}-{suffix}")
    return found


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines < MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_layout_names_only_paths_that_exist():
    missing = sorted(path for path in layout_paths() if not (ROOT / path).exists())
    assert not missing, f"README.md's layout names paths that do not exist: {missing}"


def test_layout_names_every_package():
    packages = {init.parent.relative_to(ROOT).as_posix()
                for root in PACKAGE_ROOTS for init in (ROOT / root).rglob("__init__.py")}
    unnamed = sorted(packages - layout_paths())
    assert not unnamed, f"README.md's layout does not name these packages: {unnamed}"


def test_layout_names_every_module_of_the_flat_floors():
    modules = {module.relative_to(ROOT).as_posix()
               for floor in FLAT_FLOORS for module in (ROOT / floor).glob("*.py") if module.name != "__init__.py"}
    unnamed = sorted(modules - layout_paths())
    assert not unnamed, f"README.md's layout does not name these modules: {unnamed}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_relative_links_resolve(document):
    broken = []
    for target in LINK.findall("\n".join(outside_code(document.read_text()))):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            broken.append(target)
    assert not broken, f"{document.relative_to(ROOT)}: links that reach no file or heading: {broken}"
