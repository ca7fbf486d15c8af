"""The package's shape: imports run one way (no cycle, no layer importing a layer above it), and modules stay small.

The import graph is read from the source with ``ast`` (module-level and function-level relative imports both
count, since a function-level import is a dependency deferred, not removed), so the test needs no import side
effects and names the offending import.
"""
import ast
import importlib
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'timm_hff'
MAX_LINES = 400
MAX_FUNCTION_LINES = 80

# Bottom to top; a module may import its own layer and the layers below it, never one above it. Names are module
# names under timm_hff ('hub' covers timm_hff/hub/*); the most specific entry that prefixes a module's name is its
# layer. A module in no layer counts as an entry point (the top layer): it may import anything, and nothing may
# import it.
LAYERS = [
    ('version', '_config', '_lazy', '_names', '_io', 'core', 'data', '_pretrained', '_inputs', '_timm_cfg'),
    ('_meta', 'heads', '_stages', '_cuts', '_probe', '_small_input', '_exit_rule', '_stem_ckpt',
     '_exit_search', '_exit_guarantee'),
    ('_profile', '_adaptive', '_local_losses', '_prediction', '_model', '_step_cost', '_balance', '_compile'),
    ('_builder', '_exit', '_compile', '_features', 'model'),
    ('hub',),
    ('_factory', '_registry', 'factory'),
    ('baselines',),
    # the training package, bottom to top: registries; settings; the run's parts; methods; the run sequence; its
    # engines (Accelerate, stage-parallel); the schedules (which name their engine); the CLI and the package face
    ('train.registry', 'train.errors', 'train.graph_settings'),
    ('train.checks', 'train.help'),
    ('train.config',),
    ('train.checkpoint', 'train.state_files', 'train.metrics', 'train.evaluate', 'train.exits', 'train.optim',
     'train.targets', 'train.data'),
    ('train.methods',),
    ('train.run',),
    ('train.engines',),   # Accelerate, stage-parallel, CUDA graphs: none imports a schedule
    ('train.schedules',),
    ('train',),
    ('cli',),   # the console scripts
    # deprecated aliases of the CLIs' old paths, the timm hook; '' is the package's own __init__ (the public face)
    ('hub_cli', 'seed_cli', 'validate', 'predict', 'train.cli', 'train.trainer', 'train.steps', 'train.cuda_graphs',
     'train.__main__', '_timm_hook', ''),
]

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix('').parts)
    if parts[-1] == '__init__':
        parts = parts[:-1]
    return '.'.join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def _resolve(importer: str, is_package: bool, level: int, target: str, names: List[str], known: Set[str]) -> Set[str]:
    """The timm_hff modules a relative ``from ... import`` names (a name that is a submodule counts as that one)."""
    base = importer.split('.') if importer else []
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (level - 1)] if level > 1 else base
    module = '.'.join(base + ([target] if target else []))
    out = set()
    for name in names:
        sub = f'{module}.{name}' if module else name
        out.add(sub if sub in known else module)
    return {m for m in out if m in known}


def import_graph() -> Dict[str, Set[str]]:
    """module -> the timm_hff modules it imports, relative (``from .x``) or absolute (``timm_hff.x``)."""
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                edges |= _resolve(name, path.name == '__init__.py', node.level, node.module or '',
                                  [a.name for a in node.names], known)
            elif isinstance(node, ast.ImportFrom) and (node.module or '').split('.')[0] == 'timm_hff':
                rel = node.module.split('.', 1)[1] if '.' in node.module else ''
                edges |= {m for m in ({f'{rel}.{a.name}'.strip('.') for a in node.names} | {rel}) if m in known}
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split('.')[0] == 'timm_hff':
                        rel = alias.name.split('.', 1)[1] if '.' in alias.name else ''
                        edges |= {rel} & known
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle as a list of modules (first == last), or [] if the graph is acyclic."""
    state: Dict[str, int] = {}      # 1: on the current path, 2: done
    stack: List[str] = []

    def visit(m: str) -> List[str]:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def layer_of(module: str) -> int:
    """The layer of the most specific entry that names the module or a package above it."""
    matches = [(len(prefix), i) for i, layer in enumerate(LAYERS) for prefix in layer
               if module == prefix or (prefix and module.startswith(prefix + '.'))]
    return max(matches)[1] if matches else len(LAYERS) - 1


def _dotted(module: str) -> str:
    return 'timm_hff' + (f'.{module}' if module else '')


def test_graph_reader_sees_both_kinds_of_import():
    graph = import_graph()
    assert 'core' in graph['heads._prototype']                  # module level: from ..core import HFFConfig
    assert 'factory' in graph['baselines.ff']                   # function level: from ..factory import create_model
    assert 'hub' in graph['_factory'] and 'hub._errors' in graph['hub._format'] and 'core' in graph['hub._format']
    assert '_model' in graph['model'] and '_config' in graph['_stages']   # a face's edges, a same-package import
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': set()}) == []


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert not cycle, 'import cycle: ' + ' -> '.join(_dotted(m) for m in cycle)


def test_layers_import_downward_only():
    upward = [f"{_dotted(m)} imports {_dotted(n)}" for m, edges in sorted(import_graph().items())
              for n in sorted(edges) if layer_of(n) > layer_of(m)]
    assert not upward, 'imports against the layering (bottom to top: ' + ' -> '.join(
        '/'.join(p or '__init__' for p in layer) for layer in LAYERS) + '):\n' + '\n'.join(upward)


def _packages() -> Set[str]:
    return {_module_name(p) for p in PACKAGE.rglob('__init__.py')}


def private_crossings(graph: Dict[str, Set[str]], packages: Set[str]) -> List[str]:
    """Imports of a private module (``_name``) from outside its own package. A subpackage counts as outside, the root
    included: ``hub``, ``train`` and the rest reach the root's core through its faces (``core``, ``model``,
    ``factory``), so the files behind a face can move without touching them."""
    def package(m):
        return m if m in packages else m.rpartition('.')[0]
    return [f'{_dotted(m)} imports {_dotted(n)}' for m, edges in sorted(graph.items()) for n in sorted(edges)
            if n.rpartition('.')[2].startswith('_') and n not in packages and package(n) != package(m)]


def test_private_modules_are_imported_only_inside_their_package():
    crossings = private_crossings(import_graph(), _packages())
    assert not crossings, ('private modules imported from outside their package (import the package or face that '
                           're-exports the name):\n' + '\n'.join(crossings))


def test_the_boundary_rule_can_fail():
    packages = {'', 'hub', 'train', 'train.methods'}
    graph = {'hub._load': {'_model', 'model', 'hub._format'}, 'train.methods.bp': {'train._x', 'train.methods._y'},
             '_factory': {'hub', '_model'}, 'train': {'train._x'}}
    assert private_crossings(graph, packages) == ['timm_hff.hub._load imports timm_hff._model',
                                                  'timm_hff.train.methods.bp imports timm_hff.train._x']


def size_problems(text: str) -> List[str]:
    """What breaks the size rule in a module's source: its length, and each function over the limit."""
    problems = []
    if text.count('\n') > MAX_LINES:
        problems.append(f'{text.count(chr(10))} lines (> {MAX_LINES}): split it by concept')
    problems += [f'{n.name} has {n.end_lineno - n.lineno + 1} lines (> {MAX_FUNCTION_LINES}): split it into its steps'
                 for n in ast.walk(ast.parse(text))
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    return problems


@pytest.mark.parametrize('name', sorted(_modules()))
def test_module_size(name):
    """No module over MAX_LINES and no function over MAX_FUNCTION_LINES, and no list of exceptions."""
    problems = size_problems(_modules()[name].read_text(encoding='utf-8'))
    assert not problems, f'{_modules()[name]}: ' + '; '.join(problems)


def test_the_size_rule_can_fail():
    body = '\n'.join(f'    x{i} = {i}' for i in range(MAX_FUNCTION_LINES))
    assert size_problems(f'def f():\n{body}\n') and not size_problems(f'def f():\n{body[:-12]}\n')
    assert size_problems('x = 1\n' * (MAX_LINES + 1)) and not size_problems('x = 1\n' * MAX_LINES)


def test_every_module_declares_its_public_names():
    """``__all__`` in every module, naming only what the module has (defined, imported or lazily exported)."""
    problems = []
    for name, path in sorted(_modules().items()):
        tree = ast.parse(path.read_text())
        declared = None
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == '__all__'
                                                    for t in node.targets):
                declared = node
            elif isinstance(node, ast.ImportFrom) and any(a.name == '__all__' for a in node.names):
                declared = node   # a deprecated alias re-exports its new home's
        if declared is None:
            problems.append(f'{_dotted(name)}: no __all__')
            continue
        if name.endswith('__main__'):   # running it would start the CLI
            continue
        module = importlib.import_module(_dotted(name))
        for entry in module.__all__:
            if not hasattr(module, entry):
                problems.append(f'{_dotted(name)}: __all__ names {entry!r}, which it does not have')
    assert not problems, problems


ARCHITECTURE = PACKAGE.parent / 'docs' / 'architecture.md'


def documented_modules(text: str) -> Set[str]:
    """The files and folders of the module tree in docs/architecture.md (its '## Modules' section), as paths: an
    entry's folder is the nearest less indented folder line above it."""
    import re
    section = text.split('## Modules', 1)[1].split('\n## ', 1)[0]
    entries, stack = set(), []
    for line in section.splitlines():
        m = re.match(r'^( {4,})([\w.]+/?|[\w]+(?:/[\w]+)+/)(?:\s|$)', line)
        if not m:
            continue
        indent, name = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (stack[-1][1] if stack and indent > 4 else '') + name
        stack.append((indent, path))
        entries.add(path)
    return {e for e in entries if e.startswith('timm_hff/')}


def test_architecture_lists_every_module_both_ways():
    """docs/architecture.md's module tree and the package hold the same modules: a module added, moved or removed
    without its line (or a line left for a module that is gone) fails here."""
    listed = documented_modules(ARCHITECTURE.read_text())
    code = {str(p.relative_to(PACKAGE.parent)).replace('\\', '/') for p in PACKAGE.rglob('*.py')}
    folders = {str(p.relative_to(PACKAGE.parent)) + '/' for p in PACKAGE.rglob('__init__.py') for p in [p.parent]}
    unlisted = sorted(m for m in code if not m.endswith('__init__.py') and m not in listed)
    gone = sorted(e for e in listed if e not in code and e not in folders)
    assert not unlisted and not gone, (f'modules missing from docs/architecture.md: {unlisted}; listed there but '
                                       f'not in the package: {gone}')


def test_the_architecture_reader_can_fail():
    text = '## Modules\n\n    timm_hff/\n      _a.py   x\n      pkg/    y\n        _b.py   z\n\n## Layers\n'
    assert documented_modules(text) == {'timm_hff/', 'timm_hff/_a.py', 'timm_hff/pkg/', 'timm_hff/pkg/_b.py'}


def settings_named(text: str, names: List[str]) -> Set[str]:
    """The settings a module's source names as an attribute (``cfg.lr``) or a string (``'lr'``)."""
    import re
    return {n for n in names if re.search(r"""(\.|['"])""" + re.escape(n) + r'\b', text)}


def test_a_setting_is_declared_in_one_place():
    """Each TrainConfig setting carries its help, group and bounds in its declaration (``train.help.setting``), so no
    other module lists the settings: none names more than 60% of them (a help table or a checks table would)."""
    from dataclasses import fields
    from timm_hff.train.config import TrainConfig
    names = [f.name for f in fields(TrainConfig)]
    over = {str(p.relative_to(PACKAGE)): len(settings_named(p.read_text(), names)) / len(names)
            for p in PACKAGE.rglob('*.py') if p != PACKAGE / 'train' / 'config.py'}
    over = {m: f'{share:.0%}' for m, share in over.items() if share > 0.6}
    assert not over, f'modules that name most of the settings (declare them once, in train/config.py): {over}'
    table = '\n'.join(f"    '{n}': ('Dataset', 'help')," for n in names)   # what a second declaration looks like
    assert len(settings_named(table, names)) == len(names)


@pytest.mark.parametrize('old,new', [('train.trainer', 'train.engines.accelerate.trainer'),
                                     ('train.steps', 'train.engines.accelerate.steps'),
                                     ('train.cuda_graphs', 'train.engines.cuda_graphs')])
def test_a_moved_module_is_its_new_home_with_a_warning(old, new):
    """An old import path gives the very module (so a patch through it reaches the code that runs) and warns."""
    import sys
    import warnings
    sys.modules.pop(_dotted(old), None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        module = importlib.import_module(_dotted(old))
    assert module is importlib.import_module(_dotted(new))
    assert any(issubclass(w.category, DeprecationWarning) and f'moved to {_dotted(new)}' in str(w.message)
               for w in caught)
