"""Imports point one way: no cycle between the modules of `lora/` (counting imports inside
functions too: a deferred import hides a cycle, it does not remove it), and the helpers
`quant/` shares with `lora/` import nothing from `lora/` or `loralab_kernels/`."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    """"layer" for lora/layer.py, "files" for lora/files/__init__.py, "files.checks" for lora/files/checks.py."""
    parts = path.relative_to(ROOT / "lora").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_main_block(node: ast.AST) -> bool:
    """`if __name__ == "__main__":`: runs only when the file is executed as a script."""
    return isinstance(node, ast.If) and isinstance(node.test, ast.Compare) \
        and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"


def _import_nodes(tree: ast.Module, deferred: bool):
    """Import statements at module level, and with `deferred` also inside functions; never
    inside a `__main__` block."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if _is_main_block(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif deferred or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            todo.extend(ast.iter_child_nodes(node))


def _imported_lora_modules(path: Path, known: set[str], deferred: bool = True) -> set[str]:
    """The `lora` modules (named as by `_module_name`) that `path` imports."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path)), deferred):
        if isinstance(node, ast.Import):
            out.update(a.name[len("lora."):] for a in node.names if a.name.startswith("lora."))
            continue
        if node.level == 0:
            if node.module != "lora" and not (node.module or "").startswith("lora."):
                continue
            base = node.module[len("lora."):] if node.module != "lora" else ""
        else:
            up = package.split(".") if package else []
            up = up[:len(up) - (node.level - 1)]
            base = ".".join(up + ([node.module] if node.module else []))
        for alias in node.names:  # `from . import x` names module x; `from .x import y` names x
            sub = f"{base}.{alias.name}" if base else alias.name
            out.add(sub if sub in known else base)
    return {m for m in out if m in known and m != name}


def _graph(deferred: bool = True) -> dict[str, set[str]]:
    """{module: lora modules it imports} over every module of lora/ and its subpackages."""
    paths = {_module_name(p): p for p in (ROOT / "lora").rglob("*.py") if _module_name(p)}
    return {name: _imported_lora_modules(path, set(paths), deferred) for name, path in paths.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a path [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_finds_cycles():
    """The checker itself: it must report a planted cycle (else the real test could not fail)."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


# Deferred imports (inside a function) that would close a cycle: none are allowed. (The
# per-row path of the layers lives in lora/row_batch.py, which imports nothing from lora;
# init_loftq_on_quantized finds QLoRALinear layers by their 4-bit base.)
DEFERRED_CYCLE_EXCEPTIONS: set[tuple[str, str]] = set()


def test_no_import_cycle_in_lora():
    graph = _graph()
    assert {"layer", "dora", "variants", "inject", "qlora", "registry", "conv", "mha"} <= set(graph)  # read
    assert graph["registry"] == {"layer"} and "inject" in graph.get("files", {"inject"})  # edges were read
    assert "layer" not in graph["dora"] and "layer" not in graph["variants"]
    assert "inject" not in graph["qlora"] and "qlora" not in graph["inject"]
    module_level = _graph(deferred=False)
    for a, b in DEFERRED_CYCLE_EXCEPTIONS:
        assert b not in module_level.get(a, set()), f"{a} -> {b} is now a module-level import"
    strict = {a: {b for b in deps if (a, b) not in DEFERRED_CYCLE_EXCEPTIONS} for a, deps in graph.items()}
    cycle = _find_cycle(strict)
    assert cycle is None, f"import cycle in lora/: {' -> '.join(cycle)}"


def test_no_import_time_cycle_in_lora():
    """Module-level imports only (what runs at `import lora`), every module included."""
    cycle = _find_cycle(_graph(deferred=False))
    assert cycle is None, f"import-time cycle in lora/: {' -> '.join(cycle)}"


def test_quant_helpers_import_nothing_above_quant():
    """`quant.module_paths` (matcher, setter) is used by lora/ and by quantize_model; it must
    load without lora/ or loralab_kernels/ (layering quant <- loralab_kernels <- lora)."""
    code = ("import sys; import quant.module_paths, quant.linear; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lora', 'loralab_kernels')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
