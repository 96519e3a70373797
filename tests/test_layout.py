"""The shape of the code: no two of the project's modules import each other (directly or in a
longer circle), and no package imports one above it (the live view and the search sit on the
atlas and the harness, never the other way round)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"deepvis_repro": ROOT / "deepvis_repro", "deepvis_repro_backends": ROOT / "backends"}
#: higher number = higher layer; a module may import its own layer and those below
LAYERS = {"deepvis_repro": 0, "deepvis_repro_backends": 1, "deepvis_repro.reproduce": 1, "deepvis_repro.atlas": 1,
          "deepvis_repro.search": 2, "deepvis_repro.live": 2}
TOP = {"deepvis_repro.cli", "deepvis_repro"}  # the commands and the package's API sit above everything


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in mods and t != name}
        edges[name] = found
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def layer(name: str) -> int:
    while name not in LAYERS:
        name = name.rsplit(".", 1)[0]
    return LAYERS[name]


def test_no_import_circles():
    assert circles(imports(modules())) == []


def test_no_package_imports_one_above_it():
    upward = [f"{a} -> {b}" for a, targets in imports(modules()).items() if a not in TOP
              for b in targets if b not in TOP and layer(b) > layer(a)]
    assert upward == []


def test_the_checker_sees_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def late_imports(mods: dict[str, Path]) -> list[str]:
    """Imports of the project's own modules inside functions, without a reason on the line or the
    line above it (a comment): a reader sees a module's dependencies at its top."""
    out = []
    for name, path in mods.items():
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    own = node.level > 0 or (node.module or "").startswith(tuple(PACKAGES))
                elif isinstance(node, ast.Import):
                    own = any(a.name.startswith(tuple(PACKAGES)) for a in node.names)
                else:
                    continue
                said = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                if own and not said:
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return sorted(set(out))


def test_the_projects_own_imports_are_at_the_top():
    assert late_imports(modules()) == []
