import io
import re
from dataclasses import asdict
import shutil
import time
import urllib.request
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from gradio.route_utils import delete_files_created_by_app
import huggingface_hub
from gradio_client import Client, handle_file
from PIL import Image

from app import MAX_UPLOAD, create_demo
from conftest import GRADIO_TEMP_DIR, ROOT
from vitdemo.app_process import free_port, running_app
from vitdemo.backends import load_model
from vitdemo.catalog import TIMM_ARCHS, ModelCache
from vitdemo.policy import ServerPolicy
from vitdemo.store import ModelStore
from vitdemo.train_form import SMALL_PRESET, TRAIN_PRESETS, TrainForm, default_preset
from vitdemo.training_job import Snapshot, TrainingJob


def connect(port: int, downloads: Path) -> Client:
    """A client as on another machine: what it downloads stays out of the server's cache folder."""
    return Client(f'http://127.0.0.1:{port}/', verbose=False, download_files=str(downloads))


@pytest.fixture(scope='module')
def client(weights_dir, tmp_path_factory):
    demo = create_demo(ModelCache(weights_dir=weights_dir))
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name='127.0.0.1', server_port=port, quiet=True,
                max_file_size=MAX_UPLOAD)
    try:
        client = connect(port, tmp_path_factory.mktemp('downloads'))
        client.demo, client.demo_weights = demo, weights_dir
        yield client
    finally:
        demo.close()


def test_the_web_app_is_built_at_launch_alone_and_other_threads_build_theirs(weights_dir):
    # Gradio would build (and throw away) three FastAPI apps before the one `launch` serves; the page the
    # served app answers with is covered by the client fixture's tests
    import threading
    from gradio.routes import App
    from vitdemo.lazy import app_built_at_launch
    built = []
    demo = create_demo(ModelCache(weights_dir=weights_dir))
    with app_built_at_launch():
        with gr.Blocks() as here:
            gr.Markdown('here')
        meanwhile = threading.Thread(target=lambda: built.append(gr.Blocks().app))
        meanwhile.start()
        meanwhile.join()
    with gr.Blocks() as after:
        gr.Markdown('after')
    assert demo.app is None and here.app is None
    assert isinstance(built[0], App) and isinstance(after.app, App)


@pytest.mark.slow  # the app's own process, through its warm-up
def test_the_started_app_prepares_the_first_requests_once_its_page_answers(tmp_path):
    # `python app.py` as a user starts it: the page first, then, in the background, the imports that the first
    # prediction and the first explanation by a library's method would otherwise wait seconds for; the server
    # keeps answering
    import time
    import urllib.request
    log_path = tmp_path / 'app.log'
    with open(log_path, 'w') as log, running_app(ROOT, {'PYTHONUNBUFFERED': '1'}, log) as (url, _):
        deadline = time.monotonic() + 60
        while 'ready for every explanation method' not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        assert urllib.request.urlopen(url, timeout=10).status == 200
    text = log_path.read_text()
    assert text.index('Running on local URL') < text.index('ready for the first prediction') < \
        text.index('ready for every explanation method'), text[-3000:]


def test_api_contract_without_a_server(weights_dir):
    info = create_demo(ModelCache(weights_dir=weights_dir)).get_api_info()
    params = info['named_endpoints']['/predict']['parameters']
    assert [p['parameter_name'] for p in params[:2]] == ['image', 'model']
    assert not params[0]['parameter_has_default']
    assert all(p['parameter_has_default'] for p in params[1:])
    assert sorted(info['named_endpoints']) == ['/add_model', '/compare', '/inspect', '/predict', '/sanity',
                                               '/stop_training', '/train']
    assert [p['parameter_name'] for p in info['named_endpoints']['/compare']['parameters'][:3]] == \
        ['image', 'model_a', 'model_b']
    # the look from the grid's centre patch is optional: an image is all an API client must send
    inspect = info['named_endpoints']['/inspect']['parameters']
    assert [p['parameter_name'] for p in inspect] == ['image', 'model', 'layer', 'fusion']
    assert [p['parameter_has_default'] for p in inspect] == [False, True, True, True]


def test_predict_through_the_api_for_scratch_and_timm(client):
    labels, gallery, text, _ = client.predict(handle_file(str(ROOT / 'examples' / 'cat.jpg')), 'scratch/vit_cifar10',
                                           api_name='/predict')
    assert len(labels['confidences']) == 5 and labels['label'] == labels['confidences'][0]['label']
    assert len(gallery) == 2 + 2 and 'scratch/vit_cifar10' in text
    labels, gallery, _, _ = client.predict(handle_file(str(ROOT / 'examples' / 'coffee.jpg')),
                                        'timm/vit_tiny_patch16_224', 3, 'max', api_name='/predict')
    assert len(labels['confidences']) == 3 and len(gallery) == 12 + 2


def test_inspect_through_the_api(client):
    rocket = handle_file(str(ROOT / 'examples' / 'rocket.jpg'))
    job = client.submit(rocket, 'timm/vit_tiny_patch16_224', api_name='/inspect')
    grid, costs, *plots, sizes, look, caption, note = job.result()
    assert grid and len(plots) == 5 and all(plots) and note == ''
    assert [row[0] for row in sizes['data']][-1] == 'this model'
    assert [row[2] for row in costs['data']] == [3137, 785, 197, 50]  # tokens at 224 for patches 4, 8, 16, 32
    # beside the grid, where its centre patch looks (no click through the API), in the layer asked for
    assert look and caption.startswith('patch (row 8, column 8) (the centre: click any patch in the grid) in layer 1:')
    # first the figures, the test's frame hidden while it runs, then all of them again with the test
    (first_grid, *_, first_test, _, first_look, _, first_note), *testing, last = job.outputs()
    assert first_grid and first_look and last[-1] == note
    assert first_test == {'__type__': 'update', 'value': None, 'visible': False}
    assert first_note.startswith('**Testing whether the maps can be trusted:**')
    # the test's progress, in the note: Gradio shows no progress bar after a first answer
    assert testing and all(t[-1].startswith('**Testing whether the maps can be trusted (') for t in testing)
    assert '% done)' in testing[-1][-1]
    # a CIFAR-10 model's test takes a moment, not the seconds of a 224 px model's
    *_, caption, _ = client.predict(rocket, 'scratch/vit_cifar10', 2, 'max', api_name='/inspect')
    assert caption.startswith('patch (row 3, column 3) (the centre: click any patch in the grid) in layer 2:')


def test_compare_through_the_api(client):
    a, b, gallery, text = client.predict(handle_file(str(ROOT / 'examples' / 'cat.jpg')), 'scratch/vit_cifar10',
                                         'timm/vit_tiny_patch16_224', api_name='/compare')
    assert len(a['confidences']) == 5 and len(b['confidences']) == 11  # 10 CIFAR-10 classes and "other"
    assert len(gallery) == 2 * 2 + 2 and 'IoU' in text


def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(client, tmp_path):
    fake = tmp_path / 'photo.jpg'
    fake.write_text('this is not a jpeg')
    with pytest.raises(Exception, match='not an image format this app can read'):
        client.predict(handle_file(str(fake)), 'scratch/vit_cifar10', api_name='/predict')
    with pytest.raises(Exception, match='choose a head from 1 to 4'):
        client.predict(handle_file(str(ROOT / 'examples' / 'cat.jpg')), 'scratch/vit_cifar10', 5, 'one head', 9,
                       api_name='/predict')
    with pytest.raises(Exception, match='Hugging Face Hub') as missing:
        client.predict(handle_file(str(ROOT / 'examples' / 'cat.jpg')), 'timm/vit_base_patch16_224',
                       api_name='/predict')
    assert 'weights/vit_base_patch16_224.safetensors' in str(missing.value)
    assert str(client.demo_weights) not in str(missing.value)  # no server paths in messages
    labels, _, _, _ = client.predict(handle_file(str(ROOT / 'examples' / 'cifar_ship.jpg')), 'scratch/vit_cifar10',
                                  api_name='/predict')
    assert labels['confidences']


def hostile_uploads(folder: Path) -> dict[str, tuple[Path, str | None]]:
    """Files a stranger might upload, each with the error expected (None: it must be answered)."""
    folder.mkdir(exist_ok=True)
    files = {}

    def put(name, data, expected):
        (folder / name).write_bytes(data)
        files[name] = (folder / name, expected)

    def encoded(image, fmt, **kw):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **kw)
        return buffer.getvalue()

    noise = np.random.default_rng(0).integers(0, 255, (300, 300, 3), np.uint8)
    put('bomb.png', encoded(Image.new('1', (30000, 30000)), 'PNG', optimize=True), 'too large|too many pixels')
    put('cut.jpg', encoded(Image.fromarray(noise), 'JPEG')[:5000], 'corrupt or truncated')
    put('drawing.svg', b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', 'not an image format')
    put('notes.jpg', b'not a picture at all', 'not an image format')
    put('empty.png', b'', 'empty file')
    put('huge.png', encoded(Image.new('L', (20000, 20000)), 'PNG', optimize=True), 'too large|too many pixels')
    frames = [Image.new('RGB', (64, 48), c) for c in ('red', 'blue')]
    put('animated.gif', encoded(frames[0], 'GIF', save_all=True, append_images=frames[1:]), None)
    put('scan16.tif', encoded(Image.fromarray((noise[:, :, 0].astype(np.uint16) * 257)), 'TIFF'), None)
    put('photo.jpg', encoded(Image.new('RGB', (6000, 4000), (90, 140, 200)), 'JPEG', quality=80), None)
    return files


def files_under(folder: str) -> set[Path]:
    return {p for p in Path(folder).rglob('*') if p.is_file()}


def test_hostile_uploads_are_refused_clearly_and_leave_nothing_on_disk(client, tmp_path):
    """Through the API, as a stranger on a public Space would send them; the server keeps serving, and once
    Gradio's cache clean-up runs (hourly in the app) none of the uploads or outputs is left behind."""
    demo = client.demo
    before = files_under(GRADIO_TEMP_DIR)
    for name, (path, expected) in hostile_uploads(tmp_path).items():
        if expected is None:
            labels, gallery, _, _ = client.predict(handle_file(str(path)), 'scratch/vit_cifar10', api_name='/predict')
            assert labels['confidences'] and gallery, name
        else:
            with pytest.raises(Exception, match=expected):
                client.predict(handle_file(str(path)), 'scratch/vit_cifar10', api_name='/predict')
    assert files_under(GRADIO_TEMP_DIR) - before  # the uploads and drawn outputs did land in the cache ...
    delete_files_created_by_app(demo, None)
    assert not files_under(GRADIO_TEMP_DIR) - before  # ... and every one of them is the app's to delete


def test_a_model_path_typed_into_the_api_is_refused(client, weights_dir, tmp_path):
    outside = tmp_path / 'elsewhere.safetensors'
    shutil.copy(weights_dir / 'vit_cifar10.safetensors', outside)
    for name in [str(outside), str(weights_dir / 'vit_cifar10.safetensors'), 'scratch/../elsewhere']:
        with pytest.raises(Exception, match='choose one from the list|not in the list of choices'):
            client.predict(handle_file(str(ROOT / 'examples' / 'cat.jpg')), name, api_name='/predict')


def test_train_tab_through_the_api_then_predict_with_the_new_model(tmp_path, weights_dir):
    from test_data import make_folder
    from vitdemo.training_job import TrainingJob
    make_folder(tmp_path / 'data', classes=[f'c{i}' for i in range(10)], per_class=12, size=32)
    store = ModelStore(tmp_path / 'weights')
    job = TrainingJob(tmp_path / 'data', store, update_seconds=0.0)
    demo = create_demo(ModelCache(store=store), job=job)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name='127.0.0.1', server_port=port, quiet=True)
    try:
        client = connect(port, tmp_path / 'downloads')
        with pytest.raises(Exception, match='divisible by num_heads'):
            client.predict('bad', embed_dim=100, depth=2, num_heads=3, patch_size=4, minutes=0.05, batch_size=32,
                           api_name='/train')
        status, loss, accuracy, picture, *_ = client.predict(
            'tiny_run', embed_dim=64, depth=2, num_heads=2, patch_size=8, minutes=0.05, batch_size=32,
            api_name='/train')
        assert 'finished after' in status and 'saved as trained/tiny_run' in status
        assert (tmp_path / 'weights' / 'trained' / 'tiny_run.safetensors').exists()
        assert loss['visible'] and loss['value']['columns'] == ['epoch', 'value', 'split'] and loss['value']['data']
        # the latest validation accuracy in the title: a line of one point (the first epoch's) is not drawn
        assert re.fullmatch(r'Accuracy \(validation \d+\.\d% after [\d.]+ epochs?\)', accuracy['title'])
        assert picture
        # the page offers the run's checkpoint to download: a copy this server serves, which loads as it was saved
        checkpoint = tmp_path / 'weights' / 'trained' / 'tiny_run.safetensors'
        offer = next(fn.fn for fn in demo.fns.values() if fn.name == 'offer_download')
        button, note = offer(str(checkpoint))
        assert re.fullmatch(r'Download trained/tiny_run \(\d+\.\d MB\)', button.label) and button.visible
        assert 'load_model("tiny_run.safetensors")' in note.value and button.value['orig_name'] == checkpoint.name
        fetched = tmp_path / 'my_weights' / checkpoint.name  # as the note says: in the weights/ of one's own copy
        fetched.parent.mkdir()
        with urllib.request.urlopen(f'http://127.0.0.1:{port}{button.value["url"]}') as response:
            fetched.write_bytes(response.read())
        assert fetched.read_bytes() == checkpoint.read_bytes()
        assert load_model(fetched).classes == [f'c{i}' for i in range(10)]
        assert 'scratch/tiny_run' in ModelStore(fetched.parent).checkpoint_names()
        Path(button.value['path']).unlink()  # swept from the cache: the next click's answer puts the copy back
        assert Path(offer(str(checkpoint))[0].value['path']).read_bytes() == checkpoint.read_bytes()
        # brought back (on a Space: after a reload), as a browser names a second download of the same file
        shutil.copy(fetched, tmp_path / 'tiny_run (1).safetensors')
        note = client.predict(handle_file(str(tmp_path / 'tiny_run (1).safetensors')), api_name='/add_model')
        assert note == 'Added as `trained/tiny_run_1`: pick it in any model list.'
        (tmp_path / 'evil.safetensors').write_bytes(b'\x80\x04cos\nsystem\n.')  # a pickle, renamed
        with pytest.raises(Exception, match='not a readable safetensors file'):
            client.predict(handle_file(str(tmp_path / 'evil.safetensors')), api_name='/add_model')
        # a fresh client, as after a page reload or from another machine: the new model is usable
        fresh = connect(port, tmp_path / 'downloads')
        for name in ('trained/tiny_run', 'trained/tiny_run_1'):
            labels, *_ = fresh.predict(handle_file(str(ROOT / 'examples' / 'cat.jpg')), name, api_name='/predict')
            assert {c['label'] for c in labels['confidences']} <= {f'c{i}' for i in range(10)}
    finally:
        demo.close()


def test_the_app_starts_without_trained_weights_and_says_so(tmp_path):
    demo = create_demo(ModelCache(weights_dir=tmp_path))
    texts = [b.value for b in demo.blocks.values() if isinstance(b, gr.Markdown)]
    assert any('No trained scratch weights are present' in t for t in texts)
    dropdown = next(b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and b.label == 'Model')
    assert dropdown.value == 'timm/vit_tiny_patch16_224'
    # offline, and no pretrained weights here: the page names the models that need a download
    offline = next(t for t in texts if 'Offline' in t)
    assert 'HF_HUB_OFFLINE' in offline and all(a in offline for a in TIMM_ARCHS)


def test_online_the_page_says_which_models_download_on_first_use(tmp_path, weights_dir, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    texts = [b.value for b in create_demo(ModelCache(weights_dir=weights_dir)).blocks.values()
             if isinstance(b, gr.Markdown)]
    note = next(t for t in texts if 'the first time you pick one' in t)
    assert 'vit_base_patch16_224' in note and 'vit_tiny_patch16_224' not in note  # tiny is saved locally


@pytest.mark.parametrize('bf16', [True, False])
def test_the_train_tab_says_when_this_cpu_trains_in_float32(weights_dir, monkeypatch, bf16):
    # a CPU without bf16 trains 4-5x slower: its visitors are told, not left to wonder at the preset's figures,
    # and the form starts from the smaller model that learns more in ten minutes there
    import vitdemo.train_form as train_form
    monkeypatch.setattr(train_form, 'has_gpu', lambda: False)
    monkeypatch.setattr(train_form, 'cpu_has_bf16', lambda: bf16)
    blocks = create_demo(ModelCache(weights_dir=weights_dir)).blocks.values()
    texts = [b.value or '' for b in blocks if isinstance(b, gr.Markdown)]
    intro = next(t for t in texts if t.startswith('Train a small ViT'))
    assert ('trains in float32' in intro) is not bf16
    cost = next(t for t in texts if 'ViT-Ti/16 computes a probe' in t)  # the fine-tune's figures for this CPU
    assert ('~30 images/s' in cost) is not bf16 and ('~120 images/s' in cost) is bf16
    preset = next(b for b in blocks if isinstance(b, gr.Dropdown) and b.label == 'Preset')
    started = TRAIN_PRESETS[preset.value]
    assert (preset.value == SMALL_PRESET) is not bf16
    assert (started == TrainForm()) is bf16
    embed_dim = next(b for b in blocks if isinstance(b, gr.Number) and b.label == 'Embed dim')
    assert embed_dim.value == started.embed_dim  # the form shows the preset it starts from
    left_out = next(b for b in blocks if isinstance(b, gr.Slider) and b.label.startswith('Share of patch tokens'))
    assert left_out.value == started.patch_drop
    stem = next(b for b in blocks if isinstance(b, gr.Radio) and b.label == 'Tokens from')
    assert stem.value == started.stem  # the float32 preset's stem has no conv at full size
    pooled = next(b for b in blocks if isinstance(b, gr.Radio) and b.label == 'Classify from')
    assert pooled.value == started.global_pool
    optimizer = next(b for b in blocks if isinstance(b, gr.Radio) and b.label == 'Optimizer')
    assert optimizer.value == started.optimizer


def test_the_method_list_follows_what_a_model_is_from_its_config_alone(weights_dir, tmp_path):
    """A ViT trained with a teacher has DeiT's two tokens, whatever its name: it is offered 'tokens' too."""
    import shutil
    from vitdemo.explain import methods_for
    from vitdemo.model import VisionTransformer
    from vitdemo.ui.common import Server
    from vitdemo.weights import save_checkpoint
    from conftest import TINY_CIFAR
    from dataclasses import replace
    weights = tmp_path / 'weights'
    shutil.copytree(weights_dir, weights)
    save_checkpoint(weights / 'taught.safetensors', VisionTransformer(replace(TINY_CIFAR, distilled=True)),
                    [f'c{i}' for i in range(10)], [0.5] * 3, [0.25] * 3)
    server = Server(ModelCache(weights_dir=weights), None, ServerPolicy())
    for name in ('scratch/taught', 'scratch/vit_cifar10', 'timm/deit_small_distilled_patch16_224',
                 'ours/vit_tiny_patch16_224'):
        offered = [m for _, m in server.methods(name, None)]
        assert offered == methods_for(server.model(name, None)), name  # the list agrees with the model loaded
    assert 'tokens' in [m for _, m in server.methods('scratch/taught', None)]
    assert 'tokens' not in [m for _, m in server.methods('scratch/vit_cifar10', None)]


def test_a_model_change_sets_only_what_the_new_model_lacks(weights_dir):
    """The answer to a model change can land after the visitor has picked a method, head or layer: it sends a
    value only where the new model cannot keep the current one, so a pick made meanwhile is not set back."""
    demo = create_demo(ModelCache(weights_dir=weights_dir), policy=ServerPolicy())
    follow = next(fn.fn for fn in demo.fns.values() if fn.name == 'follow_model')
    sent = lambda *args: [c.constructor_args for c in follow(*args, None)]  # noqa: E731

    # ViT-Ti (12 layers, 3 heads) has Grad-CAM, head 2 and layer 5: none of them is sent
    head, method, target, layer, focus = sent('ours/vit_tiny_patch16_224', 2, 'gradcam', 5)
    assert 'value' not in head and 'value' not in method and 'value' not in layer
    assert (head['maximum'], layer['maximum'], focus['visible']) == (3, 12, True)
    assert 'gradcam' in [v for _, v in method['choices']]
    assert target['value'] == ''  # the classes change with the model, so the class to explain is cleared
    # the 2-layer, 4-head scratch model: layer 7 comes down to its last, head 3 stays
    head, method, target, layer, focus = sent('scratch/vit_cifar10', 3, 'gradcam', 7)
    assert 'value' not in head and layer['value'] == 2
    # a method the model lacks (DeiT's token maps on a ViT without a distillation token) falls to its first
    head, method, target, layer, focus = sent('scratch/vit_cifar10', 9, 'tokens', 0)
    assert method['value'] == method['choices'][0][1] != 'tokens' and head['value'] == 4
    # Inspect's layer slider alike
    bound = next(fn.fn for fn in demo.fns.values() if fn.name == 'bound_layer')
    assert 'value' not in bound('ours/vit_tiny_patch16_224', 7, None).constructor_args
    assert bound('scratch/vit_cifar10', 7, None).constructor_args == {'minimum': 1, 'maximum': 2, 'value': 2}


def test_messages_are_escaped_not_read_as_html(weights_dir):
    """A message that contains <...> (urllib's '<urlopen error ...>') reaches the page whole."""
    from vitdemo.ui.common import Server, shows_user_errors
    server = Server(ModelCache(weights_dir=weights_dir), None, ServerPolicy())

    @shows_user_errors(server)
    def fails():
        raise ValueError('downloading failed (<urlopen error [Errno -3] Temporary failure>)')
    with pytest.raises(gr.Error) as refused:
        fails()
    assert refused.value.message == 'downloading failed (&lt;urlopen error [Errno -3] Temporary failure&gt;)'


def test_a_reporter_hands_on_each_share_and_the_works_end():
    from vitdemo.methods import Stopped
    from vitdemo.ui.common import Reporter
    told = []
    reporter = Reporter(told.append)

    def work():
        for share in (0.25, 0.5, 0.75):
            reporter.report(share)
            time.sleep(0.05)
        return 'done'
    assert list(reporter.run(work)) == [0.25, 0.5, 0.75] == told and reporter.result() == 'done'

    def refuse(share):  # a Stop, a time limit: raised into the work, and out of `result`
        raise Stopped('stopped at 0%')
    reporter = Reporter(refuse)
    assert list(reporter.run(lambda: reporter.report(0.0))) == []
    with pytest.raises(Stopped, match='stopped at 0%'):
        reporter.result()

    # nobody waits any more (the page closed, the event was cancelled): the work ends at its next report
    reporter, reached = Reporter(lambda share: None), []

    def endless():
        while True:
            reporter.report(len(reached))
            reached.append(True)
            time.sleep(0.01)
    shares = reporter.run(endless)
    next(shares)
    shares.close()
    with pytest.raises(Stopped, match='nobody is waiting'):
        reporter.result()
    assert len(reached) < 100


class RecordingJob(TrainingJob):
    """A training job that records what it is asked to run, and runs nothing."""

    def run(self, model_config, cfg, name, owner=None, data=None):
        self.asked = (model_config, cfg, name, owner)
        yield Snapshot(1.0, 'finished after 0 epochs', done=True)


@pytest.mark.parametrize('public', [False, True])
def test_the_train_endpoint_passes_every_field_by_name_and_the_session(tmp_path, weights_dir, public):
    policy = ServerPolicy(public=public)
    job = RecordingJob('unused', ModelStore(weights_dir, runs_dir=tmp_path / 'runs', public=public), policy)
    demo = create_demo(ModelCache(weights_dir=weights_dir), job=job, policy=policy)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name='127.0.0.1', server_port=port, quiet=True)
    try:
        params = demo.get_api_info()['named_endpoints']['/train']['parameters']
        assert [p['parameter_name'] for p in params] == ['name', 'images'] + list(asdict(TrainForm()))
        # the defaults of the preset the form starts from on this machine
        assert {p['parameter_name']: p['parameter_default'] for p in params[2:]} == \
            asdict(TRAIN_PRESETS[default_preset()])
        client = connect(port, tmp_path / 'downloads')
        client.predict('recorded', embed_dim=96, depth=3, num_heads=3, patch_size=8, pos_embed='learn', stem='patch',
                       minutes=7, batch_size=64, lr=5e-4, crop_padding=5, api_name='/train')
    finally:
        demo.close()
    model_config, cfg, name, owner = job.asked
    assert (model_config.embed_dim, model_config.depth, model_config.num_heads, model_config.patch_size,
            model_config.pos_embed, model_config.stem) == (96, 3, 3, 8, 'learn', 'patch')
    assert (cfg.minutes, cfg.batch_size, cfg.lr, cfg.crop_padding, name) == (7, 64, 5e-4, 5, 'recorded')
    assert (owner == client.session_hash) if public else owner is None


def test_after_an_epoch_a_vit_shows_its_filmstrip_and_a_cnn_its_gallery():
    # the gallery of a ViT's last layer is the filmstrip's last row: shown once, the gallery kept for the API
    from vitdemo.filmstrip import Filmstrip
    from vitdemo.ui.train_tab import epoch_views
    picture = [(Image.new('RGB', (64, 64), 'red'), 'epoch 1: cat')]
    cnn = Snapshot(0.5, 'epoch 1', strip=picture, subject='cat', classes=['cat', 'dog'])
    gallery, plot = epoch_views(cnn)
    assert gallery.visible is True and len(gallery.value) == 1 and plot.visible is False
    strip = Filmstrip(np.zeros((1, 32, 32, 3), np.uint8), [0], [1], [np.zeros((1, 2, 4, 4), np.uint8)], [[1]])
    vit = Snapshot(0.5, 'epoch 1', strip=picture, subject='cat', filmstrip=strip, classes=['cat', 'dog'])
    gallery, plot = epoch_views(vit)
    assert gallery.visible is False and len(gallery.value) == 1
    assert plot.visible is True and plot.value is not None


def test_a_stop_clicked_while_the_model_loads_stops_the_slow_explanation(client, monkeypatch):
    from vitdemo.ui.common import Server
    loading = Server.model

    def stopped_while_loading(self, name, request, progress=None):
        model = loading(self, name, request, progress)
        self.stop(request)  # the visitor's Stop, clicked while the model loaded
        return model
    monkeypatch.setattr(Server, 'model', stopped_while_loading)
    labels, gallery, text, _ = client.predict(handle_file(str(ROOT / 'examples' / 'cat.jpg')), 'scratch/vit_cifar10',
                                              method='shapley', api_name='/predict')
    assert '**No maps this time:** Shapley values on scratch/vit_cifar10 stopped at 0%, as asked.' in text
    assert len(labels['confidences']) == 5 and len(gallery) == 1  # the predictions stand; only the input is drawn
