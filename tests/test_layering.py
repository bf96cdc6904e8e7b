"""Layers only point down: serve/ and jobs/ -> platform/ -> model/ (docs/architecture.md).

Every module of the four code folders is parsed (nothing is imported) and
checked for every way one module can reach another:

- imports, absolute or relative, at any depth of the module (inside
  functions too);
- string literals naming jobs/ or serve/ where it may not import them
  (`importlib`, Ray's `import_path`, `runpy`, mock targets, ...),
  docstrings excepted;
- in model/ and platform/: no dynamic imports at all (`runpy`,
  `importlib.import_module`, `importlib.util`, `__import__`). The CLI finds
  the jobs through the package's entry points, whose names live in
  pyproject.toml, not in platform/.

jobs/ and serve/ are both top layers and do not import each other.
"""
from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# folder -> the dheads packages its modules may import
ALLOWED = {
    "model": {"model", "configs"},
    "platform": {"model", "platform", "configs"},
    "jobs": {"model", "platform", "jobs", "configs"},
    "serve": {"model", "platform", "serve", "configs"},
}
PACKAGES = set(ALLOWED) | {"configs"}
DYNAMIC = ("runpy", "importlib", "imp")     # modules that import by name at run time
DYNAMIC_OK = ("importlib.metadata",)         # entry points: the sanctioned discovery
# strings are searched for the top layers' names (a message may mention
# `dheads.platform.storage` to a user; nothing may reach up by a string)
TOP_LAYER_NAME = re.compile(r"\bdheads\.(jobs|serve)\b")


def entry_point_groups(root: Path) -> set[str]:
    """Entry-point group names (e.g. "dheads.jobs") name a group, not a module."""
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    return set(meta.get("project", {}).get("entry-points", {}))


def modules(root: Path = REPO) -> list[Path]:
    return sorted(p for d in ALLOWED for p in (root / d).rglob("*.py"))


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def references(path: Path, root: Path) -> list[tuple[int, str, str]]:
    """`(line, kind, dotted name)` of every module the file at `path` names."""
    tree = ast.parse(path.read_text(), str(path))
    package = ["dheads", *path.relative_to(root).parent.parts]
    docs, groups = _docstrings(tree), entry_point_groups(root)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, "import", a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the file's package
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, "import", name))
            out += [(node.lineno, "import", f"{name}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            out.append((node.lineno, "import", "__import__"))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and id(node) not in docs and node.value not in groups):
            out += [(node.lineno, "string", f"dheads.{m}") for m in TOP_LAYER_NAME.findall(node.value)]
    return out


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(path: Path, root: Path = REPO) -> list[str]:
    layer = path.relative_to(root).parts[0]
    found = []
    for line, kind, name in references(path, root):
        where = f"{path.relative_to(root)}:{line}: {kind} {name}"
        parts = name.split(".")
        if parts[0] == "dheads" and len(parts) > 1 and parts[1] in PACKAGES \
                and parts[1] not in ALLOWED[layer]:
            found.append(f"{where} ({layer}/ may not name dheads.{parts[1]})")
        if layer in ("model", "platform") and kind == "import" \
                and (_under(name, DYNAMIC) or name == "__import__") and not _under(name, DYNAMIC_OK):
            found.append(f"{where} ({layer}/ may not import by name at run time)")
    return found


def test_every_code_folder_is_checked():
    files = modules()
    assert {p.relative_to(REPO).parts[0] for p in files} == set(ALLOWED)
    assert len(files) > 40, len(files)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_only_point_down(layer):
    found = [v for p in modules() if p.relative_to(REPO).parts[0] == layer for v in violations(p)]
    assert not found, "\n".join(found)


def test_the_checker_sees_every_kind_of_reference(tmp_path):
    """The rule is only as good as its parser: upward imports (plain, from,
    relative, inside a function), module names in strings and dynamic
    imports are all caught; docstrings and entry-point groups are not names."""
    (tmp_path / "pyproject.toml").write_text('[project.entry-points."dheads.jobs"]\n')
    (tmp_path / "platform" / "sub").mkdir(parents=True)
    src = tmp_path / "platform" / "sub" / "bad.py"
    src.write_text('"""A docstring naming dheads.jobs.dub is documentation."""\n'
                   "import dheads.serve.app\n"
                   "from dheads.jobs import dub\n"
                   "from ... import jobs\n"
                   "def f():\n"
                   "    from dheads.model.video import generate\n"
                   "    import runpy\n"
                   "    __import__('os')\n"
                   "    return 'dheads.serve.app:app_builder', 'dheads.jobs'\n")
    found = violations(src, tmp_path)
    lines = sorted(int(v.split(":")[1]) for v in found)
    assert lines == [2, 3, 3, 4, 7, 8, 9], found  # not 1 (docstring) nor 6 (model is below)
    assert sum("string" in v for v in found) == 1, found  # the entry-point group is no module
