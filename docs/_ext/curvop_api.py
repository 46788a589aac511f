"""Sphinx extension: API pages generated from the packages' ``__all__`` lists, and the examples.

Directives (they emit reStructuredText: from a Markdown page, call them inside ``{eval-rst}``):

``.. curvop-api:: MODULE [MODULE ...]``
    Documents every name in each module's ``__all__`` with autodoc. An object is documented
    once, under the first public module (in ``curvop_public.API_MODULES`` order) that exports
    it; other modules list it as an alias with a link. A module that does not import (a part of the
    package not written yet) is reported as absent instead of breaking the build.

``.. curvop-summary:: MODULE``
    A table of the module's ``__all__``: each name, where it is documented, its first line.

``.. curvop-backends::``
    The table of which public methods each backend class of the registry supports.

``.. curvop-examples::``
    One section per script in ``docs/examples/``: its docstring, its figure
    (``_static/examples/<name>.png`` when it exists) and its source.

A Markdown page holding the line ``<!-- curvop-benchmark-report -->`` gets the benchmark report
(``benchmarks/results/README.md``) in its place, its headings one level down; the line
``<!-- curvop-benchmark-extras -->`` gets the other reports (``benchmarks/results/*.md``).

A ``missing-reference`` handler resolves ``curvop.X`` cross-references written against any
public or private path (``curvop.Kron``, ``curvop.operators.kron.Kron``) to the place where
the object is documented.
"""

from __future__ import annotations

import ast
import enum
import importlib
import inspect
import sys

from curvop_public import (
    BENCHMARKS,
    DOCS,
    FIGURES,
    UNAVAILABLE,
    benchmark_extras,
    benchmark_markdown,
    canonical_paths,
    data_doc,
    demote_headings,
    example_scripts,
    import_public,
    public_names,
)
from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles


def _role(obj) -> str:
    if inspect.isclass(obj):
        return "py:exc" if issubclass(obj, BaseException) else "py:class"
    if inspect.isfunction(obj):
        return "py:func"
    return "py:data"


def _first_line(obj) -> str:
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        return ""
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _autodoc_lines(path: str, obj) -> list[str]:
    """The autodoc directive documenting ``obj`` as ``path``."""
    if inspect.isclass(obj):
        if issubclass(obj, BaseException):
            return [f".. autoexception:: {path}", ""]
        lines = [f".. autoclass:: {path}", "   :members:"]
        if not _shown_bases(list(obj.__bases__)):
            lines.append("   :no-show-inheritance:")  # "Bases: object" says nothing
        if issubclass(obj, enum.Enum):
            lines.append("   :undoc-members:")
        try:
            from linear_operator.operators import LinearOperator
        except ImportError:  # pragma: no cover - a core dependency
            LinearOperator = None  # noqa: N806
        if LinearOperator is not None and issubclass(obj, LinearOperator):
            # show the public methods of curvop's private bases, not linear_operator's own
            lines.append("   :inherited-members: LinearOperator")
        return [*lines, ""]
    if inspect.isfunction(obj):
        return [f".. autofunction:: {path}", ""]
    module, name = path.rsplit(".", 1)
    return [f".. py:data:: {name}", f"   :module: {module}", "", *(
        "   " + line for line in data_doc(path, obj).splitlines()), ""]


class CurvopAPI(SphinxDirective):
    """``.. curvop-api:: MODULE ...``: autodoc every name of each module's ``__all__``."""

    required_arguments = 1
    optional_arguments = 10
    has_content = False

    def run(self) -> list[nodes.Node]:
        """Parse the generated autodoc directives."""
        paths = canonical_paths()
        lines: list[str] = []
        for mod_name in self.arguments:
            module = import_public(mod_name)
            if module is None:
                why = UNAVAILABLE.get(mod_name)
                lines += [f".. note:: ``{mod_name}`` " + (
                    f"could not be imported where these pages were built: {why}" if why
                    else "is not part of this version of curvop."), ""]
                continue
            lines += [f".. automodule:: {mod_name}", "   :no-members:", ""]
            aliases = []
            for name in public_names(module):
                obj = getattr(module, name)
                path = paths.get(id(obj), f"{mod_name}.{name}")
                if path == f"{mod_name}.{name}":
                    lines += _autodoc_lines(path, obj)
                else:
                    aliases.append(f"* ``{mod_name}.{name}`` is :{_role(obj)}:`{path}`.")
            if aliases:
                lines += ["Also exported here, documented elsewhere:", "", *aliases, ""]
        self.env.note_dependency(__file__)
        container = nodes.container()
        nested_parse_with_titles(self.state, StringList(lines, source="curvop-api"), container)
        return container.children


class CurvopSummary(SphinxDirective):
    """``.. curvop-summary:: MODULE``: a table of the module's ``__all__``."""

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        """Parse the generated table."""
        module = importlib.import_module(self.arguments[0])
        paths = canonical_paths()
        lines = [".. list-table::", "   :header-rows: 1", "   :widths: 25 75", "",
                 "   * - name", "     - what it is"]
        for name in public_names(module):
            obj = getattr(module, name)
            path = paths.get(id(obj), f"{self.arguments[0]}.{name}")
            lines += [f"   * - :{_role(obj)}:`{name} <{path}>`",
                      f"     - {_first_line(obj) or ' '}"]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source="curvop-summary"), 0, container)
        return container.children


class CurvopExamples(SphinxDirective):
    """``.. curvop-examples::``: docstring, figure and source of every example script.

    The content, if any, lists script names (without ``.py``) to show first, in that order; the
    other scripts follow in name order, so that a new script is never left out.
    """

    has_content = True

    def run(self) -> list[nodes.Node]:
        """Parse the generated sections."""
        first = [name.strip() for name in self.content if name.strip()]
        scripts = sorted(example_scripts(), key=lambda p: (
            first.index(p.stem) if p.stem in first else len(first), p.stem))
        lines: list[str] = []
        for script in scripts:
            self.env.note_dependency(str(script))
            tree = ast.parse(script.read_text())
            doc = ast.get_docstring(tree) or script.stem
            # the listing starts after the docstring, which is shown above it as prose
            first = tree.body[0].end_lineno + 1 if ast.get_docstring(tree) else 1
            lines_after = script.read_text().splitlines()[first - 1:]
            while lines_after and not lines_after[0].strip():
                lines_after, first = lines_after[1:], first + 1
            title, _, body = doc.partition("\n")
            title = title.strip().rstrip(".")
            lines += [f".. _example-{script.stem}:", "", title, "-" * max(len(title), 3), "",
                      *body.strip().splitlines(), ""]
            lines += [f"Run it with ``python docs/examples/{script.name}``.", ""]
            figure = FIGURES / f"{script.stem}.png"
            if figure.exists():
                rel = figure.relative_to(DOCS).as_posix()
                lines += [f".. figure:: /{rel}", "   :width: 90%",
                          f"   :alt: figure written by {script.name}", ""]
            rel = script.relative_to(DOCS).as_posix()
            lines += [f".. literalinclude:: /{rel}",
                      "   :language: python", f"   :lines: {first}-", ""]
        container = nodes.container()
        nested_parse_with_titles(self.state, StringList(lines, source="curvop-examples"),
                                 container)
        return container.children


#: the public methods, in the order of the support table; ``None``: always available
_METHODS = ("jacobians", "gradients", "full", "diag", "kron", "full_operator",
            "dataset_operator", "eig_lowrank")


def _supports(cls: type, method: str) -> bool:
    if method == "eig_lowrank":
        return "low_rank" in inspect.signature(cls).parameters
    if method == "dataset_operator":
        method = "full_operator"
    return f"_{method}" in cls.supports


class CurvopBackends(SphinxDirective):
    """``.. curvop-backends::``: which methods each backend class supports, from the registry."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        """Parse the generated table."""
        from curvop.curvature import BACKENDS, GGNInterface

        paths = canonical_paths()
        header = ["class", *(f"``{m}``" for m in _METHODS), "MC Fisher"]
        lines = [".. list-table::", "   :header-rows: 1", "   :class: curvop-support", "",
                 "   * - " + header[0], *(f"     - {h}" for h in header[1:])]
        for kinds in BACKENDS.values():
            for cls in kinds.values():
                path = paths.get(id(cls), f"{cls.__module__}.{cls.__name__}")
                cells = ["✓" if _supports(cls, m) else "—" for m in _METHODS]
                cells.append("✓" if issubclass(cls, GGNInterface) else "—")
                lines += [f"   * - :class:`~{path}`", *(f"     - {c}" for c in cells)]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source="curvop-backends"), 0, container)
        return container.children


def _resolve_object(target: str):
    """Import the longest importable prefix of ``target`` and walk the rest as attributes.

    Returns ``(object, remaining names)``: the deepest module, class or module-level function
    reached, and the attribute names after it (a method name, say), or ``None``.
    """
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        rest = parts[cut:]
        while rest and hasattr(found, rest[0]):
            nxt = getattr(found, rest[0])
            if inspect.isclass(nxt) or inspect.ismodule(nxt) or (
                    inspect.ismodule(found) and inspect.isfunction(nxt)):
                found, rest = nxt, rest[1:]
            else:
                break
        return found, rest
    return None


def _documented_path(obj, rest: list[str]) -> str | None:
    """Where ``obj.<rest>`` is documented: a method is looked up along the class's MRO."""
    paths = canonical_paths()
    if inspect.ismodule(obj) and len(rest) == 1 and id(getattr(obj, rest[0], None)) in paths:
        return paths[id(getattr(obj, rest[0]))]                 # module-level data
    if inspect.isclass(obj) and len(rest) == 1:
        for klass in obj.__mro__:
            if rest[0] in vars(klass) and id(klass) in paths:
                return f"{paths[id(klass)]}.{rest[0]}"
    path = paths.get(id(obj))
    return None if path is None else ".".join([path, *rest])


def _bare_name(klass_path: str, name: str) -> str | None:
    """A bare name in a class's docstring: a member along its MRO, else a global of its module."""
    resolved = _resolve_object(klass_path)
    if resolved is None or resolved[1] or not inspect.isclass(resolved[0]):
        return None
    klass = resolved[0]
    if any(name in vars(k) for k in klass.__mro__):
        return _documented_path(klass, [name])
    obj = vars(sys.modules[klass.__module__]).get(name)
    return None if obj is None else canonical_paths().get(id(obj))


def resolve_curvop_reference(app: Sphinx, env, node, contnode):
    """Point ``curvop.X`` references at the path where ``X`` is documented.

    Also resolves a bare method name inside a class's docstring (``:meth:`eig_lowrank```) to
    the base class that defines and documents it.
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "").lstrip("~.")
    if "." not in target and node.get("py:class") and node.get("py:module"):
        new_target = _bare_name(f"{node['py:module']}.{node['py:class']}", target)
    elif target.startswith("curvop"):
        resolved = _resolve_object(target)
        new_target = None if resolved is None else _documented_path(*resolved)
    else:
        return None
    if new_target is None or new_target == node.get("reftarget"):
        return None
    domain = env.get_domain("py")
    for role in (node.get("reftype"), "obj"):
        ref = domain.resolve_xref(env, node.get("refdoc"), app.builder, role, new_target,
                                  node, contnode)
        if ref is not None:
            return ref
    return None


def _shown_bases(bases: list[type]) -> list[type]:
    """``bases`` without the curvop classes that the reference does not document.

    A private base such as ``_KronBase`` (or a mixin of a private module) is replaced by its own
    bases, recursively, and ``object`` is left out: the "Bases:" line names only classes a
    reader can click on.
    """
    paths = canonical_paths()
    shown: list[type] = []
    for base in bases:
        if base is object:
            continue
        if base.__module__.split(".")[0] == "curvop" and id(base) not in paths:
            replacement = _shown_bases(list(base.__bases__))
        else:
            replacement = [base]
        shown += [b for b in replacement if b not in shown]
    return shown


def _public_path(cls: type) -> str:
    """The shortest importable path of another library's class.

    ``laplace.curvature.X`` rather than ``laplace.curvature.curvature.X``, so that the reader
    can tell it from curvop's namesake.
    """
    parts = cls.__module__.split(".")
    for cut in range(1, len(parts) + 1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        if getattr(module, cls.__name__, None) is cls:
            return f"{module.__name__}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def hide_private_bases(app: Sphinx, name: str, obj, options, bases: list) -> None:
    """``autodoc-process-bases``: see :func:`_shown_bases` (the list is changed in place).

    Other libraries' bases are named by their full public path (``laplace.curvature.
    GGNInterface`` beside curvop's own ``GGNInterface``).
    """
    shown = _shown_bases(list(bases))
    # a base that another listed base already derives from says nothing new
    shown = [b for b in shown if not any(o is not b and issubclass(o, b) for o in shown)]
    bases[:] = [b if b.__module__ in ("builtins", "curvop") or b.__module__.startswith(
        "curvop.") else f":py:class:`{_public_path(b)}`" for b in shown]


#: the line of a Markdown page that the benchmark report replaces (its headings one level down)
BENCHMARK_MARKER = "<!-- curvop-benchmark-report -->"
#: the line that the other reports of ``benchmarks/results/*.md`` replace
BENCHMARK_EXTRAS_MARKER = "<!-- curvop-benchmark-extras -->"


def insert_benchmarks(app: Sphinx, docname: str, source: list[str]) -> None:
    """Replace the marker lines of a page by the benchmark reports (current on every build)."""
    if BENCHMARK_MARKER not in source[0] and BENCHMARK_EXTRAS_MARKER not in source[0]:
        return
    for path in [*sorted(BENCHMARKS.glob("*.md")), *sorted(BENCHMARKS.glob("*.json"))]:
        app.env.note_dependency(str(path))
    source[0] = source[0].replace(BENCHMARK_MARKER, demote_headings(benchmark_markdown()))
    source[0] = source[0].replace(BENCHMARK_EXTRAS_MARKER, benchmark_extras())


def setup(app: Sphinx) -> dict:
    """Register the directives and the reference resolver."""
    app.add_directive("curvop-api", CurvopAPI)
    app.add_directive("curvop-summary", CurvopSummary)
    app.add_directive("curvop-examples", CurvopExamples)
    app.add_directive("curvop-backends", CurvopBackends)
    app.connect("missing-reference", resolve_curvop_reference)
    app.connect("autodoc-process-bases", hide_private_bases)
    app.connect("source-read", insert_benchmarks)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
