"""The package's structure: no import cycles among gankit's modules, counting the imports
inside functions too (a late import hides a cycle, it does not remove one); an import of a
gankit module inside a function only where it keeps a heavy dependency out of a caller that
does not need it, with a `# late: why` comment; and the light entry points stay light.

Read from the source with `ast` (nothing is imported but in the last tests), over the folders
setup.cfg's package_dir maps onto gankit.
"""

from __future__ import annotations

import ast
import configparser
import io
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]



def package_folders() -> dict[str, Path]:
    """{package: folder}, as setup.cfg's package_dir maps them."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    folders = {}
    for line in cfg["options"]["package_dir"].strip().splitlines():
        package, _, folder = (part.strip() for part in line.partition("="))
        folders[package] = ROOT / folder
    return folders


def modules() -> dict[str, Path]:
    """{dotted name: file} of every gankit module."""
    found = {}
    folders = package_folders()
    for package, folder in folders.items():
        others = [f for p, f in folders.items() if p != package and f != folder]
        for path in sorted(folder.rglob("*.py")):
            if any(other in path.parents for other in others):
                continue  # a folder mapped onto a package of its own
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = modules()


def resolve(name: str) -> str | None:
    """The gankit module an imported name lives in: the longest module prefix of it."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


class Import:
    def __init__(self, module: str, target: str, node: ast.stmt, in_function: bool):
        self.module, self.target, self.node, self.in_function = module, target, node, in_function

    @property
    def where(self) -> str:
        return f"{MODULES[self.module].relative_to(ROOT)}:{self.node.lineno}"


def imports_of(module: str) -> list[Import]:
    """Every import of a gankit module in `module`, at any depth (functions, classes, try, if)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package
                    for _ in range(child.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                names = [f"{base}.{alias.name}" for alias in child.names]
            else:
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
                continue
            targets = {resolve(name) for name in names if name.split(".")[0] == "gankit"}
            found.extend(Import(module, target, child, in_function)
                         for target in sorted(targets - {None, module}))

    visit(tree, False)
    return found


IMPORTS = {module: imports_of(module) for module in MODULES}


def cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), or of one module
    importing itself."""
    graph = {m: sorted({i.target for i in IMPORTS[m]}) for m in MODULES}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return found


def test_the_module_list_is_read():
    assert {"gankit.cli", "gankit.trainer", "gankit.server.app", "gankit.clients.app",
            "gankit.metrics.classifier"} <= set(MODULES)
    assert any(i.target == "gankit.trainer" for i in IMPORTS["gankit.evaluate"])
    assert any(i.in_function for i in IMPORTS["gankit.cli"])


def test_no_import_cycles():
    """Move what both sides need into the lower module (or a small module of its own); an
    import inside a function does not count as a way out."""
    found = cycles()
    lines = []
    for component in found:
        lines.append(" <-> ".join(component))
        lines += [f"    {i.where}: {i.module} -> {i.target}{' (inside a function)' if i.in_function else ''}"
                  for m in component for i in IMPORTS[m] if i.target in component]
    assert not found, "import cycles among gankit's modules:\n" + "\n".join(lines)


def comments(path: Path) -> dict[int, str]:
    """{line: comment text} of a file."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return {t.start[0]: t.string for t in tokens if t.type == tokenize.COMMENT}


def import_runs(tree: ast.AST) -> dict[int, int]:
    """{an import statement's line: the line of the first statement of its run of consecutive
    import statements}."""
    first = {}
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            statements = getattr(node, field, None)
            if not isinstance(statements, list):
                continue
            head = None
            for stmt in statements:
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    head = head or stmt.lineno
                    first[stmt.lineno] = head
                else:
                    head = None
    return first


def test_every_late_gankit_import_says_why():
    """A gankit import inside a function keeps something heavy (torch for the CLI's parser,
    Opacus outside DP, Flower outside federated runs) from a caller that does not need it,
    and says so in a `# late: ...` comment on its line or on the line above it (or above the
    run of import lines it opens). Any other import belongs at the top of the module."""
    missing = []
    for module, imports in IMPORTS.items():
        late = [i for i in imports if i.in_function]
        if not late:
            continue
        path = MODULES[module]
        notes = comments(path)
        source_lines = path.read_text().splitlines()
        runs = import_runs(ast.parse(path.read_text(), str(path)))
        for i in late:
            above = runs.get(i.node.lineno, i.node.lineno) - 1
            said = [notes.get(line, "") for line in range(i.node.lineno, i.node.end_lineno + 1)]
            if above >= 1 and source_lines[above - 1].strip().startswith("#"):
                said.append(notes.get(above, ""))
            if any("late:" in note for note in said):
                continue
            missing.append(f"{i.where}: {i.module} imports {i.target} inside a function")
    assert not missing, ("move these imports to the top of their module, or, where one keeps a "
                         "heavy dependency out, say why in a '# late: ...' comment:\n"
                         + "\n".join(missing))


HEAVY = ("torch", "opacus", "flwr", "ray", "matplotlib", "tensorboard", "sklearn", "torchvision")


def loaded_after(code: str) -> set[str]:
    """The heavy packages a fresh interpreter has loaded after running `code`."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    return set(out.stdout.split())


@pytest.mark.parametrize("code,allowed", [
    # `gankit --help` and the option dataclasses: no torch at all.
    ("import gankit.config", set()),
    ("import gankit.cli; gankit.cli.build_parser()", set()),
    # Standard training: no Opacus (privacy.py, for --mode dp) and no Flower (federated).
    ("import gankit.trainer, gankit.evaluate, gankit.generate", {"torch"}),
    # A federated client's round and the server's global model: no Flower import of their own.
    ("import gankit.federated", {"torch"}),
])
def test_light_entry_points_stay_light(code, allowed):
    assert loaded_after(code) <= allowed
