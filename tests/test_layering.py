"""The package's imports run down the layers, and no two files import each other in a circle.

Every `import` in dpaf_ray/ counts, at module level or inside a function (a function-local import
is still an arrow: it only hides it). Only imports under `if TYPE_CHECKING:` are exempt: they
name a type for an annotation and never run. The layers, lowest first (a module may import its
own layer and the layers below it):

    ground       config, collectives, devices, pictures, run_dir (the operator's private folders and files)
    privacy      privacy/
    data         data/
    models       models/
    training     training/
    release      release.py, ray_resources.py, ray_train.py (the release; the Ray glue over training)
    run          run.py (one training run, in-process or over Ray Train)
    search       tuning/, audit/ (searches and audits made of runs)
    benchmark    evaluation/ (after the fact, on the real test split: nothing below may import it)
    entry        api.py, cli.py, __main__.py, the package's __init__.py
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "dpaf_ray"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

LAYERS: list[tuple[str, set[str]]] = [
    ("ground", {"config", "collectives", "devices", "pictures", "run_dir"}),
    ("privacy", {"privacy"}),
    ("data", {"data"}),
    ("models", {"models"}),
    ("training", {"training"}),
    ("release", {"release", "ray_resources", "ray_train", "auth_token"}),
    ("run", {"run"}),
    ("search", {"tuning", "audit"}),
    ("benchmark", {"evaluation"}),
    ("entry", {"api", "cli", "__main__", ""}),
]


def module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(node: ast.AST):
    """Every Import / ImportFrom under `node`, at any depth, except those under `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:  # the `else:` branch runs
                if isinstance(other, (ast.Import, ast.ImportFrom)):
                    yield other
                yield from _runtime_imports(other)
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        yield from _runtime_imports(child)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported dpaf_ray module, line) for each runtime import in the file; `from X import y`
    counts as importing X.y where X.y is a module of the package, else X."""
    is_package = path.name == "__init__.py"
    out = []
    for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        out += [(t, node.lineno) for t in targets if t == PACKAGE or t.startswith(PACKAGE + ".")]
    return out


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, (_, members) in enumerate(LAYERS):
        if top in members:
            return i
    raise AssertionError(f"{module} is in no layer: add {top!r} to LAYERS in {Path(__file__).name}")


def import_graph() -> dict[str, list[tuple[str, int]]]:
    modules = all_modules()
    return {name: [(t, line) for t, line in imports_of(name, path, modules) if t != name]
            for name, path in modules.items()}


def test_every_module_has_a_layer():
    for name in all_modules():
        layer_of(name)


def test_no_import_runs_back_up_the_layers():
    upward = sorted({f"{name} (line {line}, layer {LAYERS[layer_of(name)][0]}) imports {target} "
                     f"(layer {LAYERS[layer_of(target)][0]})"
                     for name, targets in import_graph().items() for target, line in targets
                     if layer_of(target) > layer_of(name)})
    assert not upward, "imports that run back up the layers:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """One circle of imports between files, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in graph:
        if state.get(start):
            continue
        path, stack = [start], [iter(graph[start])]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt) and nxt in graph:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(graph[nxt]))
    return None


def test_no_circle_of_imports_between_files():
    graph = {name: sorted({t for t, _ in targets}) for name, targets in import_graph().items()}
    cycle = find_cycle(graph)
    assert cycle is None, "a circle of imports: " + " -> ".join(cycle)


@pytest.mark.parametrize("source, upward", [
    ("from ..training.loop import train_loop\n", True),
    ("def f():\n    from ..tuning import tuner\n", True),  # function-local: still an arrow
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..training.gan import GANTrainerBase\n", False),
    ("from ..config import ConfigError\n", False),
])
def test_the_check_sees_module_level_and_function_local_imports_and_exempts_type_checking(tmp_path, source, upward):
    fake = ROOT / "privacy" / "mechanisms.py"  # parsed as if it were this file, never written
    tmp = tmp_path / "mechanisms.py"
    tmp.write_text(source)
    modules = all_modules()
    found = [t for t, _ in imports_of(module_name(fake), tmp, modules) if layer_of(t) > layer_of(module_name(fake))]
    assert bool(found) is upward


def test_the_circle_search_finds_a_circle():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": ["c"], "c": []}) is None
