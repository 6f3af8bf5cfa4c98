"""The shape of the code: layers import only the ones before them, the library has no import
cycle, no argparse and no command-line flag in what it says, and it runs without Ray."""

import ast
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

LAYERS = ["autodfp", "envs", "launch"]
FORWARDER = ("autodfp/__init__.py", "launch.api")
"""``autodfp.search`` forwards to the service on use: the one import that reaches up."""


def modules(package: str) -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(path: Path) -> list[str]:
    """Every module an import statement in ``path`` names, function-level ones included."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return names


def test_each_layer_imports_only_the_ones_before_it():
    wrong = []
    for rank, layer in enumerate(LAYERS):
        later = LAYERS[rank + 1:]
        for name, path in modules(layer).items():
            for imported in imports(path):
                top = imported.split(".")[0]
                where = str(path.relative_to(ROOT))
                if top in later and (where, imported.rsplit(".", 1)[0]) != FORWARDER \
                        and (where, imported) != FORWARDER:
                    wrong.append(f"{where} imports {imported}")
    assert not wrong


def test_no_import_cycle_inside_the_library():
    library = modules("autodfp")
    graph = {name: {i for i in imports(path) if i in library and i != name}
             for name, path in library.items()}
    cycles, state = [], {}

    def visit(name, trail):
        state[name] = "open"
        for child in sorted(graph[name]):
            if state.get(child) == "open":
                cycles.append(trail[trail.index(child):] + [child])
            elif child not in state:
                visit(child, trail + [child])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles
    assert len(graph) > 20  # the walk saw the library


def docstrings(tree) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def test_the_library_holds_no_argparse_and_names_no_flag():
    flag = re.compile(r"(^|[\s(\"'`])--[a-z]")
    found = []
    for name, path in modules("autodfp").items():
        tree = ast.parse(path.read_text())
        skip = docstrings(tree)
        if any(i.split(".")[0] == "argparse" for i in imports(path)):
            found.append(f"{name} imports argparse")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and id(node) not in skip and flag.search(node.value)):
                found.append(f"{name}:{node.lineno}: {node.value!r}")
    assert not found


def test_importing_the_library_and_pruning_from_the_command_line_import_no_ray(tmp_path):
    script = ("import sys\n"
              "import autodfp, autodfp.api, autodfp.pipeline, autodfp.export\n"
              "from launch.cli import main\n"
              f"code = main(['prune', '--model', 'resnet20', '--keep', '0.9', '--calib', 'none',"
              f" '--no-eval', '--fidelity-images', '0', '--no-onnx', '--out', r'{tmp_path / 'o'}'])\n"
              "print(code, sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'gymnasium'}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "0 []"
