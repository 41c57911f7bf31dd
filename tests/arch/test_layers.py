"""The layer order of docs/architecture.md as a test: every import in the package points down (or sideways
within a layer), module-level and function-level imports alike."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "duomo"

# Higher layers may import lower ones; a layer may import itself. Keep in step with docs/architecture.md.
LAYERS: dict[str, int] = {
    "errors": 0,
    "limits": 0,
    "version": 0,
    "nn": 1,
    "models": 2,
    "data": 3,
    "io": 3,
    "train": 4,
    "tasks": 5,
    "api": 6,
    "index": 7,
    "serve": 8,
    "cli": 9,
    "__main__": 10,
    "__init__": 10,
}


def layer_of(module: str) -> str:
    """The top-level part of a duomo module name ("duomo.models.clip.vit" -> "models")."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    """duomo/models/clip/vit.py -> duomo.models.clip.vit"""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] if len(parts) > 1 else parts
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute duomo module) of every import in a file, wherever it sits in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("duomo")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "duomo":  # `from duomo import x`: x is a top-level module
                found += [(node.lineno, f"duomo.{a.name}") for a in node.names]
            elif target.startswith("duomo"):
                found.append((node.lineno, target))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            found.append((node.lineno, "<dynamic __import__>"))
    return found


def violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = layer_of(module_name(path))
        if path.name == "__init__.py" and path.parent == PACKAGE:
            src = "__init__"
        if src not in LAYERS:
            bad.append(f"{path}: top-level module {src!r} has no layer; add it to LAYERS and the docs")
            continue
        for line, target in imports_of(path):
            if target.startswith("<"):
                bad.append(f"{path}:{line}: {target} hides an import from this check")
                continue
            dst = layer_of(target)
            if dst not in LAYERS:
                bad.append(f"{path}:{line}: imports {target}, which has no layer")
            elif LAYERS[dst] > LAYERS[src]:
                where = f"{src} (layer {LAYERS[src]}) imports {target} ({dst}, layer {LAYERS[dst]})"
                bad.append(f"{path}:{line}: {where}")
    return bad


def test_imports_point_down_the_layers() -> None:
    bad = violations()
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def family_imports() -> list[str]:
    """A family's task code never imports another family's task code (models may be shared as parts)."""
    bad = []
    tasks = PACKAGE / "tasks"
    families = [p.name for p in tasks.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    for fam in families:
        for path in (tasks / fam).rglob("*.py"):
            for line, target in imports_of(path):
                for other in families:
                    if other != fam and target.startswith(f"duomo.tasks.{other}"):
                        bad.append(f"{path}:{line}: {fam} task code imports {target}")
    return bad


def test_families_do_not_import_each_others_tasks() -> None:
    bad = family_imports()
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_every_layer_is_documented(layer: str) -> None:
    if layer in ("__main__", "__init__", "limits", "version"):
        pytest.skip("entry points / shared bounds are not layers of the diagram")
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    assert f"{layer}/" in doc or f"{layer}.py" in doc
