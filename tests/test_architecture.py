"""The package's dependencies point one way: a module imports only from lower layers (docs/architecture.md).

Every `import` of every module under codi_jax/ is read from its source (module level and inside
functions, where lazy imports hide circles), so the claim holds for code that tests never run.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Lowest first. A module's layer is that of the longest prefix listed. Within one layer a module may
# import another only from its own package (models.unet -> models.layers); across packages, only downwards.
LAYERS = (
    ("storage", ("codi_jax.storage",)),
    (
        "core",
        (
            "codi_jax.diffusion",
            "codi_jax.sharding",
            "codi_jax.logging_utils",
            "codi_jax.workdir",
            "codi_jax.preemption",
            "codi_jax.hardware",
        ),
    ),
    ("models", ("codi_jax.models",)),
    ("data", ("codi_jax.data",)),
    ("pretrained I/O", ("codi_jax.pretrained",)),
    ("methods", ("codi_jax.methods",)),
    ("samplers", ("codi_jax.sampling",)),
    ("train", ("codi_jax.train",)),
    # The metrics and the evaluation of a model; the evaluation job, diagnose and the report sit higher.
    ("a run's parts", ("codi_jax.build", "codi_jax.runs", "codi_jax.evaluation")),
    (
        "the job and its readers",
        (
            "codi_jax.experiment",
            "codi_jax.sample",
            "codi_jax.to_diffusers",
            "codi_jax.evaluation.job",
            "codi_jax.evaluation.diagnose",
            "codi_jax.evaluation.repro_report",
        ),
    ),
    ("entry points", ("codi_jax.main", "codi_jax.reproduce", "codi_jax.benchmarks")),
)


def _modules():
    out = {}
    for path in sorted((ROOT / "codi_jax").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _layer(name):
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (i, p)
    return best


def _unit(name):
    """What same-layer imports must stay inside: the module's package (a top-level module is its own)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else name


def _imports(name, path):
    """(imported project module, line) for every import statement in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import codi_jax.models.unet.X` -> the module
                target = target.rpartition(".")[0]
            if target and target != name and target.split(".")[0] == "codi_jax":
                found.append((target, node.lineno))
    return found


def _rel(name):
    return MODULES[name].relative_to(ROOT)


def test_every_module_of_the_package_has_a_layer():
    missing = [str(_rel(n)) for n in MODULES if n != "codi_jax" and _layer(n) is None]
    assert not missing, f"modules with no layer in tests/test_architecture.py LAYERS: {missing}"


def test_no_module_imports_from_a_higher_layer_or_across_packages_of_its_own():
    wrong = []
    for name, path in MODULES.items():
        if name == "codi_jax" or _layer(name) is None:
            continue
        mine = _layer(name)[0]
        for target, line in _imports(name, path):
            if target == "codi_jax":
                continue
            theirs = _layer(target)[0]
            if theirs > mine or (theirs == mine and _unit(target) != _unit(name)):
                wrong.append(f"{_rel(name)}:{line} ({LAYERS[mine][0]}) imports {_rel(target)} ({LAYERS[theirs][0]})")
    assert not wrong, "imports that point upward or sideways:\n" + "\n".join(wrong)


def test_the_import_graph_has_no_circle():
    graph = {n: sorted({t for t, _ in _imports(n, p)}) for n, p in MODULES.items()}
    state, stack, circles = {}, [], []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in graph.get(n, ()):
            if state.get(m) == "open":
                circles.append(stack[stack.index(m) :] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in graph:
        if n not in state:
            visit(n)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(str(_rel(n)) for n in c) for c in circles)
