"""The package declares what it imports, and a config whose optional package is missing is `skipped`, not `failed`."""
from __future__ import annotations

import ast
import functools
import importlib.metadata
import json
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import tiny_run
from dtype_bench import precision

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("dtype_bench", "experiments", "analysis", "benchmarks", "tests")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def declared(*extras: str) -> set[str]:
    """Canonical distribution names in the core dependencies (no extras) or in the named extras."""
    groups = [PYPROJECT["dependencies"]] if not extras else [PYPROJECT["optional-dependencies"][e] for e in extras]
    names = {canonicalize_name(Requirement(r).name) for group in groups for r in group}
    return names - {"dtype-bench"}  # extras that pull other extras


def local_modules() -> set[str]:
    """The repository's own top-level names: the packages pyproject installs (dtype_bench, experiments, analysis,
    benchmarks) and the tests' helper modules, which pytest puts on sys.path."""
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    return {p.split(".")[0] for p in packages} | {path.stem for path in (ROOT / "tests").glob("*.py")}


def third_party_imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - local_modules() - {"__future__"}


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # scans every installed distribution: once


def distribution_of(module: str) -> str:
    """The installed distribution providing `module` (e.g. sklearn -> scikit-learn); a module that is not
    installed here is taken to be its own distribution's name."""
    dists = _packages_distributions().get(module)
    return canonicalize_name(dists[0] if dists else module)


def sources(*dirs: str) -> list[Path]:
    return [p for d in dirs for p in sorted((ROOT / d).rglob("*.py"))]


def test_every_third_party_import_is_declared():
    everything = declared() | declared(*PYPROJECT["optional-dependencies"])
    undeclared = {f"{path.relative_to(ROOT)}: {module} ({distribution_of(module)})"
                  for path in sources(*SOURCE_DIRS) for module in third_party_imports(path)
                  if distribution_of(module) not in everything}
    assert not undeclared, f"imports not declared in pyproject.toml: {sorted(undeclared)}"


def test_the_package_imports_only_core_dependencies_at_module_level():
    """`import dtype_bench.<anything>` works on a minimal install: optional packages are imported where used."""
    outside_core = {f"{path.relative_to(ROOT)}: {module}" for path in sources("dtype_bench")
                    for module in third_party_imports(path, top_level_only=True)
                    if distribution_of(module) not in declared()}
    assert not outside_core, f"module-level imports of non-core packages: {sorted(outside_core)}"


def test_the_import_check_can_fail(tmp_path):
    """The checks above see an undeclared import (and skip stdlib, local and relative ones)."""
    script = tmp_path / "x.py"
    script.write_text("import os\nimport json\nfrom . import y\nimport dtype_bench.precision\nimport sklearn.metrics\n"
                      "def f():\n    import some_undeclared_pkg\n")
    assert third_party_imports(script) == {"sklearn", "some_undeclared_pkg"}
    assert third_party_imports(script, top_level_only=True) == {"sklearn"}
    assert distribution_of("sklearn") == "scikit-learn"
    assert "some-undeclared-pkg" not in declared() | declared(*PYPROJECT["optional-dependencies"])


def test_requirements_pins_satisfy_the_declared_ranges():
    """requirements.txt (what `make` installs) pins a version inside pyproject's range for each package both name."""
    ranges = {canonicalize_name(r.name): r.specifier for r in map(Requirement, [
        *PYPROJECT["dependencies"], *(d for group in PYPROJECT["optional-dependencies"].values() for d in group)])}
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _extras, version = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[\w,\-]+\])?==(\S+)", line).groups()
            pins[canonicalize_name(name)] = version
    outside = {name: (version, str(ranges[name])) for name, version in pins.items()
               if name in ranges and not ranges[name].contains(version)}
    assert not outside, f"pins outside the pyproject ranges: {outside}"
    unpinned_core = declared() - set(pins)
    assert not unpinned_core, f"core dependencies without a pin in requirements.txt: {unpinned_core}"


@pytest.mark.parametrize("config, module", [("amp_bf16_8bit_adam", "bitsandbytes"), ("bf16_sr_bf16_moments", "torchao"),
                                            ("bf16_kahan_bf16_moments", "optimi"),
                                            ("amp_bf16", None)])
def test_a_missing_optional_package_is_a_reason_to_skip(monkeypatch, config, module):
    for name in [m for m in sys.modules if module and (m == module or m.startswith(module + "."))]:
        monkeypatch.delitem(sys.modules, name)
    if module:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    import torch

    reason = precision.unsupported_reason(precision.get(config), torch.device("cpu"))
    if module is None:
        assert reason is None
    else:
        assert reason and module in reason and f"pip install" in reason, reason


BLOCKER = textwrap.dedent("""
    import runpy, sys
    class Block:  # the interpreter behaves as if these packages were not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
    sys.meta_path.insert(0, Block())
    sys.argv = {argv!r}
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def test_run_without_bitsandbytes_records_skipped_with_the_install_command(small_cache_dir, tmp_path):
    """The real run.py, in an interpreter where bitsandbytes cannot be imported: a `skipped` row, exit 0."""
    argv = [str(a) for a in tiny_run.command(small_cache_dir, tmp_path / "out", "--config", "amp_bf16_8bit_adam",
                                             "--max_steps", "2")[1:]]
    proc = subprocess.run([sys.executable, "-c", BLOCKER.format(blocked={"bitsandbytes"}, argv=argv)],
                          env=tiny_run.ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = tiny_run.rows(tmp_path / "out")
    assert row["status"] == "skipped", json.dumps(row)[:2000]
    assert "bitsandbytes" in row["reason"] and "pip install 'dtype-bench[optimizers]'" in row["reason"]
    assert "Traceback" not in proc.stderr
