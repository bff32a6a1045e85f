"""setup.cfg declares what the package imports: every third-party top-level import (at any depth, inside functions
too) has its distribution in install_requires, and the declared bounds include the versions installed here."""
from __future__ import annotations

import ast
import configparser
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "tp3_fastai"
# import name -> distribution, where they differ or where the name alone says nothing
IMPORT_TO_DIST = {"PIL": "pillow", "skimage": "scikit-image", "sklearn": "scikit-learn", "cv2": "opencv-python",
                  "yaml": "pyyaml", "fastai": "fastai", "fastcore": "fastcore", "fasttransform": "fasttransform",
                  "fastprogress": "fastprogress", "torch": "torch", "torchvision": "torchvision", "timm": "timm",
                  "numpy": "numpy", "matplotlib": "matplotlib", "mlxtend": "mlxtend", "safetensors": "safetensors",
                  "accelerate": "accelerate", "huggingface_hub": "huggingface-hub"}


def third_party_imports(pkg: Path = PKG) -> dict[str, list[str]]:
    """{top-level module: [file:line, ...]} of every absolute import outside the standard library and the package."""
    found: dict[str, list[str]] = {}
    for path in sorted(pkg.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != pkg.name:
                    found.setdefault(top, []).append(f"{path.relative_to(pkg.parent)}:{node.lineno}")
    return found


def declared() -> dict[str, Requirement]:
    """setup.cfg's install_requires, by canonical distribution name."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [ln.strip() for ln in cfg["options"]["install_requires"].splitlines()]
    reqs = [Requirement(ln) for ln in lines if ln and not ln.startswith("#")]
    return {canonicalize_name(r.name): r for r in reqs}


def test_every_third_party_import_is_declared():
    imports, reqs = third_party_imports(), declared()
    unmapped = sorted(set(imports) - set(IMPORT_TO_DIST))
    assert not unmapped, (f"imports without a distribution in IMPORT_TO_DIST: {unmapped} (at "
                          f"{[imports[m][0] for m in unmapped]}); add import -> distribution there")
    missing = {m: imports[m][0] for m in imports if canonicalize_name(IMPORT_TO_DIST[m]) not in reqs}
    assert not missing, ("third-party imports whose distribution setup.cfg does not declare (install_requires): "
                         + ", ".join(f"{m} -> {IMPORT_TO_DIST[m]} (first at {where})" for m, where in missing.items()))


def test_the_import_map_agrees_with_the_installed_distributions():
    installed = packages_distributions()
    for module in third_party_imports():
        dists = {canonicalize_name(d) for d in installed.get(module, [])}
        assert canonicalize_name(IMPORT_TO_DIST[module]) in dists, (module, dists)


def test_the_collector_sees_imports_inside_functions_and_from_imports(tmp_path):
    pkg = tmp_path / "pkgx"
    pkg.mkdir()
    (pkg / "a.py").write_text("import os, numpy.linalg as la\nfrom PIL import Image\nfrom . import b\n"
                              "from pkgx.c import d\n\ndef f():\n    import skimage.data\n")
    assert sorted(third_party_imports(pkg)) == ["PIL", "numpy", "skimage"]
    assert third_party_imports(pkg)["skimage"] == ["pkgx/a.py:7"]


@pytest.mark.parametrize("dist", sorted(declared()))
def test_declared_bounds_include_the_installed_version(dist):
    req = declared()[dist]
    try:
        installed = version(req.name)
    except PackageNotFoundError:
        pytest.fail(f"{req.name} is declared in setup.cfg but not installed: pip install -e .")
    assert req.specifier.contains(installed, prereleases=True), (
        f"installed {req.name} {installed} is outside setup.cfg's {req}: reinstall with `pip install -e .` "
        f"(make test does it when setup.cfg changes), or change the bound")


def test_fastai_range_is_the_one_the_private_names_were_checked_on():
    from tp3_fastai.core.fastai_internals import SUPPORTED_FASTAI

    assert str(declared()["fastai"].specifier) == str(Requirement(f"fastai{SUPPORTED_FASTAI}").specifier)
    assert "fasttransform" in declared() and declared()["fastai"].specifier.contains("2.8.0")
    assert not declared()["fastai"].specifier.contains("2.7.19")  # fastai 2.7 has no fasttransform
