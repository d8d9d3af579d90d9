"""The layout is the architecture: imports point one way, no module imports the CLI, no circles,
no module past ~400 lines."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "reuse_exp"
# Each layer may import only the layers after it. settings.py is a declaration the layers
# above the engine share; tiny/ is data plus scripts over the engine and the evaluation.
ORDER = ["cli", "study", "tracking", "evaluation", "settings", "engine"]
ALLOWED_EXTRA = {"cli": {"tiny"}, "evaluation": {"tiny"}, "tiny": {"engine", "evaluation"}}
MAX_LINES = 400


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "reuse_exp"


def imports() -> dict[str, set[str]]:
    """module -> the reuse_exp modules it imports (relative imports resolved)."""
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = name if rel.name == "__init__" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("reuse_exp"):
                    found.add(target)
                    found.update(f"{target}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("reuse_exp"))
        out[name] = {m for m in found if m != name}
    return out


def module_names() -> set[str]:
    return set(imports())


def violations(graph: dict[str, set[str]]) -> list[str]:
    known = set(graph)
    bad = []
    for mod, targets in graph.items():
        src = layer_of(mod)
        for t in targets:
            t = t if t in known else t.rsplit(".", 1)[0]   # `from pkg import name` of a non-module
            if t not in known or t == mod:
                continue
            dst = layer_of(t)
            if dst == src or dst == "reuse_exp":
                continue
            if dst == "cli":
                bad.append(f"{mod} imports the CLI ({t})")
            elif dst in ALLOWED_EXTRA.get(src, ()):
                continue
            elif src in ORDER and dst in ORDER and ORDER.index(dst) > ORDER.index(src):
                continue
            else:
                bad.append(f"{mod} ({src}) imports {t} ({dst}): against cli -> study -> tracking -> evaluation -> engine")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    known = set(graph)
    edges = {m: {t if t in known else t.rsplit(".", 1)[0] for t in ts} & known for m, ts in graph.items()}
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                found.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


def test_imports_point_one_way():
    assert violations(imports()) == []


def test_a_wrong_way_import_is_caught():
    graph = imports()
    graph["reuse_exp.engine.decoding"] = graph["reuse_exp.engine.decoding"] | {"reuse_exp.tracking.run"}
    graph["reuse_exp.study.grid"] = graph["reuse_exp.study.grid"] | {"reuse_exp.cli"}
    assert violations(graph) == [
        "reuse_exp.engine.decoding (engine) imports reuse_exp.tracking.run (tracking): "
        "against cli -> study -> tracking -> evaluation -> engine",
        "reuse_exp.study.grid imports the CLI (reuse_exp.cli)"]


def test_no_import_circles():
    assert cycles(imports()) == []
    graph = imports()
    graph["reuse_exp.study.store"] = graph["reuse_exp.study.store"] | {"reuse_exp.study.grid"}
    assert cycles(graph), "a circle the test should have seen"


def test_no_module_past_400_lines():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_ls_shows_the_architecture():
    top = sorted(p.name for p in PKG.iterdir() if not p.name.startswith(("_", ".")) and p.name != "__pycache__")
    assert top == ["cli.py", "engine", "evaluation", "settings.py", "study", "tiny", "tracking"]
