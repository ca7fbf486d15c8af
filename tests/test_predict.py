"""``hff-predict``: top-k class names of image files, as the model itself ranks them after timm's eval transform."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import timm_hff
from timm_hff.predict import main as predict_main

LABELS = ['zero', 'one', 'two', 'three']


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = timm_hff.create_model('test_resnet', num_classes=4, in_chans=1, small_input=True, num_stages=2,
                                  check_img_size=28)
    with torch.no_grad():   # distinct prototypes, so the ranking is not a tie
        for head in model.heads:
            head.prototypes.copy_(torch.nn.functional.normalize(torch.randn_like(head.prototypes), dim=-1))
    d = tmp_path_factory.mktemp('m') / 'model'
    timm_hff.save_pretrained(model, d, label_names=LABELS)
    images = tmp_path_factory.mktemp('imgs')
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(images / f'{i}.png')
    (images / 'sub').mkdir()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / 'sub' / 'rgb.jpg')
    (images / 'notes.txt').write_text('not an image')
    return d, images


def test_predicts_what_the_model_ranks_first(saved, tmp_path, capsys):
    d, images = saved
    out = tmp_path / 'p.json'
    assert predict_main([f'local-dir:{d}', str(images), '--top-k', '2', '--results-file', str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    preds = json.loads(out.read_text())['predictions']
    assert len(lines) == len(preds) == 4                              # 3 PNGs + the RGB JPEG in sub/, not notes.txt
    assert [p['file'].rsplit('/', 1)[-1] for p in preds] == ['0.png', '1.png', '2.png', 'rgb.jpg']
    model = timm_hff.create_model(f'local-dir:{d}', pretrained=True).eval()
    from timm.data import create_transform
    from timm_hff.data import resolve_data_config
    cfg = resolve_data_config(model, 1)
    tf = create_transform(**{k: cfg[k] for k in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation')})
    for p, line in zip(preds, lines):
        x = tf(Image.open(p['file']).convert('L'))[None]
        with torch.no_grad():
            prob = model(x).softmax(-1)[0]
        top = prob.topk(2)
        assert [t['index'] for t in p['top']] == top.indices.tolist()
        assert [t['label'] for t in p['top']] == [LABELS[i] for i in top.indices.tolist()]
        assert p['top'][0]['prob'] == pytest.approx(top.values[0].item(), abs=1e-4)
        assert line.startswith(p['file'] + ': ' + LABELS[top.indices[0]])


@pytest.mark.parametrize('what, pattern', [
    ('missing', 'no such file or folder'),
    ('text', 'not a readable image'),
    ('empty', 'no image files'),
    ('model', 'is not a saved model'),
])
def test_bad_inputs_are_one_line(saved, tmp_path, capsys, what, pattern):
    d, images = saved
    model = f'local-dir:{d}'
    arg = dict(missing=str(tmp_path / 'nope.png'), text=str(images / 'notes.txt'), empty=str(tmp_path),
               model=str(images / '0.png'))[what]
    if what == 'model':
        model = 'resnet18'
    assert predict_main([model, arg]) == 2
    err = capsys.readouterr().err.strip()
    assert pattern in err and '\n' not in err and err.startswith('hff-predict: error: ')
