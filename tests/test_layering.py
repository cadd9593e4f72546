"""The layering of DESIGN.md, read from the code's imports.

* The algorithm and data packages import without Ray, DeepSpeed or MLflow (STYLE.md habit 1): checked
  by importing them in a process where those cannot be imported.
* Who may import whom (`LAYERS`), and no import circle anywhere: checked on the source with `ast`,
  every import statement counted (top of file or inside a function), each failure naming the
  importing file and line and the module it imports.
"""

import ast
import subprocess
import sys
from pathlib import Path

BLOCK = "import sys\nfor m in ('ray', 'mlflow', 'deepspeed'):\n    sys.modules[m] = None  # makes `import m` fail\n"

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "actors", "learners", "cluster")
"""the project's top-level packages (pyproject.toml)"""

CORE = ("pipeline.flowmap", "pipeline.data")
SUPPORT = ("pipeline.config", "pipeline.guard", "pipeline.metrics", "pipeline.weightsync")
STEPS = ("pipeline.steps",)
LAYERS = {
    CORE: CORE,
    SUPPORT: CORE + SUPPORT,
    STEPS: CORE + SUPPORT + STEPS,
    ("actors",): CORE + SUPPORT + STEPS + ("actors",),
    ("learners",): CORE + SUPPORT + STEPS + ("learners",),
}
"""modules under one of the key's prefixes -> the project modules they may import (prefixes); the Ray
roles (actors/, learners/) never import each other, the reference loop or the orchestration
(pipeline.reference, .distributed, .onpolicy, .stages): they meet through refs and steps.Trajectory.
Modules under no key (the orchestration, run, evaluation) may import any project module."""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120)


def test_flowmap_and_data_import_without_ray_mlflow_deepspeed():
    mods = ["pipeline.flowmap." + m for m in ("schedule", "models", "losses", "simulate", "oracle", "draws", "optim",
                                              "lora", "far")]
    mods += ["pipeline.data.schema", "pipeline.data.rows", "pipeline.data.toy", "pipeline.data.video", "pipeline.evaluate", "pipeline.reference",
             "pipeline.config",
             "pipeline.steps", "pipeline.guard", "pipeline.metrics", "pipeline.weightsync"]
    # LoRA's peft and accelerate are imported when adapters are added and merged: that must not pull them in
    lora_use = ("from pipeline.flowmap import lora, models\n"
                "net = models.student_from_teacher(models.build_teacher('tiny', seed=0))\n"
                "init = lora.init_generator(0, 'stage2', 'student')\n"
                "lora.merged(lora.add_adapters(net, lora.LoraSettings(2, 2.0), init))\n")
    proc = _run("import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in mods) + lora_use
                + "print('ok')")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_the_block_really_blocks():
    proc = _run("import ray")
    assert proc.returncode != 0 and "import of ray halted" in proc.stderr


# ----------------------------------------------------------------------------- imports read with ast


def project_sources(root: Path = ROOT) -> dict[str, tuple[str, str, bool]]:
    """module name -> (path relative to the root, source, is a package's __init__)"""
    out = {}
    for top in PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            package = parts[-1] == "__init__"
            out[".".join(parts[:-1] if package else parts)] = (str(path.relative_to(root)), path.read_text(), package)
    return out


def import_graph(sources: dict[str, tuple[str, str, bool]]) -> dict[str, list[tuple[str, int]]]:
    """module -> [(project module it imports, line)], from every import statement in its source.
    `from a import b` imports a.b if that is a module, else a; relative imports are resolved."""
    known = set(sources)

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, (_, source, package) in sources.items():
        here = module if package else module.rpartition(".")[0]
        edges = []
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[:len(here.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
            else:
                continue
            edges += [(t, node.lineno) for t in dict.fromkeys(map(resolve, targets)) if t not in (None, module)]
        graph[module] = edges
    return graph


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer_violations(sources, graph) -> list[str]:
    """One line per import that `LAYERS` forbids: file:line, importer, imported module."""
    out = []
    for module, edges in graph.items():
        for layer, allowed in LAYERS.items():
            if not _under(module, layer):
                continue
            for target, line in edges:
                if target != "pipeline" and not _under(target, allowed):
                    out.append(f"{sources[module][0]}:{line}: {module} imports {target} "
                               f"({'/'.join(layer)} may import only {', '.join(allowed)})")
    return out


def import_cycles(sources, graph) -> list[str]:
    """One line per import circle (strongly connected set of modules), with the imports that close it.
    Importing a.b.c also runs a/__init__ and a/b/__init__: those count, except the importer's own
    packages (a package's __init__ importing its own modules is the ordinary re-export, not a circle)."""
    edges = {}
    for module, out in graph.items():
        mine = {module.rsplit(".", n)[0] for n in range(1, module.count(".") + 1)}
        edges[module] = {}
        for target, line in out:
            parents = [target.rsplit(".", n)[0] for n in range(target.count(".") + 1)]
            for t in parents:
                if t not in mine and t in graph and t != module:
                    edges[module].setdefault(t, line)
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return ["circle: " + "; ".join(f"{sources[a][0]}:{line} {a} imports {b}" for a in group
                                   for b, line in edges[a].items() if b in group) for group in found]


def test_each_layer_imports_only_what_it_may():
    sources = project_sources()
    assert {"pipeline.steps", "actors.rollout", "learners.onpolicy"} <= set(sources)  # the walk found the code
    problems = layer_violations(sources, import_graph(sources))
    assert not problems, "\n".join(problems)


def test_no_import_circle_between_modules():
    sources = project_sources()
    problems = import_cycles(sources, import_graph(sources))
    assert not problems, "\n".join(problems)


def test_the_import_checks_catch_what_they_forbid():
    """A planted role-to-role import, a role importing the reference, and a circle are each reported by
    file, line and module; relative imports and a package re-exporting its modules are read right."""
    src = {
        "pipeline": ("pipeline/__init__.py", "", True),
        "pipeline.reference": ("pipeline/reference.py", "from pipeline import steps\n", False),
        "pipeline.steps": ("pipeline/steps.py", "from .flowmap import draws\n", False),
        "pipeline.flowmap": ("pipeline/flowmap/__init__.py", "from pipeline.flowmap.draws import x\n", True),
        "pipeline.flowmap.draws": ("pipeline/flowmap/draws.py", "from pipeline.flowmap import schedule\n", False),
        "pipeline.flowmap.schedule": ("pipeline/flowmap/schedule.py", "", False),
        "pipeline.a": ("pipeline/a.py", "import os\n\ndef f():\n    from pipeline import b\n", False),
        "pipeline.b": ("pipeline/b.py", "import pipeline.a\n", False),
        "actors": ("actors/__init__.py", "", True),
        "actors.rollout": ("actors/rollout.py", "from pipeline import steps\nfrom learners.session import S\n", False),
        "learners": ("learners/__init__.py", "", True),
        "learners.session": ("learners/session.py", "import torch\nfrom pipeline.reference import rollout\n", False),
    }
    graph = import_graph(src)
    assert graph["pipeline.steps"] == [("pipeline.flowmap.draws", 1)]
    assert layer_violations(src, graph) == [
        "actors/rollout.py:2: actors.rollout imports learners.session (actors may import only "
        "pipeline.flowmap, pipeline.data, pipeline.config, pipeline.guard, pipeline.metrics, pipeline.weightsync, pipeline.steps, actors)",
        "learners/session.py:2: learners.session imports pipeline.reference (learners may import only "
        "pipeline.flowmap, pipeline.data, pipeline.config, pipeline.guard, pipeline.metrics, pipeline.weightsync, pipeline.steps, "
        "learners)"]
    assert import_cycles(src, graph) == [
        "circle: pipeline/a.py:4 pipeline.a imports pipeline.b; pipeline/b.py:1 pipeline.b imports pipeline.a"]
