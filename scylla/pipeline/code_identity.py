"""Which code a stage's result depends on: the source of the ``scylla`` modules it imports.

A stage run is reused only while its code is unchanged (``scylla.pipeline.reuse``). The code of
a stage is its command module and, transitively, every ``scylla`` module named in an ``import``
statement of those files (imports inside functions included), with the ``__init__.py`` of each
package on the way. So a sweep that spans several days survives edits to the notebooks' analysis
helpers or the report, while any change to the model, data, training or decoding code a stage
runs makes it run again. (The imports by name, ``importlib`` in the CLI dispatch and in
``scylla.pipeline.stages``, pick the stage's module, which is where the walk starts.)
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = "scylla"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # scylla/, above this pipeline/ folder


def module_file(module: str, root: Path) -> Path | None:
    """The source file of a dotted ``scylla`` module under ``root``, or None (a name, not a
    module, as in ``from scylla.config import TrainConfig``)."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = root.joinpath(*parts[1:])
    for path in (base.with_suffix(".py") if len(parts) > 1 else None, base / "__init__.py"):
        if path is not None and path.is_file():
            return path
    return None


def with_packages(module: str) -> list[str]:
    """``module`` and its parent packages (importing it runs each ``__init__.py``)."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_modules(path: Path) -> set[str]:
    """Every ``scylla`` module an import statement in ``path`` may load, with its packages."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for name in names if name.split(".")[0] == PACKAGE for m in with_packages(name)}


def module_files(module: str, root: Path = PACKAGE_ROOT) -> list[Path]:
    """The files of ``module`` and of every ``scylla`` module it imports, transitively."""
    if module_file(module, root) is None:
        raise ValueError(f"no source for module {module!r} under {root}")
    seen: set[Path] = set()
    todo = with_packages(module)
    while todo:
        path = module_file(todo.pop(), root)
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(imported_modules(path))
    return sorted(seen)


@lru_cache(maxsize=None)
def code_version(module: str, root: Path = PACKAGE_ROOT) -> str:
    """Hash (paths and bytes) of the source ``module`` runs (``module_files``)."""
    h = hashlib.sha256()
    for path in module_files(module, root):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]
