"""The documentation: its examples run and assert, its figures exist, Sphinx builds it cleanly
(warnings are errors), the API reference covers every public name, and the examples in the
public docstrings hold.
"""

import doctest
import importlib.util
import os
import runpy
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = sorted(p for p in (DOCS / "examples").glob("*.py") if not p.name.startswith("_"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load_public():
    """docs/_ext/curvop_public.py: what the API reference documents, and where."""
    spec = importlib.util.spec_from_file_location("curvop_public",
                                                  DOCS / "_ext" / "curvop_public.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inventory_names(path: Path) -> set[str]:
    """The object names in a Sphinx ``objects.inv`` (version 2: 4 header lines, zlib body)."""
    with open(path, "rb") as fh:
        for _ in range(4):
            fh.readline()
        body = zlib.decompress(fh.read()).decode()
    return {line.split(" ", 1)[0] for line in body.splitlines() if line.strip()}


@pytest.fixture
def single_thread():
    """Tiny problems run fastest on one thread (and do not fight xdist's other worker)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_and_draws(script, tmp_path, monkeypatch, single_thread):
    """Each example runs to the end (its own asserts against dense references hold) and, if it
    draws, writes a non-empty PNG."""
    matplotlib = pytest.importorskip("matplotlib", reason="the examples draw with matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("CURVOP_EXAMPLES_OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", [str(script)])
    monkeypatch.syspath_prepend(str(script.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        plt.close("all")
    if "savefig" in script.read_text():
        pngs = list(tmp_path.glob("*.png"))
        assert pngs, f"{script.name} wrote no PNG into CURVOP_EXAMPLES_OUT"
        for png in pngs:
            data = png.read_bytes()
            assert data.startswith(PNG_MAGIC) and len(data) > 1000, f"{png.name} is not a PNG"


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_figure_is_in_the_docs(script):
    """The docs show ``_static/examples/<name>.png`` for an example that writes it."""
    name = f"{script.stem}.png"
    if name not in script.read_text():
        pytest.skip(f"{script.name} writes no {name}")
    figure = DOCS / "_static" / "examples" / name
    assert figure.is_file() and figure.read_bytes().startswith(PNG_MAGIC), (
        f"{figure.relative_to(ROOT)} is missing: run `python docs/examples/{script.name}`")


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory):
    """``sphinx-build -W -b html docs <tmp>`` once for the module: (returncode, output, dir)."""
    if importlib.util.find_spec("sphinx") is None:
        pytest.skip("sphinx is not installed (pip install -e '.[docs]' or '.[test]')")
    out = tmp_path_factory.mktemp("docs")
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore::FutureWarning"}
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(out / "doctrees"), str(DOCS), str(out / "html")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr, out / "html"


def test_sphinx_build_has_no_warnings(built_docs):
    returncode, output, html = built_docs
    assert returncode == 0, f"sphinx-build -W failed:\n{output[-6000:]}"
    assert (html / "index.html").is_file()


def test_api_reference_covers_every_public_name(built_docs):
    """Every name in the public ``__all__`` lists is in the built inventory (objects.inv)."""
    returncode, output, html = built_docs
    assert returncode == 0, output[-3000:]
    documented = _inventory_names(html / "objects.inv")
    api = _load_public()
    paths = api.canonical_paths()
    missing = []
    for mod_name in api.API_MODULES:
        module = api.import_public(mod_name)
        if module is None:
            continue
        for name in api.public_names(module):
            obj = getattr(module, name)
            if paths.get(id(obj), f"{mod_name}.{name}") not in documented:
                missing.append(f"{mod_name}.{name}")
    assert not missing, f"public names missing from the API reference: {missing}"
    assert not api.UNAVAILABLE, f"public modules that do not import: {api.UNAVAILABLE}"


def _public_docstring_tests():
    api = _load_public()
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = []
    for path in sorted(api.canonical_paths().values()):
        mod_name, name = path.rsplit(".", 1)
        obj = getattr(importlib.import_module(mod_name), name)
        if not (isinstance(obj, type) or callable(obj)):
            continue
        home = sys.modules[obj.__module__]
        tests += [(path, t) for t in finder.find(obj, path, module=home) if t.examples]
    return tests


_DOCTESTS = _public_docstring_tests()


@pytest.mark.parametrize("path,test", _DOCTESTS, ids=[t.name for _, t in _DOCTESTS])
def test_docstring_examples(path, test, single_thread):
    """The ``Example:`` sections the API reference shows are run as doctests."""
    failures: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    torch.manual_seed(0)
    result = runner.run(test, out=failures.append)
    assert result.failed == 0, "".join(failures)


GUIDE_PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)


def _python_blocks(page: Path) -> str:
    """The page's ```python fences as one script whose line numbers are the page's.

    Everything outside those fences becomes an empty line; ``{code-block}`` directives (for
    code that needs a GPU or a package the tests do not install) are not run.
    """
    lines, inside = [], False
    for line in page.read_text().splitlines():
        if not inside and line.strip() == "```python":
            inside = True
            lines.append("")
        elif inside and line.strip() == "```":
            inside = False
            lines.append("")
        else:
            lines.append(line if inside else "")
    return "\n".join(lines)


@pytest.mark.parametrize("page", GUIDE_PAGES,
                         ids=[p.relative_to(DOCS).as_posix() for p in GUIDE_PAGES])
def test_guide_snippets_run(page, single_thread, monkeypatch, tmp_path):
    """The ```python blocks of each Markdown page run, in order, as one script."""
    code = _python_blocks(page)
    if not code.strip():
        pytest.skip(f"{page.name} has no python blocks")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(page), "exec"), {"__name__": "__docs__"})


@pytest.mark.parametrize("limit,text", [(100, "100 bytes"), (3 * 1024, "3.00 KiB"),
                                        (5 << 20, "5.00 MiB"), (7 << 30, "7.00 GiB")])
def test_memory_budget_message_names_a_readable_unit(limit, text):
    """The message of a refused allocation prints the limit in a unit that shows it (not
    "0.00 GiB" for a small ``max_bytes``), and the need in the same style."""
    from curvop._checks import check_fits
    from curvop.errors import MemoryBudgetError

    shape = (limit // 8 + 1,)  # float64: 8 bytes more than the limit
    with pytest.raises(MemoryBudgetError) as info:
        check_fits(shape, torch.float64, torch.device("cpu"), "H", max_bytes=limit)
    message = str(info.value)
    assert f"the {text} allowed by max_bytes" in message, message
    assert "0.00 " not in message, message


def test_unsupported_kron_suggests_a_class_that_has_it():
    """``TorchHessian.kron`` points to the classes whose ``kron`` exists, not to itself."""
    import curvop
    from curvop.errors import NotSupportedError

    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(NotSupportedError) as info:
        curvop.TorchHessian(model, "classification").kron(x, y, 4)
    suggestion = str(info.value).split("; use ", 1)[1]
    assert "TorchHessian" not in suggestion and "TorchGGN" in suggestion, str(info.value)
    for name in ("TorchGGN", "TorchEF"):
        loss, K = getattr(curvop, name)(model, "classification").kron(x, y, 4)
        assert K.shape == (8, 8)
