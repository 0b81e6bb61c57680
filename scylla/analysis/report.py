"""The report: execute the notebooks against the tracking store and render HTML
(command: ``scylla report``).

Writes ``<out>/<notebook>.html`` for each notebook, ``<out>/index.html`` linking them, and
``<out>/points/``: the points behind each figure (CSV) and ``headline.md`` (the summary
tables, written by the overview notebook). ``inplace`` also saves the executed notebooks over
the sources (to commit them with their figures, run on the ``paper`` profile).
"""
from __future__ import annotations

import contextlib
import html
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from scylla import paths
from scylla.errors import ConfigError
from scylla.experiments import PROFILE_ENV

NOTEBOOKS = ("overview", "theorem_1_1", "theorem_1_2", "theorem_1_3", "figure_2", "table_5")


def notebooks_dir() -> Path:
    """``notebooks/`` of the project (``SCYLLA_PROJECT_DIR``/cwd), else of this checkout."""
    for root in (paths.project_dir(), Path(__file__).resolve().parents[2]):
        if (root / "notebooks" / "overview.ipynb").is_file():
            return root / "notebooks"
    raise ConfigError("no notebooks/overview.ipynb in the project dir or beside the package")


def execute_notebook(path: Path, km: Any = None, timeout: int = 900) -> Any:
    """Run a notebook top to bottom (cwd: its directory) in a fresh kernel, or in the
    running kernel of ``km`` after clearing its namespace; raises
    ``nbclient.exceptions.CellExecutionError`` naming the failing cell."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    if km is not None:
        reset = nbformat.v4.new_code_cell("%reset -f\nimport os\nos.chdir(" + repr(
            str(path.parent)) + ")")
        nb.cells.insert(0, reset)
    NotebookClient(nb, km=km, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    if km is not None:
        nb.cells.pop(0)
    return nb


@contextlib.contextmanager
def shared_kernel() -> Iterator[Any]:
    """One kernel for several notebooks: the imports (torch, mlflow, sklearn, seaborn) are
    paid once; each notebook still starts from an empty namespace. It talks over IPC sockets
    in a private temporary directory (over TCP the kernel warns that it is unencrypted)."""
    from jupyter_client.manager import KernelManager

    with tempfile.TemporaryDirectory(prefix="scylla-kernel-") as tmp:
        km = KernelManager(kernel_name="python3", transport="ipc", ip=str(Path(tmp) / "k"))
        km.start_kernel()
        try:
            yield km
        finally:
            km.shutdown_kernel(now=True)


def render_report(out_dir: str | Path, profile: str, simulated: bool = False,
                  names: tuple[str, ...] = NOTEBOOKS, inplace: bool = False,
                  one_kernel: bool = True, log: Callable[[str], None] = print) -> Path:
    """Execute ``names`` (``one_kernel``: in one kernel, see ``shared_kernel``) and write the
    HTML report; returns ``index.html``."""
    import nbformat
    from nbconvert import HTMLExporter

    out = Path(out_dir).resolve()
    src = notebooks_dir()
    # notebooks saved in place keep their points beside them, to be committed together
    points = (src if inplace else out) / "points"
    points.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter()
    env = {PROFILE_ENV: profile, "SCYLLA_SIMULATED": "1" if simulated else "0",
           "SCYLLA_POINTS_DIR": str(points),
           # the kernel's cwd is notebooks/: pin the store the caller resolved
           "MLFLOW_TRACKING_URI": paths.tracking_uri(),
           "SCYLLA_PROJECT_DIR": str(paths.project_dir()),
           # MLflow imports tqdm.auto, which warns in a kernel without ipywidgets: noise
           "PYTHONWARNINGS": "ignore:IProgress not found"}
    kernel = shared_kernel() if one_kernel else contextlib.nullcontext()
    with paths.environment(env), kernel as km:
        for name in names:
            start = time.perf_counter()
            with contextlib.nullcontext(km) if one_kernel else shared_kernel() as own:
                nb = execute_notebook(src / f"{name}.ipynb", own)
            body, _ = exporter.from_notebook_node(nb)
            (out / f"{name}.html").write_text(body)
            if inplace:
                nbformat.write(nb, src / f"{name}.ipynb")
            log(f"report: {name} executed in {time.perf_counter() - start:.1f} s")
    # the index lists every notebook rendered into ``out``, by this call or an earlier one
    # (a report rendered a few notebooks at a time keeps them all)
    links = [f'<li><a href="{name}.html">{html.escape(name)}</a></li>' for name in NOTEBOOKS
             if (out / f"{name}.html").is_file()]
    title = f"Scylla report: profile {profile}" + (" (simulated runs)" if simulated else "")
    (out / "index.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"</head><body><h1>{html.escape(title)}</h1><ul>{''.join(links)}</ul>"
        f"<p>Points behind each figure, and the summary <code>headline.md</code> (written "
        f"by the overview): <code>{html.escape(os.path.relpath(points, out))}</code>.</p>"
        "</body></html>")
    return out / "index.html"
