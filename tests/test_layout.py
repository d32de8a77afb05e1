"""The package's floors, read from its import graph (AST, no import executed).

A module imports only modules of lower floors or earlier ones of its own floor (``FLOORS`` lists them in
order), so there is no import circle; no module imports another's ``_private`` name; our own modules are
imported inside a function only by the CLI (start-up time); every module is placed on a floor; the public
faces (``decomp_jax``, ``decomp_jax.named``, ``decomp_jax.nnx``, ``decomp_jax.sharding``) are imported by no library module;
the aliases of moved paths are exactly ``moved.MOVED``'s. And no module over ``MAX_MODULE_LINES`` lines,
no function over ``MAX_FUNCTION_LINES``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "decomp_jax"

FLOORS = [
    # 0: the version, errors, atomic I/O, quantized arrays
    ["version", "errors", "guards", "quant"],
    # 1: our Flax models and their loading; datasets
    ["models.names", "models.families", "models.attention", "models.llama_config", "models.rope", "models.tiles", "models.mlp", "models.llama", "models.generation",
     "models.bert", "models.gpt2", "models.hf",
     "models.convert", "models.causal_lm", "models",
     "data.glue", "data.lm", "data.packing", "data.commonsense", "data.math", "data"],
    # 2: the adapter core
    ["core.tree", "core.axes", "core.methods.base", "core.methods.lowrank", "core.methods.spectral", "core.methods.dora",
     "core.methods.scaling", "core.methods.adapters", "core.methods.adalora", "core.methods.dash",
     "core.methods.flexlora", "core.methods.prompt", "core.methods",
     "core.config", "core.named", "core.inject", "core.prompts", "core.execution",
     "core.mix", "core.penalties", "core.weighted", "core.nnx", "core"],
    # 3: meshes and hosts; the PEFT format
    ["parallel.distributed", "parallel.sharding", "parallel", "interop.peft.format", "interop.peft.experts",
     "interop.peft.export",
     "interop.peft.load", "interop.peft", "interop"],
    # 4: training
    ["training.losses", "training.train", "training.checkpoint", "training"],
    # 5: tasks
    ["tasks.base", "tasks.metrics", "tasks.glue", "tasks.generation", "tasks.commonsense", "tasks.math", "tasks"],
    # 6: the application
    ["app.allocator", "app.config", "app.run_folder", "app.train_loop", "app.experiment", "app.runs", "app.report",
     "app.sweep", "app.benchkit", "app.bench", "app.bench_decoder_report", "app.bench_decoder", "app.bench_long", "app.cli", "app"],
]
FACES = ["", "named", "nnx", "sharding"]  # decomp_jax and its public modules: re-exports for users
LAZY_OK = {"app.cli"}  # may import our modules inside functions (start-up time)
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _is_alias(tree: ast.Module) -> bool:
    """A moved path's alias: its body calls ``redirect(__name__)`` of ``decomp_jax.moved``."""
    return any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "redirect" for n in ast.walk(tree))


def _imports(name: str, tree: ast.Module, known: set):
    """``(target module, imported name or None, in a function?, line)`` for each import of ours."""
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    type_only = {id(n) for i in ast.walk(tree) if isinstance(i, ast.If) and getattr(i.test, "id", "") == "TYPE_CHECKING"
                 for n in ast.walk(i)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("decomp_jax"):
                    yield alias.name.removeprefix("decomp_jax").lstrip("."), None, id(node) in in_function, node.lineno
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("decomp_jax") and not node.level:
            base = node.module.removeprefix("decomp_jax").lstrip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}".lstrip(".")
                if sub in known:  # `from decomp_jax.core import inject`: the module
                    yield sub, None, id(node) in in_function, node.lineno
                else:
                    yield base, alias.name, id(node) in in_function, node.lineno


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    aliases = {n for n, t in modules.items() if _is_alias(t)}
    edges = {n: list(_imports(n, t, set(modules))) for n, t in modules.items()}
    return modules, aliases, edges


def test_every_module_is_on_a_floor(graph):
    modules, aliases, _ = graph
    placed = [m for floor in FLOORS for m in floor]
    assert len(placed) == len(set(placed))
    unplaced = sorted(set(modules) - set(placed) - aliases - set(FACES) - {"moved"})
    assert not unplaced, f"modules on no floor (add them to FLOORS in tests/test_layout.py): {unplaced}"
    assert not set(placed) - set(modules), f"FLOORS names modules that do not exist: {sorted(set(placed) - set(modules))}"


def test_imports_go_down_the_floors(graph):
    """Lower floors, or earlier modules of the same floor; a package's __init__ re-exports its own modules."""
    modules, aliases, edges = graph
    rank = {m: (f, i) for f, floor in enumerate(FLOORS) for i, m in enumerate(floor)}
    rank["moved"] = (0, -1)
    bad = []
    for source, imports in edges.items():
        if source in aliases or source in FACES or source == "moved":  # faces re-export from any floor
            continue
        for target, _, _, line in imports:
            if target in aliases or target in FACES:
                bad.append(f"decomp_jax/{source.replace('.', '/')}: line {line} imports decomp_jax.{target}, a public "
                           f"face or an old path; import the module that defines the name")
            elif target not in rank:
                continue
            elif rank[target] >= rank[source] and not target.startswith(source + "."):
                bad.append(f"{source} (floor {rank[source][0]}) line {line} imports {target} "
                           f"(floor {rank[target][0]}, {'same floor, later' if rank[target][0] == rank[source][0] else 'higher'})")
    assert not bad, "imports that go up the floors:\n" + "\n".join(bad)


def test_no_private_names_across_modules(graph):
    _, _, edges = graph
    bad = [f"{source} line {line}: from decomp_jax.{target} import {name}"
           for source, imports in edges.items() for target, name, _, line in imports
           if name and name.startswith("_") and target != source]
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


def test_in_function_imports_of_our_modules_only_in_the_cli(graph):
    _, aliases, edges = graph
    bad = [f"{source} line {line}: decomp_jax.{target}" for source, imports in edges.items()
           if source not in LAZY_OK and source not in aliases for target, _, lazy, line in imports if lazy]
    assert not bad, "in-function imports of our modules (move them to the top of the module):\n" + "\n".join(bad)


def test_aliases_are_the_moved_paths(graph):
    from decomp_jax.moved import MOVED

    modules, aliases, _ = graph
    assert {f"decomp_jax.{a}" for a in aliases} == set(MOVED)
    assert all(new.removeprefix("decomp_jax.") in modules for new in MOVED.values())


def test_modules_and_functions_are_short(graph):
    modules, _, _ = graph
    long_modules = [f"{name}: {tree.body[-1].end_lineno if tree.body else 0} lines" for name, tree in modules.items()
                    if tree.body and tree.body[-1].end_lineno > MAX_MODULE_LINES]
    long_functions = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
                      for name, tree in modules.items() for node in ast.walk(tree)
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long_modules and not long_functions, (
        f"modules over {MAX_MODULE_LINES} lines: {long_modules}; functions over {MAX_FUNCTION_LINES}: {long_functions}")


def test_old_paths_still_import_and_warn():
    """An old path (``decomp_jax.train``) is the module at its new path, with a DeprecationWarning, run in
    a fresh interpreter; ``decomp_jax.inject`` (the module moved, ``dj.inject`` is the function) imports
    and leaves ``dj.inject`` the function."""
    import subprocess
    import sys

    code = ("import warnings, decomp_jax as dj\n"
            "with warnings.catch_warnings(record=True) as seen:\n"
            "    warnings.simplefilter('always')\n"
            "    import decomp_jax.train as old\n"
            "from decomp_jax.training import train\n"
            "import decomp_jax.inject\n"
            "from decomp_jax.core.inject import inject_quantized\n"
            "print(old is train, [str(w.message) for w in seen], callable(dj.inject), dj.inject.__module__,\n"
            "      sys.modules['decomp_jax.inject'].inject_quantized is inject_quantized)\n")
    out = subprocess.run([sys.executable, "-c", "import sys\n" + code], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout
    assert out.strip() == ("True ['decomp_jax.train moved to decomp_jax.training.train; import it from there (the old "
                           "path goes in the next release).'] True decomp_jax.core.inject True"), out


def test_tests_mirror_the_packages_and_import_public_names():
    """tests/<package>/ for each floor's package (tests of floor-0 modules, of the README and of the layout at
    tests/), process workers in tests/workers/; no test imports a ``_private`` name of ours."""
    tests = ROOT / "tests"
    packages = {m.split(".")[0] for floor in FLOORS for m in floor if "." in m or (PACKAGE / m).is_dir()}
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    assert folders == packages | {"workers"}, folders ^ (packages | {"workers"})
    bad = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("decomp_jax"):
                bad += [f"{path.relative_to(ROOT)} line {node.lineno}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_")]
    assert not bad, "tests importing private names:\n" + "\n".join(bad)
