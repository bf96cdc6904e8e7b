"""Every repository path the docs and the code comments name exists.

Scanned:
- README.md and docs/*.md: paths inside backticks and fenced code blocks,
  markdown link and image targets (relative to the page), and bare file
  names in backticks with a source extension (`segments.py`: some file of
  that name exists in the repo);
- comments and docstrings of the *.py files under model/ platform/ jobs/
  serve/ bench/ scripts/ tests/.

A path is a token that starts with a top-level folder of the repo (model/,
platform/, jobs/, serve/, configs/, infra/, tests/, bench/, scripts/, docs/)
and ends in `/` or a file extension, or an upper-case root document name
(README.md). Not checked: URLs and `s3://` URIs, tokens inside a longer
path (../shared/..., /tmp/...), folders outside the list (runs/, demo_out/,
.venv/), globs (`bench/*.py`), placeholders (`configs/<job>.yaml`,
`configs/model/{tiny,small}.yaml`), and outputs a command writes
(`--out docs/x.png`).

KNOWN_STALE lists the stale paths that code comments still name, each with
its file: the list may only shrink. A new stale path anywhere fails, and so
does an entry here once it is fixed (remove it then).
"""
from __future__ import annotations

import ast
import io
import os
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (file, path it names that does not exist). Fix the comment, then drop the line.
KNOWN_STALE: set[tuple[str, str]] = set()

TOP = ("model", "platform", "jobs", "serve", "configs", "infra", "tests", "bench", "scripts", "docs")
CODE_DIRS = ("model", "platform", "jobs", "serve", "bench", "scripts", "tests")
EXTS = {"py", "md", "yaml", "yml", "json", "toml", "txt", "sh", "png", "jpg", "jpeg", "gif", "svg",
        "parquet", "lock", "cfg", "ini", "html", "csv", "jsonl", "mp4", "wav", "prom"}
BARE_EXTS = {"py", "md", "yaml", "yml", "sh", "toml"}  # a bare name with these must exist somewhere
NO_EXT_FILES = {"Dockerfile", "Makefile"}
SKIP_DIRS = {".git", ".venv", ".venv-tools", "runs", "demo_out", "node_modules", "__pycache__",
             "dheads.egg-info", ".pytest_cache"}

PATH_RE = re.compile(r"(?<![\w./~$:@-])((?:%s)/[\w./-]*)" % "|".join(TOP))
ROOT_DOC_RE = re.compile(r"(?<![\w./-])([A-Z][A-Z_]*\.md)\b")
BARE_RE = re.compile(r"^[\w.-]+\.(%s)$" % "|".join(sorted(BARE_EXTS)))
OUTPUT_BEFORE = re.compile(r"(--out[ =]|\bout=|\boutput=)$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _basenames() -> set[str]:
    names = set()
    for _, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        names.update(files)
    return names


def path_tokens(text: str) -> list[tuple[int, str]]:
    """(offset, path) of every repository-path-looking token in `text`."""
    found = []
    for m in PATH_RE.finditer(text):
        token = m.group(1).rstrip(".,-")
        after = text[m.end():m.end() + 1]
        if after and after in "{*<$[":
            continue                                   # a glob or placeholder
        if OUTPUT_BEFORE.search(text[max(0, m.start() - 9):m.start()]):
            continue                                   # what a command writes
        last = token.rstrip("/").rsplit("/", 1)[-1]
        if token.endswith("/") or "." in last and last.rsplit(".", 1)[1] in EXTS \
                or last in NO_EXT_FILES:
            found.append((m.start(), token))
        elif "." not in last:
            found.append((m.start(), token))           # `tests/model`: a folder or a module
    for m in ROOT_DOC_RE.finditer(text):
        found.append((m.start(), m.group(1)))
    return found


def exists(token: str) -> bool:
    p = ROOT / token
    if token.endswith("/"):
        return p.is_dir()
    if "/" not in token:                               # README.md: at the root
        return p.exists()
    last = token.rsplit("/", 1)[-1]
    if "." not in last and last not in NO_EXT_FILES:
        return p.is_dir() or p.exists() or p.with_name(last + ".py").exists()
    return p.exists()


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def markdown_refs(md: Path) -> list[tuple[int, str, bool]]:
    """(line, path, exists) of every path a markdown page names."""
    text = md.read_text(encoding="utf-8")
    names = None
    refs = []
    spans = [(m.start(1), m.group(1)) for m in FENCE.finditer(text)]
    unfenced = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    spans += [(m.start(2), m.group(2)) for m in INLINE_CODE.finditer(unfenced)]
    for start, span in spans:
        for off, token in path_tokens(span):
            refs.append((_line(text, start + off), token, exists(token)))
        bare = span.strip()
        if BARE_RE.match(bare) and not ROOT_DOC_RE.fullmatch(bare):
            names = names if names is not None else _basenames()
            refs.append((_line(text, start), bare, bare in names))
    for m in ROOT_DOC_RE.finditer(unfenced):            # README.md in prose too
        refs.append((_line(text, m.start()), m.group(1), (ROOT / m.group(1)).exists()))
    for m in LINK.finditer(unfenced):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue                                   # a URL, mailto:, an anchor
        target = target.split("#", 1)[0]
        refs.append((_line(text, m.start()), target, (md.parent / target).exists()))
    return refs


def code_texts(py: Path) -> list[tuple[int, str]]:
    """(first line, text) of every comment and docstring of a Python file."""
    source = py.read_text(encoding="utf-8")
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out.append((tok.start[0], tok.string))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and node.body and isinstance(node.body[0], ast.Expr) \
                and isinstance(node.body[0].value, ast.Constant) \
                and isinstance(node.body[0].value.value, str):
            out.append((node.body[0].lineno, node.body[0].value.value))
    return out


def code_refs(py: Path) -> list[tuple[int, str, bool]]:
    refs = []
    for line, text in code_texts(py):
        for off, token in path_tokens(text):
            refs.append((line + text.count("\n", 0, off), token, exists(token)))
    return refs


def doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_files() -> list[Path]:
    return sorted(p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py")
                  if not any(part in SKIP_DIRS for part in p.relative_to(ROOT).parts))


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_name_only_paths_that_exist(page: Path):
    missing = [f"{page.relative_to(ROOT)}:{line} -> {token}"
               for line, token, ok in markdown_refs(page) if not ok]
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(missing)


def test_code_comments_name_only_paths_that_exist():
    missing = []
    for py in code_files():
        rel = py.relative_to(ROOT).as_posix()
        for line, token, ok in code_refs(py):
            if not ok and (rel, token) not in KNOWN_STALE:
                missing.append(f"{rel}:{line} -> {token}")
    assert not missing, ("paths named in code comments/docstrings that do not exist "
                         "(fix the comment; KNOWN_STALE is not for new ones):\n" + "\n".join(missing))


def test_known_stale_paths_are_still_stale():
    """An entry of KNOWN_STALE that was fixed must leave the list."""
    fixed = []
    for rel, token in sorted(KNOWN_STALE):
        still = [t for _, t, ok in code_refs(ROOT / rel) if t == token and not ok] \
            if (ROOT / rel).exists() else []
        if not still:
            fixed.append(f"{rel} -> {token}")
    assert not fixed, "no longer stale, remove from KNOWN_STALE:\n" + "\n".join(fixed)


def test_the_checker_sees_stale_paths(tmp_path: Path):
    md = tmp_path / "page.md"
    md.write_text("Run `python bench/nothere.py --out docs/made.png`, see [x](missing.md),\n"
                  "`configs/<job>.yaml` and `bench/*.py` are patterns; `model/frameloop.py` is real.\n"
                  "```\ndheads train model=tiny  # configs/model/nothere.yaml\n```\n"
                  "Old notes: DESIGN.md, `gone_module.py`. Not paths: s3://b/docs/x.md ../shared/docs/y.md\n")
    refs = {(token, ok) for _, token, ok in markdown_refs(md)}
    assert refs == {("bench/nothere.py", False), ("missing.md", False), ("model/frameloop.py", True),
                    ("configs/model/nothere.yaml", False), ("DESIGN.md", False),
                    ("gone_module.py", False)}
    py = tmp_path / "mod.py"
    py.write_text('"""See docs/readme/x.md and `model/video.py::generate()`."""\n'
                  "x = 'serve/not_a_comment.py'  # but platform/gone.py is, and jobs/ too\n")
    assert {(t, ok) for _, t, ok in code_refs(py)} == {
        ("docs/readme/x.md", False), ("model/video.py", True), ("platform/gone.py", False),
        ("jobs/", True)}
