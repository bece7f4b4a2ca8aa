"""The layout's rules, read from the source: the library never imports its test helpers."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "gpuconv"
# the only modules that may import gpuconv.testing (besides gpuconv/testing/ itself)
ALLOWED = {"_cli.py", "__main__.py", "_bench.py"}


def _module_name(path: Path, pkg: Path) -> str:
    parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, pkg: Path = PKG) -> set:
    """Absolute names of every module `path` imports (relative imports resolved;
    ``from a import b`` counts as importing a and a.b)."""
    name = _module_name(path, pkg)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            out.add(str(node.args[0].value))
    return out


def _imports_testing(path, pkg=PKG):
    return any(m == "gpuconv.testing" or m.startswith("gpuconv.testing.")
               for m in imported_modules(path, pkg))


def test_no_library_module_imports_gpuconv_testing():
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "testing" or str(rel) in ALLOWED:
            continue
        if _imports_testing(path):
            offenders.append(str(rel))
    assert not offenders, f"library modules importing gpuconv.testing: {offenders}"


def test_the_import_reader_sees_every_form(tmp_path):
    """The check above can fail: each way of importing gpuconv.testing is caught."""
    forms = ["from .testing import tolerance", "from . import testing",
             "import gpuconv.testing.cudasim", "from gpuconv.testing import cudasim",
             "import importlib\nimportlib.import_module('gpuconv.testing')"]
    pkg = tmp_path / "gpuconv"
    (pkg / "_cuda").mkdir(parents=True)
    for i, text in enumerate(forms):
        top = pkg / f"probe_{i}.py"             # gpuconv.probe_i
        top.write_text(text + "\n")
        assert _imports_testing(top, pkg), text
        deep = pkg / "_cuda" / f"probe_{i}.py"  # gpuconv._cuda.probe_i: one level up
        deep.write_text(text.replace("from .", "from ..") + "\n")
        assert _imports_testing(deep, pkg), text
    assert not _imports_testing(PKG / "_api.py")


def test_cudasim_stays_importable_from_testing():
    from gpuconv._runtimes import cudasim as home
    from gpuconv.testing import cudasim
    assert cudasim.SimRuntime is home.SimRuntime
    assert set(home.__all__) <= set(dir(cudasim))


def test_runtimes_implement_the_protocol_without_probing():
    import inspect

    from gpuconv._runtimes import DeviceRuntime
    from gpuconv._runtimes.cudasim import SimRuntime
    from gpuconv._runtimes.cupy import CupyRuntime
    for cls in (SimRuntime, CupyRuntime):
        assert issubclass(cls, DeviceRuntime) and not inspect.isabstract(cls), cls
    src = (PKG / "_cuda" / "backend.py").read_text()
    assert "getattr(" not in src  # members are required, never probed
