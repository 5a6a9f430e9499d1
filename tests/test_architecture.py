"""The package layout: psm's modules import each other without a cycle.

A cycle makes import order matter (a half-initialised module is seen by the other
side), so the merge engine and the trainer are kept one-way; see psm/merge/__init__.py
and psm/training/__init__.py for the intended direction.
"""

import ast
import pathlib

import pytest

PSM = pathlib.Path(__file__).resolve().parents[1] / "psm"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PSM.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in PSM.rglob("*.py")}


def module_level_imports(path: pathlib.Path, known: set[str]) -> set[str]:
    """psm modules imported by module-level code, `if __name__ == "__main__":` blocks
    included (imports inside functions and classes run later; they are not edges here)."""
    out = set()
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    top = [n for stmt in ast.parse(path.read_text()).body
           if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
           for n in ast.walk(stmt)]
    for node in top:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in known else base)
    # Importing a.b.c first runs a/__init__ and a/b/__init__; the module's own enclosing
    # packages are already being imported when it runs, so they are not edges.
    parents = {".".join(m.split(".")[:i]) for m in out for i in range(1, m.count(".") + 1)}
    own = {".".join(this.split(".")[:i]) for i in range(1, this.count(".") + 1)}
    return {m for m in (out | parents) - own if m in known and m != this}


def import_graph() -> dict[str, set[str]]:
    mods = all_modules()
    return {name: module_level_imports(path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_psm_has_no_import_cycle():
    graph = import_graph()
    assert "psm.merge.methods" in graph["psm.merge"]  # the graph sees package imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.parametrize("package", ["psm.merge", "psm.training"])
def test_nothing_imports_a_command(package):
    """`python -m psm.merge` runs psm/merge/__main__.py; an import of it from the library
    side would run the command's module twice (once as __main__)."""
    graph = import_graph()
    users = sorted(n for n, deps in graph.items() if "psm.merge.__main__" in deps)
    assert users == [], users
    assert "psm.merge.streaming" not in graph["psm.merge"]


def test_old_flat_modules_are_gone():
    """The merge engine and the trainer live in their packages only (no stale copies)."""
    flat = {p.stem for p in PSM.glob("*.py")}
    for gone in ["merge", "merge_cli", "merge_stream", "_merge_tree", "_merge_kernels",
                 "_merge_trim", "_merge_stage", "trainer", "replicas", "sharding",
                 "checkpoint", "workdir", "metrics"]:
        assert gone not in flat, f"psm/{gone}.py is back beside its package"
