"""What a pip user gets: the wheel holds the package, its recipes and the LICENSE, and from an empty folder outside the
source tree, with only the wheel installed, ``hff-train --config fashion_mnist_quick`` runs (a short slice of it).

Slow (about a minute): a wheel build and a training run. The venv sees the machine's site-packages for the heavy
dependencies (torch, timm, ...), but timm_hff itself comes from the wheel (checked: its ``__file__`` is in the venv).
"""
import glob
import os
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp('dist')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', REPO, '--no-deps', '--no-build-isolation', '-w', str(out)],
                   check=True, capture_output=True, timeout=600)
    (path,) = glob.glob(str(out / 'timm_hff-*.whl'))
    return path


def test_the_wheel_holds_the_recipes_and_the_license(wheel):
    from timm_hff.train.config import packaged_recipes
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {os.path.basename(n)[:-5] for n in names if n.startswith('timm_hff/recipes/') and n.endswith('.yaml')}
    assert shipped == set(packaged_recipes()) and 'fashion_mnist_quick' in shipped
    assert any(n.endswith('.dist-info/licenses/LICENSE') or n.endswith('.dist-info/LICENSE') for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith('.dist-info/METADATA'))).decode()
    assert 'License: Apache-2.0' in meta or 'License-Expression: Apache-2.0' in meta
    assert '](docs/' not in meta and '](benchmarks/' not in meta   # no link a package index cannot follow
    assert not any(n.startswith(('tests/', 'benchmarks/')) for n in names)


def test_a_pip_user_runs_the_demo_by_recipe_name(wheel, tmp_path):
    from timm_hff.data import FASHION_MNIST_DIR
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip('the demo reads the dataset-fashion-mnist IDX files')
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages', str(venv)], check=True, timeout=300)
    py, hff_train = str(venv / 'bin' / 'python'), str(venv / 'bin' / 'hff-train')
    subprocess.run([py, '-m', 'pip', 'install', '--no-deps', '--no-index', wheel], check=True, capture_output=True,
                   timeout=300)
    empty = tmp_path / 'empty'
    empty.mkdir()
    where = subprocess.run([py, '-c', 'import timm_hff; print(timm_hff.__file__)'], cwd=empty, check=True,
                           capture_output=True, text=True).stdout.strip()
    assert where.startswith(str(venv)), f'timm_hff came from {where}, not the wheel'
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='')
    done = subprocess.run([hff_train, '--config', 'fashion_mnist_quick', '--epochs', '1', '--train_num_samples', '2048',
                           '--val_num_samples', '500', '--progress', 'false', '--threads', '2'], cwd=empty, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (empty / 'output' / 'fashion_mnist_quick' / 'model' / 'model.safetensors').is_file()
    assert 'test (test): top-1' in done.stdout
    bad = subprocess.run([hff_train, '--config', 'no_such_recipe'], cwd=empty, capture_output=True, text=True)
    assert bad.returncode == 2 and 'fashion_mnist_quick' in bad.stderr.strip().splitlines()[-1]
