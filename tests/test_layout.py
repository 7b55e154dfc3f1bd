"""The package's layout, read from its source with ``ast`` (nothing imported):
no import cycles, no private name taken from another module, and a sans-IO
``_core``."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import smapws

ROOT: Final = Path(smapws.__file__).parent

#: Import cycles known and being removed, each as the set of its modules.
#: Empty since connection.py became one task driving ``_core/wsconn.py``
#: behind a ``Host`` protocol (it named ``App`` for its annotations while
#: ``_io/app.py`` imported ``Connection``).
ALLOWED_CYCLES: Final[list[frozenset[str]]] = []

#: What ``_core`` may not import: it is sans-IO (no event loop, no sockets,
#: no clock reads, no broker), and knows nothing of the trio shell.
NOT_IN_CORE: Final = (
    "asyncio",
    "redis",
    "select",
    "selectors",
    "socket",
    "threading",
    "time",
    "trio",
    "trio_asyncio",
    "trio_util",
    "trio_websocket",
    "smapws._io",
)


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the module imported (a package's ``__init__`` as the package)
    name: str | None  # the name taken from it (``from target import name``)
    line: int
    type_checking: bool  # under ``if TYPE_CHECKING:``


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                inside.update(id(n) for n in ast.walk(child))
    return inside


def imports(module: str, path: Path, known: dict[str, Path]) -> Iterator[Import]:
    """Every import statement of ``module`` (at any depth: functions too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    guarded = _type_checking_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        tc = id(node) in guarded
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, None, node.lineno, tc)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in known:  # ``from pkg import module``
                    yield Import(module, submodule, None, node.lineno, tc)
                else:
                    yield Import(module, target, alias.name, node.lineno, tc)


def all_imports() -> list[Import]:
    known = modules()
    return [i for m, p in known.items() for i in imports(m, p, known)]


def internal(i: Import) -> bool:
    return i.target == "smapws" or i.target.startswith("smapws.")


def cycles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def graph(found: list[Import]) -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {}
    for i in found:
        if internal(i) and i.target in known and i.target != i.module:
            edges.setdefault(i.module, set()).add(i.target)
    return edges


def test_the_walk_sees_the_package() -> None:
    """The checks below read every module, and their imports resolve."""
    found = all_imports()
    known = modules()
    assert {"smapws._io.app", "smapws._core.router", "smapws._cli"} <= set(known)
    unresolved = [i for i in found if internal(i) and i.target not in known]
    assert unresolved == []
    edges = graph(found)
    assert "smapws._core.router" in edges["smapws._io.app"]
    assert "smapws._runtime" in edges["smapws._io.supervisor"]


def test_relative_lazy_and_type_checking_imports_are_read(tmp_path: Path) -> None:
    path = tmp_path / "mod.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "from ..up import _hidden\n"
        "if TYPE_CHECKING:\n"
        "    from smapws._io.app import App\n"
        "def f():\n"
        "    import smapws._cli\n"
    )
    known = {"pkg.sub.sibling": path}
    found = {(i.target, i.name, i.type_checking) for i in imports("pkg.sub.mod", path, known)}
    assert found == {
        ("typing", "TYPE_CHECKING", False),
        ("pkg.sub.sibling", None, False),
        ("pkg.up", "_hidden", False),
        ("smapws._io.app", "App", True),
        ("smapws._cli", None, False),
    }


def test_cycles_are_found() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(edges) == [frozenset({"a", "b", "c"})]


def test_each_allowed_cycle_is_still_there() -> None:
    """Once a cycle is gone, its entry goes too (else it could come back)."""
    gone = [c for c in ALLOWED_CYCLES if c not in cycles(graph(all_imports()))]
    assert gone == [], "remove these from ALLOWED_CYCLES"


def test_no_import_cycle_but_the_one_being_removed() -> None:
    """Counting imports under ``TYPE_CHECKING`` too: a cycle for the type
    checker is a tangle for the reader all the same."""
    found = [c for c in cycles(graph(all_imports())) if c not in ALLOWED_CYCLES]
    assert found == []


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_imports_a_private_name_of_another() -> None:
    """``from smapws.x import _name`` across modules: the name is then
    public in fact, or belongs elsewhere. (Private *modules*, ``smapws._io``
    and the like, are the package's layout, not names.)"""
    private = [
        f"{i.module}:{i.line} imports {i.name} from {i.target}"
        for i in all_imports()
        if internal(i) and i.name is not None and _private(i.name)
    ]
    assert private == []


def test_core_imports_no_io() -> None:
    found = [
        f"{i.module}:{i.line} imports {i.target}"
        for i in all_imports()
        if i.module.startswith("smapws._core")
        and any(i.target == bad or i.target.startswith(bad + ".") for bad in NOT_IN_CORE)
    ]
    assert found == []


#: The one module allowed a dependency's private names (issue 17): redis-py's
#: hiredis reader, for the pub/sub read loop's fast path, measured in
#: bench.micro_pump; it falls back to the public ``get_message`` without them.
PRIVATE_DEPENDENCY_USER: Final = "smapws._io.brokers.redis.pump"


def _ours(target: str) -> bool:
    return target.split(".")[0] in ("smapws", "smapws_publisher", "__future__")


def test_no_module_imports_a_private_name_of_a_dependency() -> None:
    """Nothing imports a private module or name of trio, trio-websocket,
    wsproto, redis-py or any other dependency (the fork of trio-websocket's
    internals that ``_io/ws.py`` was broke unseen with any release), but
    :data:`PRIVATE_DEPENDENCY_USER`."""
    found = [
        f"{i.module}:{i.line} imports {i.target}" + (f".{i.name}" if i.name else "")
        for i in all_imports()
        if not _ours(i.target)
        and i.module != PRIVATE_DEPENDENCY_USER
        and any(_private(part) for part in [*i.target.split("."), i.name or ""])
    ]
    assert found == []


#: The other private attribute of a dependency smapws reads, by name, with
#: why (each is looked up defensively: without it, redis-py's own behaviour).
PRIVATE_ATTRIBUTES: Final = {
    # redis-py's StreamWriter: a disconnect after a write cut short aborts
    # the transport, or the socket and its unsent bytes stayed open until
    # Redis read them (ResourceWarning at exit; tests/test_faults.py).
    ("smapws._io.brokers.redis.client", "_writer"),
}


def test_only_the_pump_reaches_for_private_attributes_by_name() -> None:
    """``getattr(x, "_name")`` is the other way to a dependency's internals
    (the package's own private attributes are not looked up by name)."""
    found = []
    for module, path in modules().items():
        if module == PRIVATE_DEPENDENCY_USER:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "setattr", "hasattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
                and _private(node.args[1].value)
                and (module, node.args[1].value) not in PRIVATE_ATTRIBUTES
            ):
                found.append(f"{module}:{node.lineno} {node.func.id}(..., {node.args[1].value!r})")
    assert found == []


def _documented_modules(text: str) -> set[str]:
    """The ``dir/name.py`` paths a layout text names, each resolved under
    ``smapws/`` (``_core/x.py``, ``_io/x.py``, ``smapws/x.py``, or a bare
    ``x.py`` under the ``smapws/<dir>/`` named last before it)."""
    import re

    found: set[str] = set()
    where = ""
    for token in re.findall(r"``([\w/.]+)``", text):
        if token.rstrip("/") in ("smapws/_core", "smapws/_io", "smapws/_io/brokers"):
            where = token.removeprefix("smapws/").rstrip("/")
        elif token.endswith(".py") and not token.startswith("tests/"):
            path = token.removeprefix("smapws/")
            if "/" not in path and where and not (ROOT / path).exists():
                path = f"{where}/{path}"
            found.add(path)
    return found


def test_the_readmes_layout_names_only_modules_that_exist() -> None:
    # Review17: the README had no layout section (issue 17 asks for the new
    # layout there); this holds it to the code, so a deleted module (such as
    # _io/ws.py) cannot stay in it.
    readme = (ROOT.parent / "README.rst").read_text()
    section = readme.split("\nLayout\n======\n", 1)[1]
    named = _documented_modules(section)
    assert {"_core/wsconn.py", "_io/connection.py", "_core/router.py"} <= named
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert missing == [], "the README's layout names modules that do not exist"
