"""The package's import graph only points down the layers of docs/architecture.md: a model never imports how
it is trained, evaluated or invoked. Checked on the source with ``ast``, so imports inside functions count too."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "omniar"
BASE = {"_checks", "_native", "_pretrained", "_scales", "limits", "pixels", "assets"}  # layer 0, one unit: may import each other
# part of omniar -> layer; imports may only go to a lower layer or stay inside the part
LAYERS = {"base": 0,
          "data": 1, "backbone": 1, "tokenizers": 1,
          "generation": 2, "eval": 2,
          "train": 3,
          "uda": 4,
          "commands": 5, "cli": 5}


def part_of(module: str) -> str:
    """``omniar.train.ar`` -> ``train``, ``omniar._checks`` -> ``base``; ``omniar`` itself -> ``""``."""
    parts = module.split(".")
    part = parts[1] if len(parts) > 1 else ""
    return "base" if part in BASE else part


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``path`` (a file under ``root``/omniar) that names an omniar
    module."""
    relative = path.relative_to(root).with_suffix("")
    package = relative.parts[:-1] if relative.name != "__init__" else relative.parts
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "omniar"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ((node.module,) if node.module else ()))
            else:
                base = node.module or ""
            if base.split(".")[0] != "omniar":
                continue
            if base == "omniar":  # from omniar import assets / from .. import assets
                found += [(node.lineno, f"omniar.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
    return found


def upward_imports(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    source = part_of(".".join(path.relative_to(root).with_suffix("").parts))
    problems = []
    for line, module in imported_modules(path, root):
        target = part_of(module)
        if target in ("", "__version__", source):
            continue
        if LAYERS[target] >= LAYERS[source]:
            problems.append(f"{path.relative_to(root)}:{line} imports {module} "
                            f"({source}: layer {LAYERS[source]}, {target}: layer {LAYERS[target]})")
    return problems


def test_every_module_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert parts == set(LAYERS) - {"base"} | BASE


def test_imports_only_go_down_the_layers():
    assert [problem for path in sorted(PACKAGE.rglob("*.py")) for problem in upward_imports(path)] == []


@pytest.mark.parametrize("source, target", [("omniar/tokenizers/video.py", "omniar.train.engine"),
                                            ("omniar/data/shapes.py", "omniar.commands.demo"),
                                            ("omniar/eval/metrics.py", "omniar.generation")])
def test_an_upward_import_is_found(tmp_path, source, target):
    # a copy of the module with one more import, relative and inside a function: ``from ..train.engine import x``
    copy = tmp_path / source
    copy.parent.mkdir(parents=True)
    extra = f"\n\ndef later():\n    from {'.' * source.count('/')}{target.split('.', 1)[1]} import x\n"
    copy.write_text((PACKAGE.parent / source).read_text(encoding="utf-8") + extra)
    assert upward_imports(PACKAGE.parent / source) == []
    assert any(f"imports {target} " in problem for problem in upward_imports(copy, tmp_path))
