import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitdemo.backends import Model, Prediction, crop_box, load_model
from vitdemo.catalog import DEFAULT_SCRATCH, ModelCache, ModelUnavailable, list_models
from vitdemo.images import ImageError

EXAMPLES = __import__('conftest').ROOT / 'examples'


def test_list_models_puts_the_scratch_default_first_and_offers_every_backend(weights_dir, tmp_path):
    names = list_models(weights_dir)
    assert names[0] == DEFAULT_SCRATCH
    assert {'timm/vit_tiny_patch16_224', 'timm/vit_small_patch16_224', 'timm/vit_base_patch16_224',
            'timm/deit_small_patch16_224', 'ours/vit_tiny_patch16_224'} <= set(names)
    # timm weight files kept for offline use are not scratch models
    assert not any(n.startswith('scratch/vit_tiny') for n in names)
    assert not any(n.startswith('scratch/') for n in list_models(tmp_path))


def test_timm_backend_loads_a_local_safetensors_file_and_reads_attention(weights_dir):
    model = load_model('timm/vit_tiny_patch16_224', weights_dir)
    pred = model.predict(str(EXAMPLES / 'cat.jpg'), top_k=3)
    assert isinstance(pred, Prediction)
    assert len(pred.top_k) == 3 and all(label in model.classes for label, _ in pred.top_k)
    probs = [p for _, p in pred.top_k]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    assert pred.attentions.shape == (12, 3, 197, 197) and pred.attentions.dtype == torch.float32
    torch.testing.assert_close(pred.attentions.sum(-1), torch.ones(12, 3, 197))
    assert pred.grid == (14, 14) and pred.num_prefix_tokens == 1
    assert len(model.classes) == 1000 and model.classes[281] == 'tabby'
    assert model.data_config['input_size'] == (3, 224, 224)
    # fused attention is back on after the read-out, so a plain forward stays fast
    assert all(m.fused_attn for m in model.module.modules() if hasattr(m, 'fused_attn'))


def test_our_code_on_timm_weights_predicts_what_timm_predicts(weights_dir):
    image = Image.open(EXAMPLES / 'coffee.jpg')
    theirs = load_model('timm/vit_tiny_patch16_224', weights_dir).predict(image, top_k=5)
    ours = load_model('ours/vit_tiny_patch16_224', weights_dir).predict(image, top_k=5)
    assert [label for label, _ in ours.top_k] == [label for label, _ in theirs.top_k]
    np.testing.assert_allclose([p for _, p in ours.top_k], [p for _, p in theirs.top_k], atol=1e-5)
    torch.testing.assert_close(ours.attentions, theirs.attentions, atol=1e-5, rtol=0)


def test_distilled_deit_has_two_prefix_tokens_in_timm_code_and_ours(weights_dir):
    image = np.zeros((50, 80, 3), np.uint8)
    theirs = load_model('timm/deit_small_distilled_patch16_224', weights_dir).predict(image)
    ours = load_model('ours/deit_small_distilled_patch16_224', weights_dir).predict(image)
    assert theirs.num_prefix_tokens == ours.num_prefix_tokens == 2 and theirs.attentions.shape == (12, 6, 198, 198)
    torch.testing.assert_close(ours.probs, theirs.probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.attentions, theirs.attentions, atol=1e-5, rtol=0)


def test_scratch_checkpoint_by_name_and_by_path(weights_dir):
    by_name = load_model(DEFAULT_SCRATCH, weights_dir)
    by_path = load_model(weights_dir / 'vit_cifar10.safetensors')
    assert by_name.classes[3] == 'cat' and 'validation accuracy' in by_name.description
    image = Image.new('RGB', (64, 48), (10, 200, 30))
    a, b = by_name.predict(image, top_k=10), by_path.predict(image, top_k=10)
    assert a.top_k == b.top_k and len(a.top_k) == 10
    assert a.attentions.shape == (2, 4, 17, 17) and a.grid == (4, 4)
    assert by_name.data_config['mean'] == (0.49, 0.48, 0.45)


def test_missing_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(ModelUnavailable, match='no trained weights for scratch/vit_cifar10.*python -m vitdemo.train'):
        load_model(DEFAULT_SCRATCH, tmp_path)
    start = time.perf_counter()
    with pytest.raises(ModelUnavailable, match=r'Hugging Face Hub.*save it as .*vit_small_patch16_224.safetensors'):
        load_model('timm/vit_small_patch16_224', tmp_path)
    assert time.perf_counter() - start < 5  # offline, the answer comes at once, not after retries
    with pytest.raises(ModelUnavailable, match='unknown model'):
        load_model('timm/resnet50', tmp_path)


def test_a_corrupt_local_weight_file_is_refused(tmp_path):
    (tmp_path / 'vit_tiny_patch16_224.safetensors').write_bytes(b'\x80\x04not safetensors')
    with pytest.raises(ModelUnavailable, match='not usable as weights for vit_tiny_patch16_224'):
        load_model('timm/vit_tiny_patch16_224', tmp_path)


def test_crop_box_is_the_region_the_transform_keeps(weights_dir):
    model = load_model('timm/vit_tiny_patch16_224', weights_dir)  # crop_pct 0.9 at 224: resize to 248, crop 224
    y, x = np.mgrid[0:300, 0:500]
    image = Image.fromarray(np.stack([x / 2, y / 1.2, (x + y) / 3.2], -1).astype(np.uint8))  # smooth ramps
    left, top, right, bottom = crop_box(image.size, model.data_config)
    assert right - left == pytest.approx(bottom - top) == pytest.approx(300 * 224 / 248)
    assert (left + right) / 2 == 250 and (top + bottom) / 2 == 150
    by_hand = image.crop((round(left), round(top), round(right), round(bottom))).resize((224, 224))
    seen = (model.transform(image) * 0.5 + 0.5).permute(1, 2, 0).numpy() * 255  # undo the (0.5, 0.5) normalisation
    assert np.abs(seen - np.asarray(by_hand, np.float32)).mean() < 2.0


def test_predict_refuses_bad_input_clearly(weights_dir, tmp_path):
    model = load_model(DEFAULT_SCRATCH, weights_dir)
    bad = tmp_path / 'x.png'
    bad.write_text('not an image')
    with pytest.raises(ImageError, match='not an image format'):
        model.predict(str(bad))
    with pytest.raises(ValueError, match='top_k'):
        model.predict(Image.new('RGB', (8, 8)), top_k=0)


def test_model_cache_loads_once_and_keeps_the_most_recent(weights_dir, monkeypatch):
    import vitdemo.backends as backends
    loads = []
    real = backends.load_model
    monkeypatch.setattr(backends, 'load_model', lambda name, d=None: loads.append(name) or real(name, d))
    cache = ModelCache(max_models=1, weights_dir=weights_dir)
    scratch_file = str(weights_dir / 'vit_cifar10.safetensors')  # a checkpoint is loaded by its file
    first = cache.get(DEFAULT_SCRATCH)
    assert cache.get(DEFAULT_SCRATCH) is first and loads == [scratch_file] and first.name == DEFAULT_SCRATCH
    assert isinstance(cache.get('timm/vit_tiny_patch16_224'), Model)
    assert not cache.has(DEFAULT_SCRATCH) and cache.has('timm/vit_tiny_patch16_224')
    cache.get(DEFAULT_SCRATCH)
    assert loads == [scratch_file, 'timm/vit_tiny_patch16_224', scratch_file]


def test_requests_for_a_model_being_loaded_wait_for_that_load_and_no_other(weights_dir, monkeypatch):
    """A model picked and Predict pressed at once: one load, one copy, while other models answer meanwhile;
    a load that fails is tried again by the next request."""
    import threading
    import vitdemo.backends as backends
    real, loads, loading, release = backends.load_model, [], threading.Event(), threading.Event()

    def slow_load(name, d=None):
        loads.append(name)
        if name == 'timm/vit_tiny_patch16_224':
            loading.set()
            release.wait(30)
            if loads.count(name) == 1:
                raise ModelUnavailable('the first download failed')
        return real(name, d)

    monkeypatch.setattr(backends, 'load_model', slow_load)
    cache = ModelCache(weights_dir=weights_dir)
    got = []

    def ask():
        try:
            got.append(cache.get('timm/vit_tiny_patch16_224'))
        except ModelUnavailable as e:
            got.append(str(e))

    first = threading.Thread(target=ask)
    first.start()
    assert loading.wait(30)
    waiting = [threading.Thread(target=ask) for _ in range(2)]
    for t in waiting:
        t.start()
    assert cache.get(DEFAULT_SCRATCH).name == DEFAULT_SCRATCH  # not held up by the load under way
    time.sleep(0.2)
    release.set()
    for t in [first, *waiting]:
        t.join(30)
    assert got[0] == 'the first download failed'
    assert isinstance(got[1], Model) and got[2] is got[1] and cache.get('timm/vit_tiny_patch16_224') is got[1]
    assert loads.count('timm/vit_tiny_patch16_224') == 2  # the failed load, then one for both waiting


def test_the_package_exports_the_public_api(weights_dir):
    import vitdemo
    assert vitdemo.list_models(weights_dir)[0] == DEFAULT_SCRATCH
    model = vitdemo.load_model(weights_dir / 'vit_cifar10.safetensors')
    assert isinstance(model, vitdemo.Model) and isinstance(model.predict(np.zeros((8, 8, 3))), vitdemo.Prediction)


def test_the_hub_ids_written_out_are_timms_own():
    import timm
    from vitdemo.catalog import HUB_IDS, TIMM_ARCHS
    assert HUB_IDS == {arch: timm.models.get_pretrained_cfg(arch).hf_hub_id for arch in TIMM_ARCHS}


def test_the_app_builds_its_page_without_torch_timm_figures_or_ipython_or_writing_gradios_type_stubs():
    # each costs half a second to two seconds of the start; they are imported where a model, an augmentation or a
    # figure first needs them (IPython, where it is installed, by nothing the server does). Torch stays out
    # although the page's lists, method choices and forms come from the package: from its torch-free modules
    import subprocess
    import sys
    code = ('import sys, app, gradio.component_meta as meta, vitdemo.lazy as lazy; app.create_demo(); '
            'print(sorted({"torch", "timm", "torchvision", "matplotlib.figure", "IPython"} & set(sys.modules)), '
            'meta.create_or_modify_pyi is lazy._no_stubs)')
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout.strip().splitlines()[-1] == '[] True', done.stderr[-2000:]


def test_gradio_imported_without_its_type_stubs_still_makes_working_components(tmp_path):
    # a component class made after the hook is a whole component: its events wired, its stub never touched
    import os
    import subprocess
    import sys
    code = """
from vitdemo.lazy import lean_gradio_import
lean_gradio_import()
import gradio as gr
import gradio.component_meta as meta
class Probe(gr.Textbox):
    pass
with gr.Blocks() as demo:
    box = Probe()
    box.change(lambda x: x, box, box)
print(meta.create_or_modify_pyi.__module__, len(demo.fns))
"""
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, 'PYTHONPATH': str(Path(__file__).resolve().parent.parent)})
    assert done.stdout.strip().splitlines()[-1] == 'vitdemo.lazy 1', done.stderr[-2000:]


@pytest.mark.parametrize('in_ipython', [False, True])
def test_a_server_process_never_imports_ipython_and_a_notebook_keeps_gradios_magics(in_ipython):
    pytest.importorskip('IPython')  # where it is not installed, gradio never imports it
    import subprocess
    import sys
    code = f"""
import sys
{'import IPython' if in_ipython else ''}
from vitdemo.lazy import lean_gradio_import
lean_gradio_import()
import gradio as gr
import gradio.ipython_ext as ext
with gr.Blocks() as demo:  # building the page asks IPython whether it runs in Colab
    gr.Markdown('hello')
try:
    import IPython.core.magic
    importable = True
except ModuleNotFoundError:
    importable = False
print(importable, hasattr(ext, 'register_cell_magic'))
"""
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout.strip().splitlines()[-1] == f'{in_ipython} {in_ipython}', done.stderr[-2000:]


LATE = ('timm', 'torchvision', 'captum', 'pytorch_grad_cam')  # imported where first needed


def test_a_module_imported_before_does_not_wait_for_another_threads_import():
    # the server's warm-up imports the explanation libraries for seconds: a prediction meanwhile, whose modules
    # are in already, must not queue behind it
    import threading
    from vitdemo import lazy
    lazy.late_import('json')
    importing, done, got = threading.Event(), threading.Event(), []

    def warm_up():
        with lazy._IMPORTING:  # as an import in progress holds it
            importing.set()
            done.wait(10)
    holder = threading.Thread(target=warm_up)
    holder.start()
    importing.wait(10)
    asker = threading.Thread(target=lambda: got.append(lazy.late_import('json')))
    asker.start()
    asker.join(2)
    done.set()
    holder.join()
    assert got and got[0].__name__ == 'json'


def test_two_first_requests_at_once_import_timm_and_torchvision_one_at_a_time():
    # their modules import one another: two threads importing them at once (two visitors' first requests on
    # a fresh server) each find the other's module half made, and one fails with ImportError
    import subprocess
    import sys
    code = '''
import threading
from vitdemo.lazy import late_import
names = ['timm.data', 'timm.utils', 'torchvision.transforms.v2', 'torchvision.models.resnet']
errors, start = [], threading.Barrier(len(names))
def load(name):
    start.wait()
    try:
        late_import(name)
    except ImportError as e:
        errors.append(repr(e))
threads = [threading.Thread(target=load, args=(name,)) for name in names]
[t.start() for t in threads]
[t.join() for t in threads]
print(errors)
'''
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout.strip().splitlines()[-1] == '[]', done.stdout[-2000:] + done.stderr[-2000:]
    # and every late import in the package goes through late_import
    package = Path(__file__).resolve().parent.parent / 'vitdemo'
    for path in package.rglob('*.py'):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            words = line.split()
            if line.startswith((' ', '\t')) and words[:1] in (['import'], ['from']) and len(words) > 1:
                assert words[1].split('.')[0] not in LATE, f'{path.name}:{number}: {line.strip()}'
