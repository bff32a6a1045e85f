"""fastai's private names: every one the package relies on is listed in tp3_fastai/core/fastai_internals.py, still
exists in the installed fastai where the package expects it, and is used nowhere else; a missing one fails with a
message naming it."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
from pathlib import Path

import pytest

from tp3_fastai.core import fastai_internals
from tp3_fastai.core.fastai_internals import (PRIVATE_NAMES, FastaiInternalsError, PrivateName, check_private_names,
                                              lookup)

PKG = Path(__file__).resolve().parents[1] / "tp3_fastai"
INTERNALS = PKG / "core" / "fastai_internals.py"
FAST = ("fastai", "fastcore", "fastprogress", "fasttransform")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("dotted", sorted(PRIVATE_NAMES))
def test_each_listed_private_name_exists_in_the_installed_fastai(dotted):
    assert lookup(dotted) is not None


def test_fastai_still_uses_each_listed_name_where_the_package_expects_it():
    problems = check_private_names()
    assert not problems, "fastai changed a private name tp3_fastai relies on:\n" + "\n".join(problems)


def test_a_missing_name_fails_with_a_message_naming_it(monkeypatch):
    gone = "fastai.vision.augment._get_size_renamed"
    monkeypatch.setitem(PRIVATE_NAMES, gone, PrivateName("read by a test", ("fastai.vision.augment.RandomCrop",)))
    import fastai

    with pytest.raises(FastaiInternalsError) as e:
        lookup(gone)
    msg = str(e.value)
    assert f"fastai {fastai.__version__} has no `{gone}`" in msg and "read by a test" in msg
    assert "supports fastai>=2.8,<2.9" in msg and "fastai_internals.py" in msg
    assert any(gone in p for p in check_private_names())
    # a fastai function that stopped using a listed name is reported too
    monkeypatch.setitem(PRIVATE_NAMES, "fastai.vision.augment._get_sz",
                        PrivateName("read by a test", ("fastai.vision.augment.flip_mat",)))
    assert any("fastai.vision.augment.flip_mat no longer uses fastai.vision.augment._get_sz" in p
               for p in check_private_names())
    with pytest.raises(ValueError, match="not listed in tp3_fastai.core.fastai_internals.PRIVATE_NAMES"):
        lookup("fastai.learner._ConstantFunc")


def _fast_module_aliases(tree: ast.AST) -> set[str]:
    """Names a module binds to fastai-family modules (`import fastai.x`, `from fastai import learner as l`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] in FAST}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in FAST:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                try:
                    if inspect.ismodule(importlib.import_module(full)):
                        names.add(a.asname or a.name)
                except ImportError:
                    pass
    return names


def _direct_uses(path: Path) -> list[str]:
    """Private fastai-family names a module imports or reads off a fastai-family module."""
    tree = ast.parse(path.read_text())
    aliases = _fast_module_aliases(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in FAST:
            out += [f"{node.lineno}: imports {node.module}.{a.name}" for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in aliases:
                out.append(f"{node.lineno}: reads {ast.unparse(node)}")
    return out


def _load(path: Path):
    """The module of a file: imported by its package name inside the package, else loaded from the file."""
    if PKG in path.parents:
        return importlib.import_module(_module_name(path))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inherited_uses(path: Path) -> list[tuple[str, str]]:
    """(line, fastai owner's dotted name) for each private name a class of the module defines or reads on `self`
    / `super()` that it does not define itself but a fastai-family base class does."""
    module = _load(path)
    out = []
    for cdef in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)):
        cls = getattr(module, cdef.name, None)
        if not inspect.isclass(cls):
            continue
        fast_bases = [b for b in cls.__mro__[1:] if (b.__module__ or "").split(".")[0] in FAST]
        own = [b for b in cls.__mro__ if b.__module__ == module.__name__ or b.__module__.startswith("tp3_fastai")]
        for node in ast.walk(cdef):
            if isinstance(node, ast.FunctionDef) and _private(node.name):
                name = node.name
            elif (isinstance(node, ast.Attribute) and _private(node.attr)
                  and ast.unparse(node.value) in ("self", "super()", "cls")):
                name = node.attr
            else:
                continue
            owners = [b for b in fast_bases if name in vars(b)]
            if owners:
                out.append((f"{node.lineno}: {cdef.name}.{name}",
                            f"{owners[0].__module__}.{owners[0].__qualname__}.{name}"))
            elif fast_bases and not any(name in vars(b) or _assigns(b, name) for b in own):
                out.append((f"{node.lineno}: {cdef.name}.{name}", f"(set by fastai at run time?) {name}"))
    return out


def _assigns(cls: type, name: str) -> bool:
    """Whether the package class `cls` assigns `self.<name>` somewhere in its body."""
    try:
        tree = ast.parse(inspect.getsource(cls).lstrip())
    except (OSError, TypeError, IndentationError):
        return False
    return any(isinstance(n, ast.Attribute) and n.attr == name and isinstance(n.ctx, ast.Store)
               for n in ast.walk(tree))


def test_no_module_but_fastai_internals_imports_or_reads_a_private_fastai_name():
    bad = [f"{p.relative_to(PKG.parent)}:{use}" for p in sorted(PKG.rglob("*.py")) if p != INTERNALS
           for use in _direct_uses(p)]
    assert not bad, ("private fastai names used outside tp3_fastai/core/fastai_internals.py (look them up there, "
                     "listed in PRIVATE_NAMES):\n" + "\n".join(bad))
    # the internals module itself reads them through `lookup`, by name
    assert not _direct_uses(INTERNALS)


def test_every_private_fastai_name_a_class_overrides_or_reads_is_listed():
    found = [(f"{p.relative_to(PKG.parent)}:{where}", owner) for p in sorted(PKG.rglob("*.py"))
             for where, owner in _inherited_uses(p)]
    unlisted = [f"{where} -> {owner}" for where, owner in found if owner not in PRIVATE_NAMES]
    assert not unlisted, ("private fastai names overridden or read through inheritance and not listed in "
                          "tp3_fastai/core/fastai_internals.py PRIVATE_NAMES:\n" + "\n".join(unlisted))
    # what is listed is what is used: no stale entries
    read = {d for d in PRIVATE_NAMES if f'lookup("{d}")' in INTERNALS.read_text()}
    assert read | {owner for _, owner in found} == set(PRIVATE_NAMES)


def test_the_checks_see_each_form_of_use(tmp_path):
    """The scans above catch an import, a module attribute read and an override of a fastai private name."""
    probe = tmp_path / "probe_private_use.py"
    probe.write_text("from fastai.vision.augment import _get_sz\nimport fastai.callback.core as fcc\n"
                     "from fastai.data.core import TfmdDL\nx = fcc._inner_loop\n\n"
                     "class Loader(TfmdDL):\n    def _one_pass(self):\n        return super()._one_pass()\n")
    assert [u.split(":")[0] for u in _direct_uses(probe)] == ["1", "4"]
    assert {owner for _, owner in _inherited_uses(probe)} == {"fastai.data.core.TfmdDL._one_pass"}


def test_the_package_reads_private_names_through_the_internals_module():
    from tp3_fastai.data.pipeline import pil
    from tp3_fastai.train import loop

    assert loop.INNER_LOOP_EVENTS is fastai_internals.INNER_LOOP_EVENTS and "after_pred" in loop.INNER_LOOP_EVENTS
    assert pil.get_sz is fastai_internals.get_sz
