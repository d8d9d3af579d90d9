"""The layout is the architecture: imports point one way, no module imports the CLI, no circles,
no module past ~400 lines, click only in the CLI, the package's errors in one module."""
import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "reuse_exp"
# Tiers, top to bottom: a layer imports only layers of the tiers below its own, so two layers
# of one tier never import each other (the evaluation and tiny/: the lm-eval model never reads
# the bundled model's training code, nor tiny/ the evaluation). No exceptions.
TIERS = [("cli",), ("study",), ("runner",), ("tracking",), ("evaluation", "tiny"), ("settings",), ("engine",),
         ("knobs",), ("errors", "reuse_exp")]
ARROWS = " -> ".join("|".join(t) for t in TIERS)
MAX_LINES = 400


def tier(layer: str) -> int | None:
    return next((i for i, t in enumerate(TIERS) if layer in t), None)


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
            if dst == src:
                continue
            if dst == "cli":
                bad.append(f"{mod} imports the CLI ({t})")
            elif tier(src) is None or tier(dst) is None or tier(dst) <= tier(src):
                bad.append(f"{mod} ({src}) imports {t} ({dst}): against {ARROWS}")
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
    graph["reuse_exp.engine.decoding"] = graph["reuse_exp.engine.decoding"] | {"reuse_exp.tracking.lifecycle"}
    graph["reuse_exp.study.grid"] = graph["reuse_exp.study.grid"] | {"reuse_exp.cli"}
    graph["reuse_exp.evaluation.models"] = graph["reuse_exp.evaluation.models"] | {"reuse_exp.tiny"}
    graph["reuse_exp.tiny.data"] = graph["reuse_exp.tiny.data"] | {"reuse_exp.evaluation.lm"}
    assert violations(graph) == [
        f"reuse_exp.engine.decoding (engine) imports reuse_exp.tracking.lifecycle (tracking): against {ARROWS}",
        f"reuse_exp.evaluation.models (evaluation) imports reuse_exp.tiny (tiny): against {ARROWS}",
        "reuse_exp.study.grid imports the CLI (reuse_exp.cli)",
        f"reuse_exp.tiny.data (tiny) imports reuse_exp.evaluation.lm (evaluation): against {ARROWS}"]


def test_every_layer_has_a_tier():
    assert {layer_of(m) for m in module_names()} <= {layer for t in TIERS for layer in t}


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
    assert top == ["cli", "engine", "errors.py", "evaluation", "knobs.py", "runner", "settings.py", "study", "tiny",
                   "tracking"]


def imported_top_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_no_module_parses_its_own_arguments():
    """One click group is the command line: no argparse entry points beside it."""
    users = {str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if "argparse" in imported_top_modules(p)}
    assert users == set()


def test_click_lives_only_in_the_cli():
    users = {str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if "click" in imported_top_modules(p)}
    assert users and all(u.startswith("cli/") for u in users), users


def test_errors_are_declared_in_errors_py():
    """A class deriving from an exception is declared in errors.py, nowhere else."""
    import builtins
    exceptions = {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}
    found = []
    for path in PKG.rglob("*.py"):
        if path.name == "errors.py" and path.parent == PKG:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                if bases & exceptions or any(b.endswith(("Error", "Exception")) for b in bases):
                    found.append(f"{path.relative_to(PKG)}: {node.name}")
    assert found == []


DOCS = PKG.parent / "docs"


def unnamed_modules(modules: list[str] | None = None) -> list[str]:
    """Modules the docs do not name: every engine module in docs/engine.md (its path under
    engine/, backquoted), every other one in docs/architecture.md (its file name, backquoted,
    with or without folders before it)."""
    engine, architecture = (DOCS / "engine.md").read_text(), (DOCS / "architecture.md").read_text()
    modules = modules if modules is not None else sorted(p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py"))
    missing = []
    for rel in modules:
        if rel.startswith("engine/"):
            if f"`{rel[len('engine/'):]}`" not in engine:
                missing.append(f"docs/engine.md: {rel}")
        elif not re.search(rf"`([\w/]+/)?{re.escape(rel.rsplit('/', 1)[-1])}`", architecture):
            missing.append(f"docs/architecture.md: {rel}")
    return missing


def test_the_docs_name_every_module():
    assert unnamed_modules() == []
    assert unnamed_modules(["study/unheard_of.py", "engine/policies/unheard_of.py", "engine/fast.py"]) == [
        "docs/architecture.md: study/unheard_of.py", "docs/engine.md: engine/policies/unheard_of.py"]


def test_the_slowest_first_order_names_test_files_that_exist():
    """conftest.py's SLOWEST_FIRST schedules whole files: a renamed file would silently drop to the end."""
    from conftest import SLOWEST_FIRST
    tests = Path(__file__).parent
    assert [n for n in SLOWEST_FIRST if not (tests / n).is_file()] == []
    assert len(set(SLOWEST_FIRST)) == len(SLOWEST_FIRST)
