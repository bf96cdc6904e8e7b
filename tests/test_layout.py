"""The package layout keeps the stdlib `platform` module visible, and
`dheads.model` stays pure torch (docs/architecture.md, "Layers only point down")."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ["platform", "model", "jobs", "serve"]


def test_no_init_py_in_the_namespace_folders():
    for d in CODE_DIRS:
        assert not (REPO / d / "__init__.py").exists(), f"{d}/__init__.py shadows the stdlib"


def test_stdlib_platform_from_the_repo_root():
    code = ("import platform, dheads.platform.config; "
            "print(platform.system(), platform.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    system, path = out.stdout.split()
    assert system == "Linux"
    assert not Path(path).resolve().is_relative_to(REPO)


_RAY_DRIVER = """
import json, sys
import ray

ray.init(address=sys.argv[1], log_to_driver=False, runtime_env={
    "working_dir": sys.argv[2],
    "excludes": [".venv", ".git", "runs", "outputs", "demo_out"]})


@ray.remote
def probe():
    import os
    import platform

    import dheads.platform.config  # noqa: F401

    return [platform.system(), platform.__file__, os.getcwd(), os.path.isdir("platform")]


print(json.dumps(ray.get(probe.remote(), timeout=180)))
"""


def test_stdlib_platform_in_a_ray_task_with_the_repo_as_working_dir(ray_session, tmp_path):
    # a working_dir runtime env is job-level in Ray: a second driver joins the
    # session's cluster with it
    import json

    address = ray_session.get_runtime_context().gcs_address
    out = subprocess.run([sys.executable, "-c", _RAY_DRIVER, address, str(REPO)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    system, path, cwd, has_platform_dir = json.loads(out.stdout.strip().splitlines()[-1])
    assert system == "Linux"
    assert has_platform_dir  # really running inside the uploaded repo copy
    assert not Path(path).resolve().is_relative_to(Path(cwd).resolve())


def test_model_package_imports_neither_ray_nor_torch_distributed():
    banned = ("ray", "torch.distributed", "dheads.platform", "dheads.jobs", "dheads.serve")
    for file in sorted((REPO / "model").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert not any(name == b or name.startswith(b + ".") for b in banned), \
                    f"{file.relative_to(REPO)} imports {name}"


def test_every_sub_package_is_in_the_wheel():
    """setuptools puts only the packages pyproject.toml lists into a wheel
    (the Docker image installs one): every regular sub-package must be listed."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"dheads." + ".".join(p.parent.relative_to(REPO).parts)
             for d in CODE_DIRS for p in (REPO / d).rglob("__init__.py")}
    assert found and found <= listed, sorted(found - listed)
