"""What the API reference documents: the public modules, their names, where each object lives.

Plain Python (no Sphinx), so that the tests can ask the same questions the docs build does.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import pkgutil
import re
from pathlib import Path

#: public modules, in the order that decides where a re-exported object is documented
API_MODULES = (
    "curvop.curvature",
    "curvop.operators",
    "curvop.operators.dataset",
    "curvop.linalg",
    "curvop.interop",
    "curvop.compat",
    "curvop.compat.laplace",
    "curvop.errors",
    "curvop",
)

DOCS = Path(__file__).resolve().parent.parent
EXAMPLES = DOCS / "examples"
FIGURES = DOCS / "_static" / "examples"
BENCHMARKS = DOCS.parent / "benchmarks" / "results"


#: modules that exist but could not be imported here (an optional dependency), with the reason
UNAVAILABLE: dict[str, str] = {}


def import_public(name: str):
    """The module ``name``, or ``None`` if it does not exist or cannot be imported here.

    A module that exists but needs an optional dependency that is not installed (e.g.
    ``curvop.compat.laplace`` without laplace-torch) is recorded in :data:`UNAVAILABLE`.
    """
    try:
        return importlib.import_module(name)
    except ImportError as err:
        try:
            exists = importlib.util.find_spec(name) is not None
        except ImportError:
            exists = False
        if exists:
            UNAVAILABLE[name] = str(err)
        return None


def public_names(module) -> list[str]:
    """The module's ``__all__`` (an empty list if it has none)."""
    return list(getattr(module, "__all__", []))


@functools.lru_cache(maxsize=1)
def canonical_paths() -> dict[int, str]:
    """``id(object) -> 'module.name'``: where each public object is documented."""
    paths: dict[int, str] = {}
    for mod_name in API_MODULES:
        module = import_public(mod_name)
        if module is None:
            continue
        for name in public_names(module):
            obj = getattr(module, name)
            if _documentable(obj):
                paths.setdefault(id(obj), f"{mod_name}.{name}")
    return paths


def _documentable(obj) -> bool:
    return not inspect.ismodule(obj)


def data_doc(path: str, obj) -> str:
    """The ``#:`` comment of a module-level constant, wherever in curvop it is defined.

    Falls back to the first line of the docstring of the module that defines it.
    """
    name = path.rsplit(".", 1)[1]
    curvop = importlib.import_module("curvop")
    for info in pkgutil.walk_packages(curvop.__path__, "curvop."):
        module = import_public(info.name)
        if module is None or getattr(module, name, None) is not obj:
            continue
        source = inspect.getsource(module)
        comment = re.search(rf"((?:^#:.*\n)+)^{name}\s*[:=]", source, re.MULTILINE)
        if comment:
            return "\n".join(line[2:].strip() for line in comment.group(1).splitlines())
        if module.__doc__ and re.search(rf"^{name}\s*[:=]", source, re.MULTILINE):
            return module.__doc__.strip().splitlines()[0]
    return ""


def example_scripts() -> list[Path]:
    """The example scripts, in name order."""
    return sorted(p for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))




def demote_headings(text: str, levels: int = 1) -> str:
    """Markdown ``text`` with every ATX heading (outside code fences) ``levels`` deeper."""
    lines, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        if not fence and re.match(r"#{1,5} ", line):
            line = "#" * levels + line
        lines.append(line)
    return "\n".join(lines)


def benchmark_extras() -> str:
    """The other reports in ``benchmarks/results/`` (``*.md`` but the README).

    Each becomes a section one heading level down (its title a ``##`` heading).
    """
    parts = [demote_headings(p.read_text().strip())
             for p in sorted(BENCHMARKS.glob("*.md")) if p.name != "README.md"]
    return "\n\n".join(parts) if parts else "*No other benchmark reports yet.*"


def benchmark_markdown() -> str:
    """The benchmark report as Markdown, without its title.

    ``benchmarks/results/README.md`` if it exists, else the same report rendered from the JSON
    result files by ``benchmarks.report``, else a note that there are no results yet.
    """
    readme = BENCHMARKS / "README.md"
    if readme.is_file():
        text = readme.read_text()
    else:
        payloads = [json.loads(p.read_text()) for p in sorted(BENCHMARKS.glob("*.json"))]
        if not payloads:
            return ("*No benchmark results are in the repository yet; "
                    "`python -m benchmarks.run` writes them.*")
        from benchmarks.report import render_markdown

        text = render_markdown(payloads)
    lines = text.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(lines)
