"""The README is a front page and the pages under docs/ hold the rest; check what can be checked without running them.

The README stays short with its install and test commands on its first screen, CI runs the README's test command
verbatim, every link resolves (files and #anchors), every page is reachable from the README, and the pages agree with
their sources: the settings table with ``HFFConfig``, the coverage figures with the coverage run, the benchmark tables
with ``benchmarks/results``, and the README's headline numbers with docs/results.md. (docs/errors.md is checked
against its cases in tests/test_bad_inputs.py.)
"""
import dataclasses
import json
import re
from pathlib import Path

import pytest

from timm_hff import HFFConfig

REPO = Path(__file__).resolve().parents[1]
README = REPO / 'README.md'
DOCS = sorted((REPO / 'docs').glob('*.md'))
MAX_README_LINES = 150
FIRST_SCREEN = 40       # lines
INSTALL_COMMAND = "pip install -e '.[dev]'"
TEST_COMMAND = "pip install -e '.[dev]' && python -m pytest -q"


def _text(path: Path) -> str:
    return path.read_text(encoding='utf-8')


def _commands(text: str):
    """Shell lines of the fenced ```bash blocks, without trailing comments."""
    out = []
    for block in re.findall(r'```bash\n(.*?)```', text, flags=re.S):
        out += [line.split('  #')[0].strip() for line in block.splitlines() if line.strip()]
    return out


def test_readme_is_a_front_page():
    lines = _text(README).splitlines()
    assert len(lines) <= MAX_README_LINES, f'README.md has {len(lines)} lines; move detail into docs/'
    first = _commands('\n'.join(lines[:FIRST_SCREEN]))
    assert INSTALL_COMMAND in first and TEST_COMMAND in first, f'the first {FIRST_SCREEN} lines must hold {first}'


def test_ci_runs_the_readme_test_command_verbatim():
    assert TEST_COMMAND in _commands(_text(README))
    ci = [line.strip() for line in _text(REPO / '.ci' / 'run').splitlines()]
    assert TEST_COMMAND in ci, f'.ci/run must run the README test command as it is written: {TEST_COMMAND}'


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but - and _), spaces to hyphens."""
    text = re.sub(r'[`*]', '', heading.strip().lower())
    return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def _anchors(path: Path):
    return {_slug(m) for m in re.findall(r'^#+ (.+)$', _text(path), flags=re.M)}


def _links(path: Path):
    text = re.sub(r'```.*?```', '', _text(path), flags=re.S)
    return [m for m in re.findall(r'\]\(([^)\s]+)\)', text) if not re.match(r'[a-z]+:', m)]


@pytest.mark.parametrize('page', [README, *DOCS], ids=lambda p: p.name)
def test_links_resolve(page):
    for link in _links(page):
        target, _, anchor = link.partition('#')
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f'{page.name}: link {link!r} points at nothing'
        if anchor:
            assert anchor in _anchors(path), f'{page.name}: link {link!r}: no such heading in {path.name}'


def test_every_page_is_linked_from_the_readme():
    linked = {(README.parent / link.partition('#')[0]).resolve() for link in _links(README)}
    assert DOCS and not [p.name for p in DOCS if p.resolve() not in linked]


def test_settings_table_names_every_hffconfig_field():
    table = _text(REPO / 'docs' / 'method.md')
    missing = [f.name for f in dataclasses.fields(HFFConfig) if f'| `{f.name}`' not in table]
    assert not missing, f'docs/method.md: the settings table lacks {missing}'


def test_coverage_figures_match_the_coverage_run():
    run = json.loads(_text(REPO / 'benchmarks' / 'results' / 'coverage' / 'coverage.json'))
    page = _text(REPO / 'docs' / 'models.md')
    assert f"**{run['wrapped']} of {run['modules']} timm model modules wrap and train ({run['percent']:.1f}%)**" in page
    assert f"timm {run['timm_version']}" in page
    refused = {r['module'] for r in run['rows'] if not r['ok']}
    table = page[page.index('| family |'):]
    listed = set(re.findall(r'^\| ([^|]+) \|', table, flags=re.M)) - {'family', '---'}
    assert {m.strip() for row in listed for m in row.split(',')} == refused


def _stored_results() -> str:
    """Everything the benchmarks and runs stored: tables, JSON, CSV, logs."""
    root = REPO / 'benchmarks' / 'results'
    return '\n'.join(p.read_text(encoding='utf-8', errors='ignore') for p in sorted(root.rglob('*'))
                     if p.suffix in ('.md', '.json', '.csv', '.log', '.txt'))


def _numbers(line: str):
    return re.findall(r'(?<![\w.])\d+\.\d+(?![\w.])', line)


def test_every_figure_of_the_results_page_is_stored():
    """Every number in docs/results.md's tables (whatever the section) was printed or stored by a run or a
    benchmark under benchmarks/results: none is typed in by hand."""
    stored = _stored_results()
    rows = [line for line in _text(REPO / 'docs' / 'results.md').splitlines() if line.startswith('|')]
    missing = [(n, r[:80]) for r in rows for n in _numbers(r) if n not in stored]
    assert rows and not missing, f'docs/results.md figures found in no stored result: {missing[:5]}'


def _run_accuracies() -> set:
    """Every accuracy a stored run or benchmark recorded, as printed to two decimals: the ``top1`` values of run
    metrics (metrics.json, metrics.csv; percent) and benchmark JSON ``accuracy`` values (fractions)."""
    import csv
    found = set()

    def walk(o, key=''):
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, k)
        elif isinstance(o, list):
            for v in o:
                walk(v, key)
        elif isinstance(o, (int, float)) and not isinstance(o, bool):
            if 'top1' in key:
                found.add(f'{o:.2f}')
            elif key.endswith('accuracy') and 0 <= o <= 1:
                found.add(f'{100 * o:.2f}')
    root = REPO / 'benchmarks' / 'results'
    for p in root.rglob('*.json'):
        try:
            walk(json.loads(p.read_text(encoding='utf-8')))
        except ValueError:
            continue
    for p in root.rglob('*metrics.csv'):
        with open(p, newline='') as f:
            for row in csv.DictReader(f):
                found |= {f'{float(v):.2f}' for k, v in row.items() if k and 'top1' in k and v}
    return found


def test_readme_accuracy_figures_are_stored_run_metrics():
    """Every accuracy figure of the README's headline tables is a value some stored run recorded (its metrics.json /
    metrics.csv, or a benchmark's JSON), not a number copied by hand from a page."""
    readme = _text(README)
    section = readme[readme.index('## Headline results'):readme.index('## Documentation')]
    rows = [line for line in section.splitlines() if line.startswith('|') and ('top-1' in line or 'transfer' in line)]
    figures = {n for line in rows for cell in line.split('|')[2:] for n in re.findall(r'\b\d{2}\.\d{2}\b', cell)}
    stored = _run_accuracies()
    assert figures and not sorted(figures - stored), f'README accuracies in no stored run: {sorted(figures - stored)}'


def test_readme_headline_numbers_come_from_the_results_page():
    readme = _text(README)
    section = readme[readme.index('## Headline results'):readme.index('## Documentation')]
    results = _text(REPO / 'docs' / 'results.md')
    numbers = {n for line in section.splitlines() if line.startswith('|')
               for n in re.findall(r'\d[\d,]*\.\d+|\d{3,}[\d,]*', line)}
    assert numbers and not sorted(n for n in numbers if n not in results)


NAV = [('method', 'Method'), ('architecture', 'Architecture'), ('models', 'Models'), ('training', 'Training'),
       ('hub', 'Hub'), ('inference', 'Inference'), ('results', 'Results'), ('errors', 'Errors')]


@pytest.mark.parametrize('page', DOCS, ids=lambda p: p.name)
def test_every_page_has_the_whole_navigation_bar(page):
    """Line 3 of every page: the README, then every page in one order, the current one in bold."""
    assert {n for n, _ in NAV} == {p.stem for p in DOCS}, 'a page was added or removed: update NAV'
    want = ' · '.join(['[README](../README.md)'] + [f'**{t}**' if n == page.stem else f'[{t}]({n}.md)'
                                                     for n, t in NAV])
    assert _text(page).splitlines()[2] == want


def test_benchmarks_readme_indexes_every_benchmark_and_results_folder():
    """Every benchmark module is in the index with its command, and every results folder says what made it."""
    index = _text(REPO / 'benchmarks' / 'README.md')
    modules = [p.stem for p in (REPO / 'benchmarks').glob('*.py') if not p.stem.startswith('_')]
    scripts = [p.name for p in (REPO / 'benchmarks').glob('*.sh')]
    missing = [m for m in modules if f'python -m benchmarks.{m.replace("accuracy_recipe", "accuracy --recipe")}'
               not in index] + [s for s in scripts if f'benchmarks/{s}' not in index]
    folders = [p.name for p in (REPO / 'benchmarks' / 'results').iterdir() if p.is_dir()]
    unlisted = [f for f in folders if f'`{f}/`' not in index]
    assert not missing and not unlisted, f'benchmarks/README.md lacks {missing + unlisted}'


def test_hub_page_names_every_hub_module():
    page = _text(REPO / 'docs' / 'hub.md')
    hub = sorted(p.stem for p in (REPO / 'timm_hff' / 'hub').glob('_*.py') if p.stem != '__init__')
    assert not [m for m in hub if f'`{m}`' not in page], 'docs/hub.md leaves out some of timm_hff/hub/'
    assert '_atomic' not in re.sub(r'atomic_dir', '', page), 'docs/hub.md names a module that is gone'


def test_the_package_page_works_on_a_package_index():
    """PYPI.md is the wheel's description: no link into the source tree (a package index cannot follow one), and every
    recipe it names by name ships inside the package."""
    from timm_hff.train.config import packaged_recipes
    page = _text(REPO / 'PYPI.md')
    assert not _links(REPO / 'PYPI.md'), 'PYPI.md links into the source tree'
    listed = set(re.findall(r'`([a-z0-9_]+)`', page))
    named = {n for n in listed if re.fullmatch(r'(fashion_mnist|transfer|mnist|cifar|imagenet)\w*', n)}
    shipped = set(packaged_recipes())
    assert 'fashion_mnist_quick' in shipped and named == shipped, (named ^ shipped)
    assert 'readme = "PYPI.md"' in _text(REPO / 'pyproject.toml')
