"""Dependencies point down (README "Layout"): read from the source with `ast`, no imports run.

    model, data        import nothing of train, evaluation, checkpoint, planning or distributed
    evaluation         imports nothing of train
    checkpoint         imports nothing of train or evaluation
    train/trainer.py   imports nothing of planning (the planner is a tool beside the trainer)
    torch.distributed  imported only inside pipeline/distributed/ (ALLOWED_DIST lists the exceptions)
    no import circle   among pipeline modules' top-level imports
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

PIPELINE = REPO_ROOT / "pipeline"

# Modules outside pipeline/distributed/ that may import torch.distributed, each with its reason.
# (pipeline/cli.py reads sys.modules["torch.distributed"] without importing it: not an import.)
ALLOWED_DIST: dict[str, str] = {}

FORBIDDEN = {
    "pipeline.model": ("pipeline.train", "pipeline.evaluation", "pipeline.checkpoint", "pipeline.planning",
                       "pipeline.distributed"),
    "pipeline.data": ("pipeline.train", "pipeline.evaluation", "pipeline.checkpoint", "pipeline.planning"),
    "pipeline.evaluation": ("pipeline.train",),
    "pipeline.checkpoint": ("pipeline.train", "pipeline.evaluation"),
    "pipeline.train.trainer": ("pipeline.planning",),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool = False) -> list[str]:
    """Absolute names imported by `path` (every `import` statement, also inside functions, unless
    `top_level_only`: then only those that run when the module is imported)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # statements under a module-level if/try run at import too
        nodes = [n for top in tree.body for n in ast.walk(top)
                 if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]
    return out


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PIPELINE.rglob("*.py"))}


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_layers_point_down():
    bad = []
    for name, path in modules().items():
        for layer, forbidden in FORBIDDEN.items():
            if within(name, layer):
                bad += [f"{name} imports {imp}" for imp in imports(path)
                        if any(within(imp, f) for f in forbidden)]
    assert not bad, "\n".join(sorted(set(bad)))


def test_only_the_distributed_package_imports_torch_distributed():
    bad = [f"{name} imports {imp}" for name, path in modules().items()
           if not within(name, "pipeline.distributed") and name not in ALLOWED_DIST
           for imp in imports(path) if within(imp, "torch.distributed")]
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    mods = modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for imp in imports(path, top_level_only=True):
            # `from pipeline.x import y`: y may be a module or a name in pipeline.x
            target = imp if imp in mods else imp.rsplit(".", 1)[0] if imp.rsplit(".", 1)[0] in mods else None
            if target and target != name:
                deps.add(target)
        graph[name] = deps
    done, stack, cycles = set(), [], []

    def visit(node: str) -> None:
        if node in stack:
            cycles.append(" -> ".join(stack[stack.index(node):] + [node]))
            return
        if node in done:
            return
        stack.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    # A package's __init__ importing its own submodules is not a circle of design.
    real = [c for c in cycles if not all(within(m, c.split(" -> ")[0]) or within(c.split(" -> ")[0], m)
                                         for m in c.split(" -> "))]
    assert not real, "\n".join(real)


def test_the_checks_see_a_violation(tmp_path):
    """The walker finds imports inside functions and `from` imports (the checks above cannot pass vacuously)."""
    probe = tmp_path / "probe.py"
    probe.write_text("import torch.distributed as dist\n\ndef f():\n    from pipeline.train import trainer\n")
    assert {"torch.distributed", "pipeline.train", "pipeline.train.trainer"} <= set(imports(probe))
    assert imports(probe, top_level_only=True) == ["torch.distributed"]
