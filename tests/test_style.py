"""The house rules CONTRIBUTING.md states, checked on the notebooks and the modules: one public definition per export
cell, one helper per repeated job, no benchmark code in the library's layers."""
import ast, json, re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / 'nbs').glob('[0-9][0-9]_*.ipynb'))
MODULES = sorted(p for p in (ROOT / 'mura_study').glob('*.py') if not p.name.startswith('_'))


def export_cells(nb: Path):
    for c in json.loads(nb.read_text())['cells']:
        src = ''.join(c['source'])
        if c['cell_type'] == 'code' and re.match(r'#\|\s*export\b', src): yield c.get('id'), src


def public_definitions(src: str) -> list[str]:
    "Public functions and classes an export cell defines (a constant may share the cell of the function it configures)."
    body = ast.parse(src).body
    return [n.name for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and not n.name.startswith('_')]


@pytest.mark.parametrize('nb', CHAPTERS, ids=lambda p: p.stem)
def test_one_public_definition_per_export_cell(nb):
    crowded = {cid: names for cid, src in export_cells(nb) if len(names := public_definitions(src)) > 1}
    assert not crowded, f"{nb.name}: export cells with several public definitions: {crowded}"


# Timing, thread counts and figure files each have one helper in core (Timer/seconds, torch_threads, write_figure).
ONE_HELPER = {r'time\.perf_counter\(': 'core.Timer or core.seconds', r'set_num_threads\(': 'core.torch_threads',
              r'\.savefig\(': 'core.write_figure or core.save_figure'}


@pytest.mark.parametrize('mod', [m for m in MODULES if m.stem != 'core'], ids=lambda p: p.stem)
def test_repeated_jobs_go_through_core(mod):
    text = mod.read_text()
    found = [f"{pat} (use {fix})" for pat, fix in ONE_HELPER.items() if re.search(pat, text)]
    assert not found, f"{mod.name}: {found}"


def test_library_layers_import_no_benchmark_code():
    "Only the command line reaches the benchmarks chapter; no library module imports it."
    for mod in MODULES:
        if mod.stem in ('bench', 'study'): continue
        imports = {n.module for n in ast.walk(ast.parse(mod.read_text())) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {'bench', 'mura_study.bench'} & imports, f"{mod.name} imports the benchmarks chapter"
        assert 'def bench_' not in mod.read_text(), f"{mod.name} defines a benchmark: it belongs in nbs/07_bench.ipynb"


def _imports_of_ours(tree):
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module and (n.level or n.module.startswith('mura_study.')):
            mod = n.module.split('.')[-1]
            if mod != 'mura_study': yield mod, [a.name for a in n.names if a.name != '*']


def _sources():
    for p in [*MODULES, *sorted((ROOT / 'tests').glob('*.py'))]: yield p.name, p.read_text()
    for nb in CHAPTERS:
        for c in json.loads(nb.read_text())['cells']:
            if c['cell_type'] == 'code': yield f"{nb.name}:{c.get('id')}", ''.join(c['source'])


def test_names_are_imported_from_the_module_that_defines_them():
    "`from mura_study.learner import DEFAULT_LR` works (learner star-imports core) but sends a reader astray."
    import importlib
    wrong = []
    for where, src in _sources():
        try: tree = ast.parse(src)
        except SyntaxError: continue  # a cell with IPython magics
        for mod, names in _imports_of_ours(tree):
            defined = set(importlib.import_module(f'mura_study.{mod}').__all__)
            wrong += [f"{where}: {name} from {mod}" for name in names if name not in defined]
    assert not wrong, wrong


def _bound_names(tree) -> set:
    "Every name a module binds anywhere: assignments, definitions, arguments, imports, exception and match names."
    names = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load): names.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): names.add(n.name)
        elif isinstance(n, ast.arg): names.add(n.arg)
        elif isinstance(n, ast.alias): names.add((n.asname or n.name).split('.')[0])
        elif isinstance(n, ast.ExceptHandler) and n.name: names.add(n.name)
        elif isinstance(n, (ast.Global, ast.Nonlocal)): names.update(n.names)
        elif isinstance(n, (ast.MatchAs, ast.MatchStar)) and n.name: names.add(n.name)
    return names


def undefined_names(src: str, namespace: dict) -> set:
    "Names `src` reads that it never binds and that `namespace` (the imported module: star imports included) lacks."
    import builtins
    tree = ast.parse(src)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return used - _bound_names(tree) - set(namespace) - set(dir(builtins))


def test_undefined_names_are_found():
    assert undefined_names("def f(x): return study_frame(x) + len(x)", {}) == {'study_frame'}
    assert undefined_names("from a import b\ndef f(x, *, y=b): return [z for z in x]", {}) == set()


@pytest.mark.parametrize('mod', MODULES, ids=lambda p: p.stem)
def test_every_name_a_module_reads_is_defined(mod):
    "ruff cannot see through `from .core import *`; the imported module can."
    import importlib
    missing = undefined_names(mod.read_text(), vars(importlib.import_module(f'mura_study.{mod.stem}')))
    assert not missing, f"{mod.name} reads names it never defines or imports: {sorted(missing)}"


def test_make_test_executes_every_notebook_once():
    "`make test` nbdev-tests the notebooks its LIBRARY_NOTEBOOKS names; the end-to-end run executes the study's."
    from mura_study import study
    pattern = re.search(r"^LIBRARY_NOTEBOOKS := (.+)$", (ROOT / 'Makefile').read_text(), re.M).group(1)
    pattern = pattern.replace('$$', '$')
    tested = {p.name for p in (ROOT / 'nbs').glob('*.ipynb') if re.search(pattern, p.name)}
    reproduced = {p.name for p in study.chapters()}
    assert tested == {f'{c}.ipynb' for c in study.LIBRARY_CHAPTERS} | {'index.ipynb'}
    assert not tested & reproduced
    assert tested | reproduced == {p.name for p in (ROOT / 'nbs').glob('*.ipynb')}
