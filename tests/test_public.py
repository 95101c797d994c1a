"""Public mode: one server, many strangers. Each test is one item of the public-safety issue, with small
budgets set through the policy (or the environment) so that it runs in seconds."""
import contextlib
import hashlib
import inspect
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import httpx
import pytest
import torch
from gradio.route_utils import delete_files_created_by_app
from gradio_client import handle_file
from PIL import Image

import app
from vitdemo import compare, figures, serving
from vitdemo.ui import predict_tab
from vitdemo.ui.common import Server
from conftest import ROOT
from test_app import connect
from test_memory import STATUS, resident_mb
from test_train import CONFIG, colour_data
from vitdemo.app_process import free_port
from vitdemo.backends import load_model
from vitdemo.catalog import ModelCache
from vitdemo.explain import explain
from vitdemo.methods import Stopped
from vitdemo.cnn import ResNetConfig
from vitdemo.model import ViTConfig
from vitdemo.policy import MB, ServerPolicy, check_training, estimate_training_memory
from vitdemo.serving import PublishedFiles, cache_folder, publish_image
from vitdemo.store import ModelStore
from vitdemo.train import TrainConfig
from vitdemo.train_form import TRAIN_PRESETS, TrainForm
from vitdemo.training_job import TrainingFailed, TrainingJob, add_checkpoint
from vitdemo.weights import load_checkpoint

CAT = str(ROOT / 'examples' / 'cat.jpg')
EPOCH = TrainConfig(epochs=1, minutes=None, batch_size=64, val_size=64)
LONG = TrainConfig(epochs=500, minutes=None, batch_size=32, val_size=64)
# the form that took a 24 GB server down
HUGE_FORM = TrainForm(embed_dim=1024, depth=24, num_heads=16, patch_size=2, batch_size=4096, stem='patch')


def launch(demo: gr.Blocks, policy: ServerPolicy) -> tuple[gr.Blocks, int]:
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name='127.0.0.1', server_port=port, quiet=True,
                **app.launch_options(policy))
    return demo, port


def public_store(weights_dir: Path, tmp_path: Path, **caps) -> ModelStore:
    return ModelStore(weights_dir, runs_dir=tmp_path / 'runs', public=True, **caps)


# --- public mode ---------------------------------------------------------------------------------------

def test_public_mode_follows_the_environment():
    assert not ServerPolicy.from_env({}).public and ServerPolicy.from_env({}).max_train_minutes is None
    space = ServerPolicy.from_env({'SPACE_ID': 'someone/vitdemo'})
    assert space.max_explain_seconds == 90 and ServerPolicy.from_env({}).max_explain_seconds is None
    assert space.public and space.max_train_minutes == 30 and space.queued_per_session == 6
    assert ServerPolicy.from_env({'VITDEMO_PUBLIC': '1', 'VITDEMO_MAX_TRAIN_MINUTES': '5'}).max_train_minutes == 5
    assert ServerPolicy.from_env({'VITDEMO_STORE_MAX_FILES': '7'}).store_max_files == 7  # caps apply locally too
    with pytest.raises(ValueError, match='VITDEMO_TRAIN_MEMORY_MB must be a number'):
        ServerPolicy.from_env({'VITDEMO_TRAIN_MEMORY_MB': 'lots'})


# --- 1. memory ------------------------------------------------------------------------------------------

MEASURE = '''
import sys, torch, torch.nn.functional as F
sys.path.insert(0, {root!r})
from vitdemo.cnn import ResNetConfig
from vitdemo.model import ViTConfig
from vitdemo.train import autocast
from vitdemo.weights import build_model
def status(key):
    line = next(l for l in open('/proc/self/status') if l.startswith(key))
    return int(line.split()[1]) * 1024
config, batch = {config}, {batch}
open('/proc/self/clear_refs', 'w').write('5')  # the peak (VmHWM) starts again from here
before = status('VmRSS:')
model = build_model(config).train()
if hasattr(model, 'set_fused_attn'):
    model.set_fused_attn(False)
optimizer = torch.optim.AdamW(model.parameters(), fused=True)
x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
for _ in range(4):  # the heap grows over the first steps, then settles
    with autocast(torch.device('cpu'), True):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(status('VmHWM:') - before)
'''


@pytest.mark.parametrize('config,batch', [
    ("ViTConfig(img_size=32, patch_size=4, num_classes=10, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0, "
     "stem='conv', pos_embed='sincos')", 128),
    pytest.param("ResNetConfig(img_size=32)", 64, marks=pytest.mark.slow),  # ResNet-18's steps take ~15 s here
])
@pytest.mark.skipif(not STATUS.exists(), reason='reads the peak resident set size from Linux /proc')
def test_the_memory_estimate_bounds_a_measured_training_step(config, batch):
    """Real training steps in a fresh process, in the precision this CPU trains in: the peak they add is below
    the estimate, and the estimate is not so loose that it would refuse runs that fit (at most 3x)."""
    out = subprocess.run([sys.executable, '-c', MEASURE.format(root=str(ROOT), config=config, batch=batch)],
                         capture_output=True, text=True, timeout=300, check=True)
    measured = int(out.stdout.strip().splitlines()[-1])
    estimate = estimate_training_memory(eval(config), batch, num_images=0)
    print(f'{config[:40]}: measured {measured / MB:.0f} MB, estimated {estimate.total / MB:.0f} MB')
    assert measured < estimate.total < 3 * measured


def test_a_run_too_large_for_memory_is_refused_before_any_work(tmp_path, weights_dir):
    job = TrainingJob(tmp_path / 'no-data-here', ModelStore(weights_dir, runs_dir=tmp_path / 'runs'))
    model_config, cfg = HUGE_FORM.configs()
    before = resident_mb()
    with pytest.raises(ValueError, match=r'would need about [\d,.]+ (GB|MB) .* more than the'):
        next(job.run(model_config, cfg, 'huge'))
    # refused from the estimate alone: no data read (there is none), no model built, nothing written
    assert resident_mb() - before < 50 and not job.busy and not (tmp_path / 'runs').exists()
    # the budget follows the machine unless set: a small one refuses even the 10-minute preset
    preset_config, preset_cfg = TRAIN_PRESETS['10-minute CPU demo'].configs()
    check_training(ServerPolicy(), preset_config, preset_cfg.minutes, preset_cfg.batch_size)
    with pytest.raises(ValueError, match='more than the 200 MB'):
        check_training(ServerPolicy.from_env({'VITDEMO_TRAIN_MEMORY_MB': '200'}), preset_config, preset_cfg.minutes,
                       preset_cfg.batch_size)


def test_public_mode_caps_the_model_size():
    shipped_size = ViTConfig(img_size=32, patch_size=4, num_classes=10, embed_dim=192, depth=6, num_heads=3,
                             mlp_ratio=2.0, stem='conv')  # 1.9 M parameters
    check_training(ServerPolicy(public=True, max_params=12_000_000), ResNetConfig(), 10, 128)  # 11.2 M fits
    with pytest.raises(ValueError, match='1.9 M parameters; this server trains models of at most 1.0 M'):
        check_training(ServerPolicy(public=True, max_params=1_000_000), shipped_size, 10, 128)


# --- 2. disk --------------------------------------------------------------------------------------------

def test_the_store_evicts_the_oldest_visitors_checkpoints_never_the_shipped_ones(tmp_path, weights_dir):
    policy = ServerPolicy.from_env({'VITDEMO_PUBLIC': '1', 'VITDEMO_STORE_MAX_FILES': '3'})
    store = ModelStore.from_policy(weights_dir, policy, runs_dir=tmp_path / 'runs')
    job = TrainingJob('unused', store, update_seconds=0.0)
    shipped = {p: p.stat().st_mtime_ns for p in weights_dir.iterdir()}
    written = []
    for i in range(5):
        written.append(list(job.run(CONFIG, EPOCH, f'run{i}', owner=f'visitor{i % 2}', data=colour_data(256)))[-1]
                       .checkpoint)
        time.sleep(0.02)  # distinct modification times: "oldest" is well defined
    files, _ = store.usage()
    assert files == 3 and [p.exists() for p in written] == [False, False, True, True, True]
    assert {p: p.stat().st_mtime_ns for p in weights_dir.iterdir()} == shipped
    # a byte cap: room is made for the next checkpoint's size; one larger than the cap is refused outright
    size = written[-1].stat().st_size
    store.max_files, store.max_bytes = None, int(2.5 * size)
    list(job.run(CONFIG, EPOCH, 'bytes', owner='visitor0', data=colour_data(256)))
    assert store.usage()[0] == 2 and store.usage()[1] <= store.max_bytes
    store.max_bytes = size // 2
    with pytest.raises(ValueError, match='larger than this server keeps'):
        next(job.run(CONFIG, EPOCH, 'too_big', owner='visitor0', data=colour_data(256)))


# --- 3. hijack ------------------------------------------------------------------------------------------

def test_training_never_writes_where_the_app_reads_its_own_weights(tmp_path, weights_dir):
    store = ModelStore(weights_dir, runs_dir=tmp_path / 'runs')
    job = TrainingJob('unused', store, update_seconds=0.0)
    for name in ['vit_tiny_patch16_224', 'VIT_CIFAR10', 'Deit_Small_Distilled_Patch16_224']:
        with pytest.raises(ValueError, match='a model the app ships'):
            next(job.run(CONFIG, EPOCH, name, data=colour_data(256)))
    shipped = {p: p.stat().st_mtime_ns for p in weights_dir.iterdir()}
    last = list(job.run(CONFIG, EPOCH, 'vit_tiny', data=colour_data(256)))[-1]
    assert last.checkpoint.parent == tmp_path / 'runs' and 'saved as trained/vit_tiny' in last.status
    assert {p: p.stat().st_mtime_ns for p in weights_dir.iterdir()} == shipped
    # even a file with a pretrained model's name among the trained ones shadows nothing
    (tmp_path / 'runs' / 'vit_tiny_patch16_224.safetensors').write_bytes(last.checkpoint.read_bytes())
    cache = ModelCache(store=store)
    assert cache.get('timm/vit_tiny_patch16_224').classes[0] == 'tench'
    assert 'trained/vit_tiny_patch16_224' in cache.names() and 'scratch/vit_tiny_patch16_224' not in cache.names()


# --- 4. owners ------------------------------------------------------------------------------------------

def test_in_public_mode_runs_and_models_belong_to_their_session(tmp_path, weights_dir):
    store = public_store(weights_dir, tmp_path)
    job = TrainingJob('unused', store, ServerPolicy(public=True), update_seconds=0.0)
    a = list(job.run(CONFIG, EPOCH, 'my_vit', owner='session-a', data=colour_data(256)))[-1].checkpoint
    a_bytes = a.read_bytes()
    b = list(job.run(CONFIG, TrainConfig(epochs=1, minutes=None, batch_size=64, val_size=64, seed=1), 'my_vit',
                     owner='session-b', data=colour_data(256)))[-1].checkpoint
    assert a != b and a.read_bytes() == a_bytes  # the same name replaced nothing
    again = list(job.run(CONFIG, EPOCH, 'MY_VIT', owner='session-a', data=colour_data(256)))[-1]
    assert again.checkpoint.name == 'MY_VIT-2.safetensors' and a.read_bytes() == a_bytes
    cache = ModelCache(store=store)
    assert [n for n in cache.names('session-a') if n.startswith('trained/')] == ['trained/MY_VIT-2', 'trained/my_vit']
    assert [n for n in cache.names('session-b') if n.startswith('trained/')] == ['trained/my_vit']
    assert not [n for n in cache.names('session-c') if n.startswith('trained/')]
    with pytest.raises(Exception, match='choose one from the list'):
        cache.get('trained/MY_VIT-2', 'session-b')
    torch.testing.assert_close(cache.get('trained/my_vit', 'session-a').module.head.weight,
                               load_checkpoint(a)[0].head.weight)
    # B cannot stop A's run; A can
    run = job.run(CONFIG, LONG, 'long', owner='session-a', data=colour_data())
    next(run), next(run)
    assert not job.stop('session-b') and not job.stop(None)
    next(run)  # still training
    assert job.stop('session-a')
    assert list(run)[-1].status.startswith('stopped')


def test_a_checkpoint_brought_back_joins_its_sessions_models_alone_and_never_a_shipped_name(tmp_path, weights_dir):
    store = public_store(weights_dir, tmp_path)
    job = TrainingJob('unused', store, ServerPolicy(public=True), update_seconds=0.0)
    kept = tmp_path / 'kept' / 'my_vit.safetensors'  # a visitor's download, kept on their own machine
    kept.parent.mkdir()
    a_model = list(job.run(CONFIG, EPOCH, 'my_vit', owner='session-a', data=colour_data(256)))[-1].checkpoint
    shutil.copy(a_model, kept)
    path, left_out = add_checkpoint(store, kept, 'session-b', max_params=12_000_000)  # after a reload: a new session
    assert left_out == [] and path.parent == store.folder('session-b') and path.name == 'my_vit.safetensors'
    cache = ModelCache(store=store)
    assert 'trained/my_vit' in cache.names('session-b') and 'trained/my_vit' not in cache.names('session-c')
    torch.testing.assert_close(cache.get('trained/my_vit', 'session-b').module.head.weight,
                               load_checkpoint(kept)[0].head.weight)
    shutil.copy(kept, kept.with_name('vit_cifar10.safetensors'))  # a shipped model's name stays the shipped model's
    with pytest.raises(ValueError, match='vit_cifar10 is the name of a model the app ships'):
        add_checkpoint(store, kept.with_name('vit_cifar10.safetensors'), 'session-b')
    with pytest.raises(ValueError, match='has 0.1 M parameters; this server runs models of at most 0.0 M'):
        add_checkpoint(store, kept, 'session-b', max_params=1000)
    assert sorted(p.name for p in store.folder('session-b').iterdir()) == ['my_vit.safetensors']  # nothing half-kept
    # a full store: a file refused costs its visitor nothing, and a flood of checkpoints brought back
    # (milliseconds each) removes no one else's model
    store.max_files = 2
    (tmp_path / 'kept' / 'broken.safetensors').write_bytes(kept.read_bytes()[:1000])
    with pytest.raises(ValueError, match='not a readable safetensors file'):
        add_checkpoint(store, tmp_path / 'kept' / 'broken.safetensors', 'session-b')
    assert path.exists() and not list(store.runs_dir.glob('.*'))
    for _ in range(3):
        time.sleep(0.02)  # distinct modification times: "oldest" is well defined
        add_checkpoint(store, kept, 'session-b')
    assert a_model.exists() and store.usage()[0] == 2  # each made room by removing B's own older one
    with pytest.raises(ValueError, match='holds as many visitors\' models as it keeps'):
        add_checkpoint(store, kept, 'session-flood')
    assert a_model.exists()


def test_run_locally_one_user_owns_everything(tmp_path, weights_dir):
    job = TrainingJob('unused', ModelStore(weights_dir, runs_dir=tmp_path / 'runs'), update_seconds=0.0)
    first = list(job.run(CONFIG, EPOCH, 'my_vit', data=colour_data(256)))[-1]
    second = list(job.run(CONFIG, EPOCH, 'my_vit', data=colour_data(256)))[-1]  # the default name again
    assert first.checkpoint.exists() and second.checkpoint.name == 'my_vit-2.safetensors'
    assert 'saved as trained/my_vit-2' in second.status  # said, not silent
    run = job.run(CONFIG, LONG, 'mine', data=colour_data())
    next(run), next(run)
    assert job.stop()
    assert list(run)[-1].status.startswith('stopped')


# --- 5. time --------------------------------------------------------------------------------------------

def test_public_mode_caps_the_minutes_and_checks_the_form(tmp_path, weights_dir):
    job = TrainingJob('unused', public_store(weights_dir, tmp_path),
                      ServerPolicy(public=True, max_train_minutes=30))
    model_config, cfg = TrainForm(embed_dim=64, depth=2, num_heads=2, patch_size=8, minutes=100_000).configs()
    with pytest.raises(ValueError, match='at most 30 minutes a run, not 100000 minutes'):
        next(job.run(model_config, cfg, 'forever', owner='someone', data=colour_data(256)))
    assert not job.busy
    for minutes, message in [(None, 'minutes must be a number, got None'), ('ten', 'must be a number'),
                             (float('inf'), 'minutes must be between'), (1e9, 'minutes must be between')]:
        with pytest.raises(ValueError, match=message):
            TrainForm(minutes=minutes).configs()


# --- 6, 7. one limit for all model work, a few queued requests per session ------------------------------

MODEL_EVENTS = {'predict', 'redraw', 'restyle', 'inspect', 'reinspect', 'compare', 'recompare', 'look_from_patch',
                'sanity'}


def test_every_event_that_runs_a_model_shares_one_limit(weights_dir):
    demo = app.create_demo(ModelCache(weights_dir=weights_dir), policy=ServerPolicy())
    fns = {fn.name: fn for fn in demo.fns.values()}
    assert MODEL_EVENTS <= set(fns)
    for name in MODEL_EVENTS:  # the private ones too: they answer raw HTTP calls by index
        assert all(fn.concurrency_id == 'model' for fn in demo.fns.values() if fn.name == name), name
        assert (fns[name].concurrency_id, fns[name].concurrency_limit) == ('model', 2), name
    # an upload's preview decodes it: bounded too, but apart, so that it is not one of a session's model requests
    assert {(fn.concurrency_id, fn.concurrency_limit) for fn in demo.fns.values() if fn.name == 'show'} == \
        {('decode', 2)}


class Concurrency:
    """Counts the wrapped calls, and how many of them run at once; each is held for `seconds` first."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.calls = self.now = self.most = 0
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def counted(self):
        with self.lock:
            self.calls += 1
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            time.sleep(self.seconds)
            yield
        finally:
            with self.lock:
                self.now -= 1

    def wrap(self, real):
        def call(*args, **kwargs):
            with self.counted():
                return real(*args, **kwargs)

        def stream(*args, **kwargs):  # counted for as long as it is read
            with self.counted():
                yield from real(*args, **kwargs)
        return stream if inspect.isgeneratorfunction(real) else call


def test_predict_inspect_and_compare_together_run_two_at_a_time(weights_dir, tmp_path, monkeypatch):
    running = Concurrency(0.4)
    for module, name in ((predict_tab, 'predict_view'), (figures, 'inspect_steps'), (compare, 'compare_view')):
        monkeypatch.setattr(module, name, running.wrap(getattr(module, name)))
    demo, port = launch(app.create_demo(ModelCache(weights_dir=weights_dir), policy=ServerPolicy()), ServerPolicy())
    try:
        image = handle_file(CAT)
        jobs = [connect(port, tmp_path).submit(image, 'scratch/vit_cifar10', api_name='/predict') for _ in range(3)]
        jobs += [connect(port, tmp_path).submit(image, 'scratch/vit_cifar10', api_name='/inspect') for _ in range(2)]
        jobs += [connect(port, tmp_path).submit(image, 'scratch/vit_cifar10', 'scratch/vit_cifar10',
                                                api_name='/compare') for _ in range(2)]
        for job in jobs:
            job.result(timeout=120)
    finally:
        demo.close()
    assert running.most == 2


def outcomes_of(jobs) -> list:
    """True for each job answered; for each refused, its HTTP status and the reason the server gave."""
    outcomes = []
    for job in jobs:
        try:
            outcomes.append(bool(job.result(timeout=60)))
        except httpx.HTTPStatusError as e:
            outcomes.append((e.response.status_code, e.response.json().get('detail')))
    return outcomes


def test_one_session_flooding_the_queue_is_refused_alone(weights_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(predict_tab, 'predict_view', Concurrency(0.5).wrap(predict_tab.predict_view))
    policy = ServerPolicy(queued_per_session=2)
    demo, port = launch(app.create_demo(ModelCache(weights_dir=weights_dir), policy=policy), policy)
    try:
        flooder = connect(port, tmp_path)
        flood = [flooder.submit(handle_file(CAT), 'scratch/vit_cifar10', api_name='/predict') for _ in range(8)]
        time.sleep(0.3)
        labels, *_ = connect(port, tmp_path).predict(handle_file(CAT), 'scratch/vit_cifar10', api_name='/predict')
        assert labels['confidences']  # another visitor is answered meanwhile
        outcomes = outcomes_of(flood)
    finally:
        demo.close()
    answered = [o for o in outcomes if o is True]
    refused = [o for o in outcomes if o is not True]
    assert 2 <= len(answered) < 8 and refused, outcomes
    # 429, not 503: Gradio's page shows the reason of any refusal but a 503, which it calls the whole app busy
    assert all(o == (429, 'You already have 2 requests waiting or running, in this tab or another: wait for them '
                          'to finish, then try again.') for o in refused), outcomes


def test_a_refusals_reason_reaches_the_page_once_per_refused_request(weights_dir):
    server = Server(ModelCache(weights_dir=weights_dir), None, ServerPolicy())
    page = SimpleNamespace(session_hash='visitor')
    server.refused('visitor', 'You already have 2 requests for the models waiting or running')
    server.refused('visitor', 'You already have 6 requests waiting or running')
    server.refused('someone else', 'not for this visitor')
    # each refused request's event writes one note: the reasons in the order they came, then no reason
    assert server.error_note(page).endswith('You already have 2 requests for the models waiting or running')
    assert server.error_note(page).endswith('You already have 6 requests waiting or running')
    assert server.error_note(page) == '<strong>Could not answer:</strong> the request failed'
    # a reason no note took in time (a preview's event writes none) is not given to a later, unrelated failure
    server.refused('visitor', 'You already have 6 requests waiting or running')
    server.errors['visitor'][0] = (time.monotonic() - 60, server.errors['visitor'][0][1])
    assert server.error_note(page) == '<strong>Could not answer:</strong> the request failed'


def test_the_session_limit_tells_the_server_each_refusal_and_why(tmp_path):
    told = []
    gate = threading.Event()
    with gr.Blocks() as demo:
        box = gr.Textbox()
        gr.Button().click(lambda x: gate.wait(30) and x, box, box, api_name='wait', concurrency_id='model')
    demo.queue(default_concurrency_limit=2)
    serving.limit_queue_per_session(demo, 6, {'model': 1}, refused=lambda *why: told.append(why))
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name='127.0.0.1', server_port=port, quiet=True)
    try:
        client = connect(port, tmp_path)
        first = client.submit('a', api_name='/wait')
        time.sleep(0.5)
        second = client.submit('b', api_name='/wait')
        outcome = outcomes_of([second])
        gate.set()
        assert first.result(timeout=30) == 'a'
    finally:
        demo.close()
    reason = ('You already have 1 request for the models waiting or running, in this tab or another: wait for one to '
              'finish, then try again.')
    assert outcome == [(429, reason)] and told == [(client.session_hash, reason)]


def test_one_session_holds_at_most_two_requests_for_the_models(weights_dir, tmp_path, monkeypatch, caplog):
    # six predictions at once from one client would take both model slots three times over, and every other
    # visitor would wait behind them; two are taken, the rest refused, and what runs no model still answers
    monkeypatch.setattr(predict_tab, 'predict_view', Concurrency(2.0).wrap(predict_tab.predict_view))
    policy = ServerPolicy.from_env({'VITDEMO_PUBLIC': '1'})
    assert policy.queued_per_session == 6 and policy.model_work_per_session == 2
    demo, port = launch(app.create_demo(ModelCache(weights_dir=weights_dir), policy=policy), policy)
    caplog.set_level(logging.INFO, logger='vitdemo.server')
    try:
        flooder = connect(port, tmp_path)
        flood = [flooder.submit(handle_file(CAT), 'scratch/vit_cifar10', api_name='/predict') for _ in range(6)]
        time.sleep(0.5)
        flooder.predict(api_name='/stop_training')  # answered (nothing to stop), not refused
        outcomes = outcomes_of(flood)
    finally:
        demo.close()
    assert outcomes.count(True) == 2, outcomes
    assert outcomes.count((429, 'You already have 2 requests for the models waiting or running, in this tab or '
                                'another: wait for one to finish, then try again.')) == 4, outcomes
    assert caplog.text.count("session already holds 2 requests of 'model'") == 4


def test_deep_images_are_shrunk_before_they_are_scaled(monkeypatch):
    """A 16-bit image is scaled to 8 bits only once it is at most 1024 pixels a side, and one above the
    lower pixel limit for deep images is refused from its header."""
    import numpy as np
    import vitdemo.images as images
    seen = []
    real = images._to_uint8
    monkeypatch.setattr(images, '_to_uint8', lambda a: seen.append(a.size) or real(a))

    def tiff(w, h):
        buffer = io.BytesIO()
        Image.fromarray(np.full((h, w), 40000, np.uint16)).save(buffer, 'TIFF')
        return buffer.getvalue()
    picture = images.load_image(tiff(4000, 3000))
    assert picture.size == (1024, 768) and max(seen) <= 1024 * 768
    assert abs(int(np.asarray(picture)[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1
    with pytest.raises(images.ImageError, match='limit for 16-bit and float images is 16 megapixels'):
        images.load_image(tiff(5000, 4000))


# --- 8. uploads without a request -----------------------------------------------------------------------

def test_uploads_past_the_folders_budget_are_refused(weights_dir, tmp_path):
    demo = app.create_demo(ModelCache(weights_dir=weights_dir), policy=ServerPolicy())  # copies its examples
    # room for 1 MB more than the folder (shared with the other tests of this run) holds now
    held = sum(p.stat().st_size for p in Path(os.environ['GRADIO_TEMP_DIR']).rglob('*') if p.is_file())
    policy = ServerPolicy(uploads_max_mb=held / MB + 1)
    demo, port = launch(demo, policy)
    blob = os.urandom(700_000)
    codes = []
    try:
        for i in range(3):
            response = httpx.post(f'http://127.0.0.1:{port}/gradio_api/upload',
                                  files={'files': (f'junk{i}.png', blob, 'image/png')}, timeout=30)
            codes.append(response.status_code)
            time.sleep(1.1)  # the folder's size is recounted at most once a second
        assert codes[:2] == [200, 200] and codes[2] == 507 and 'too many uploaded files' in response.text
        delete_files_created_by_app(demo, None)  # Gradio's sweep (every 5 minutes in public mode) ...
        time.sleep(1.1)
        # ... makes room again: an upload with a prediction is answered
        labels, *_ = connect(port, tmp_path).predict(handle_file(CAT), 'scratch/vit_cifar10', api_name='/predict')
    finally:
        demo.close()
    assert labels['confidences'] is not None


# --- 9. a failed run gives its memory back --------------------------------------------------------------

@pytest.mark.skipif(not STATUS.exists(), reason='reads the resident set size from Linux /proc')
def test_memory_comes_back_after_a_failed_run(tmp_path, weights_dir, monkeypatch):
    import vitdemo.train as training
    real_train = training.train

    def runs_out(*args, **kwargs):
        activations = torch.ones(150_000_000)  # 600 MB held by the run's frame when it fails
        raise RuntimeError(f"DefaultCPUAllocator: can't allocate memory: you tried to allocate {activations.numel()}")
    monkeypatch.setattr(training, 'train', runs_out)
    job = TrainingJob('unused', ModelStore(weights_dir, runs_dir=tmp_path / 'runs'), update_seconds=0.0)
    before = resident_mb()
    with pytest.raises(TrainingFailed, match='out of memory: lower the batch size') as failure:
        list(job.run(CONFIG, EPOCH, 'doomed', data=colour_data(256)))
    after = resident_mb()
    print(f'resident memory {before:.0f} MB before the failed run, {after:.0f} MB after')
    assert after - before < 100 and failure.value.__cause__ is None and not job.busy
    monkeypatch.setattr(training, 'train', real_train)
    assert list(job.run(CONFIG, EPOCH, 'next', data=colour_data(256)))[-1].checkpoint.exists()


# --- 10. output files are never rewritten while served --------------------------------------------------

def test_an_output_drawn_again_is_not_rewritten_in_place(tmp_path):
    picture = Image.new('RGB', (64, 64), (10, 200, 30))
    first = Path(publish_image(picture))
    stat = first.stat()
    stop = threading.Event()
    short_reads = []

    def download():
        while not stop.is_set():
            if len(first.read_bytes()) != stat.st_size:
                short_reads.append(1)
    readers = [threading.Thread(target=download) for _ in range(4)]
    for reader in readers:
        reader.start()
    for _ in range(200):
        assert Path(publish_image(picture)) == first
    stop.set()
    for reader in readers:
        reader.join()
    assert first.stat().st_ino == stat.st_ino and first.stat().st_size == stat.st_size and not short_reads
    assert not [p for p in first.parent.iterdir() if p != first]  # no temporary file left
    assert not list(cache_folder().glob('.publish.*'))


def test_checkpoints_handed_out_are_copies_under_their_names_and_at_most_keep_of_them(tmp_path, monkeypatch):
    copied = []
    monkeypatch.setattr(serving, '_publish', lambda *a, real=serving._publish: copied.append(1) or real(*a))
    downloads = PublishedFiles(keep=2)
    sources = []
    for i in range(3):
        sources.append(tmp_path / f'run{i}.safetensors')
        sources[-1].write_bytes(os.urandom(3 * 2 ** 20 + i))  # larger than one chunk of the copy
    first = Path(downloads.publish(sources[0]))
    assert first.name == 'run0.safetensors' and first.read_bytes() == sources[0].read_bytes()
    # under the hash of its content: a link nobody guesses, in the folder Gradio serves and sweeps
    assert first.parent == cache_folder() / hashlib.sha256(sources[0].read_bytes()).hexdigest()
    assert Path(downloads.publish(sources[0])) == first and len(copied) == 1  # the same file: not read again
    first.unlink()  # swept from the cache: the next request copies it again
    assert Path(downloads.publish(sources[0])) == first and first.exists() and len(copied) == 2
    second, third = (Path(downloads.publish(s)) for s in sources[1:])
    assert not first.exists() and not first.parent.exists()  # the oldest of three went
    assert second.read_bytes() == sources[1].read_bytes() and third.read_bytes() == sources[2].read_bytes()
    sources[2].unlink()  # the store may evict the checkpoint: its copy stays until it is swept
    assert third.exists() and not list(cache_folder().glob('.publish.*'))


def call_by_index(url: str, fn_index: int, data: list, session: str) -> dict:
    """An event called by its index, as a client that bypasses the page would: its `process_completed` message."""
    body = dict(data=data, fn_index=fn_index, session_hash=session, event_data=None, trigger_id=None)
    urllib.request.urlopen(urllib.request.Request(url + 'gradio_api/queue/join', json.dumps(body).encode(),
                                                  {'Content-Type': 'application/json'}))
    with urllib.request.urlopen(url + f'gradio_api/queue/data?session_hash={session}', timeout=60) as stream:
        return next(json.loads(line[5:]) for line in stream if b'process_completed' in line)


def test_a_raw_call_can_point_neither_the_download_nor_the_bring_back_at_a_file_of_the_servers(port, weights_dir):
    """The download event reads the run's checkpoint from the session's state, which lives on the server; the
    bring-back takes only a file the client uploaded (Gradio refuses any other path)."""
    url = f'http://127.0.0.1:{port}/'
    config = json.load(urllib.request.urlopen(url + 'config'))
    types = {c['id']: c['type'] for c in config['components']}
    events = [d for d in config['dependencies'] if any(types[o] == 'downloadbutton' for o in d['outputs'])]
    assert events
    for event in events:
        done = call_by_index(url, event['id'], [__file__] * len(event['inputs']), 'raw-caller')
        assert done['success'] and Path(__file__).name not in json.dumps(done)
        assert all(update == {'visible': False, '__type__': 'update'} for update in done['output']['data'])
    bring_back = next(d['id'] for d in config['dependencies'] if d.get('api_name') == 'add_model')
    shipped = {'path': str(weights_dir / 'vit_cifar10.safetensors'), 'meta': {'_type': 'gradio.FileData'}}
    before = set(weights_dir.rglob('*.safetensors'))
    assert not call_by_index(url, bring_back, [shipped], 'raw-caller')['success']
    assert set(weights_dir.rglob('*.safetensors')) == before  # nothing joined the models


def test_two_identical_predictions_share_files_and_rewrite_none(client):
    _, gallery, *_ = client.predict(handle_file(CAT), 'scratch/vit_cifar10', api_name='/predict')
    # the server's copies of the gallery in Gradio's cache, by inode and modification time
    files = {p: (p.stat().st_ino, p.stat().st_mtime_ns)
             for p in Path(os.environ['GRADIO_TEMP_DIR']).rglob('image.jpeg')}
    assert len(files) >= len(gallery) == 4
    client.predict(handle_file(CAT), 'scratch/vit_cifar10', api_name='/predict')
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == files[p] for p in files)


# --- 11. orphan temporary files -------------------------------------------------------------------------

def test_orphans_of_a_killed_save_are_removed_at_start(tmp_path, weights_dir):
    weights = tmp_path / 'weights'
    weights.mkdir()
    (weights / 'vit_cifar10.safetensors').write_bytes((weights_dir / 'vit_cifar10.safetensors').read_bytes())
    runs = weights / 'trained' / 'abc'
    runs.mkdir(parents=True)
    old = [weights / '.vit_cifar10.safetensors.x1.tmp', runs / '.my_vit.safetensors.x2.tmp']
    young = runs / '.my_vit.safetensors.x3.tmp'  # a save in progress elsewhere: left alone
    for path in old + [young]:
        path.write_bytes(b'\0' * 1000)
    for path in old:
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    app.create_demo(ModelCache(store=ModelStore(weights)), policy=ServerPolicy())
    assert not any(p.exists() for p in old) and young.exists()
    assert (weights / 'vit_cifar10.safetensors').exists()


# --- 13. clear messages, one log line -------------------------------------------------------------------

def raw_call(port: int, api_name: str, data: str) -> str:
    """A call as a hostile client sends it, over HTTP with hand-written JSON (NaN included, which no
    JSON library emits); returns the event stream's text."""
    base = f'http://127.0.0.1:{port}/gradio_api'
    with open(CAT, 'rb') as f:
        uploaded = httpx.post(f'{base}/upload', files={'files': ('cat.jpg', f, 'image/jpeg')}).json()[0]
    image = json.dumps({'path': uploaded, 'meta': {'_type': 'gradio.FileData'}})
    event = httpx.post(f'{base}/call/{api_name}', content=f'{{"data": [{image}, {data}]}}',
                       headers={'content-type': 'application/json'}).json()['event_id']
    return httpx.get(f'{base}/call/{api_name}/{event}', timeout=60).text


def test_bad_numbers_from_raw_calls_get_clear_messages_and_one_log_line(port, caplog):
    caplog.set_level(logging.INFO, logger='vitdemo.server')
    # model, top-k, fusion, head, opacity, discard ratio, colour scale, method, class, layer, share kept
    form = ['"scratch/vit_cifar10"', '5', '"mean"', '1', '0.6', '0.9', '"own"', '"attention"', '""', '0', '0']
    for changes, message in [({1: 'null'}, 'top-k must be a number, got None'),
                             ({1: '"five"'}, "top-k must be a number, got 'five'"),
                             ({4: 'NaN'}, 'overlay opacity must be between 0 and 1'),
                             ({5: 'NaN'}, 'rollout discard ratio must be between'),
                             ({2: '"one head"', 3: '"two"'}, "head must be a number, got 'two'"),
                             ({10: '1.5'}, 'share of attention to keep must be between 0 and 0.99')]:
        answer = raw_call(port, 'predict', ', '.join(changes.get(i, v) for i, v in enumerate(form)))
        assert 'event: error' in answer and message in answer, answer
    refusals = [r for r in caplog.records if r.getMessage().startswith('refused predict')]
    assert len(refusals) == 6 and all(r.exc_info is None and '\n' not in r.getMessage() for r in refusals)
    # and the server goes on
    assert 'event: complete' in raw_call(port, 'predict', ', '.join(form))


@pytest.fixture(scope='module')
def port(weights_dir):
    demo, port = launch(app.create_demo(ModelCache(weights_dir=weights_dir), policy=ServerPolicy()), ServerPolicy())
    try:
        yield port
    finally:
        demo.close()


@pytest.fixture(scope='module')
def client(port, tmp_path_factory):
    return connect(port, tmp_path_factory.mktemp('downloads'))


def test_a_slow_explanation_stops_at_the_servers_limit_or_when_its_session_asks(weights_dir):
    model = load_model('timm/vit_tiny_patch16_224', weights_dir)
    pred = model.predict(CAT)
    alice, bob = SimpleNamespace(session_hash='alice'), SimpleNamespace(session_hash='bob')
    server = Server(ModelCache(weights_dir=weights_dir), None, ServerPolicy(max_explain_seconds=0.3))
    start = time.monotonic()
    with pytest.raises(Stopped, match=r'Shapley values took longer than this server allows one explanation \(0.3 s\)'):
        with server.explaining(alice, None, 'Shapley values') as tell:
            explain(model, pred, 'shapley', progress=tell)
    assert time.monotonic() - start < 5  # stopped within a batch or two, not after the whole method
    # Stop ends the explanation of the session that asked, and no other
    server = Server(ModelCache(weights_dir=weights_dir), None, ServerPolicy())
    with server.explaining(alice, None, 'x') as alices, server.explaining(bob, None, 'x') as bobs:
        server.stop(alice)
        with pytest.raises(Stopped, match='x stopped at 40%, as asked'):
            alices(0.4)
        bobs(0.5)
    with server.explaining(alice, None, 'x') as tell:
        tell(0.1)  # the session's next explanation starts afresh
    # an option moved between a Stop and the slow work's next report (it starts none) keeps that Stop
    with server.explaining(alice, None, 'x') as alices:
        alices(0.1)
        server.stop(alice)
        with server.explaining(alice, None, 'x', fresh=False):
            pass
        with pytest.raises(Stopped, match='x stopped at 20%, as asked'):
            alices(0.2)
    with pytest.raises(Stopped):
        with server.explaining(alice, None, 'occlusion') as tell:
            explain(model, pred, 'occlusion', progress=stop_soon(server, alice, tell))


def stop_soon(server, request, tell):
    """A progress callback whose session presses Stop once the work is under way."""
    def progress(share):
        if share > 0:
            server.stop(request)
        tell(share)
    return progress


def test_in_public_one_slow_explanation_runs_at_a_time_and_fast_ones_never_wait(weights_dir):
    policy = ServerPolicy.from_env({'VITDEMO_PUBLIC': '1'})
    assert policy.slow_explanations == 1 and ServerPolicy.from_env({}).slow_explanations is None
    server = Server(ModelCache(weights_dir=weights_dir), None, policy)
    alice, bob = SimpleNamespace(session_hash='alice'), SimpleNamespace(session_hash='bob')
    model = load_model(ROOT / 'weights' / 'vit_cifar10.safetensors')
    with server.explaining(alice, None, 'Score-CAM') as alices:
        alices(0.0)  # alice's slow method has started and holds the slot
        with server.explaining(bob, None, 'occlusion') as bobs:
            with pytest.raises(Stopped, match='runs 1 slow explanation at a time'):
                explain(model, CAT, 'occlusion', progress=bobs)
            assert explain(model, CAT, 'relevance', progress=bobs).target  # a fast method reports nothing
    with server.explaining(bob, None, 'occlusion') as bobs:  # alice is done: the slot is free again
        assert explain(model, CAT, 'occlusion', progress=bobs).overall[1].shape == (8, 8)


def test_with_the_slots_taken_each_tab_answers_what_it_can_and_says_what_the_visitor_can_do(weights_dir, tmp_path,
                                                                                             monkeypatch):
    monkeypatch.setattr(Server, '__post_init__', lambda self: setattr(self, 'slow_slots', threading.Semaphore(0)))
    policy = ServerPolicy(slow_explanations=1)
    demo, port = launch(app.create_demo(ModelCache(weights_dir=weights_dir), policy=policy), policy)
    try:
        client = connect(port, tmp_path)
        labels, gallery, text, _ = client.predict(handle_file(CAT), 'scratch/vit_cifar10', method='occlusion',
                                                  api_name='/predict')
        grid, costs, *plots, sizes, look, caption, note = client.predict(handle_file(CAT), 'timm/vit_tiny_patch16_224',
                                                                         api_name='/inspect')
        *small_figures, small_note = client.predict(handle_file(CAT), 'scratch/vit_cifar10', api_name='/inspect')
    finally:
        demo.close()
    assert labels['confidences'] and len(gallery) == 1
    assert 'which another visitor is using: try again in a minute, or pick a method not marked slow.' in text
    # a large model's test is slow work; a CIFAR-10 model's takes seconds, and no slot
    assert ('which another visitor is using: try again in a minute, or pick a model of 32-pixel images such as '
            'scratch/vit_cifar10, whose test takes seconds. The other figures are drawn.') in note
    assert grid and all(plots[:4]) and plots[4]['value'] is None and sizes['data'][-1][0] == 'this model' and look
    assert small_note == '' and all(small_figures)


def test_the_train_endpoint_takes_an_uploaded_zip_only_never_a_server_path(tmp_path, weights_dir):
    from test_app import RecordingJob
    policy = ServerPolicy(public=True)
    job = RecordingJob('unused', public_store(weights_dir, tmp_path), policy)
    demo, port = launch(app.create_demo(ModelCache(weights_dir=weights_dir), job=job, policy=policy), policy)
    try:
        params = demo.get_api_info()['named_endpoints']['/train']['parameters']
        from test_archive import good_entries, make_zip
        on_server = make_zip(tmp_path / 'not_uploaded.zip', good_entries())  # readable, had it been allowed
        secret = {'path': str(on_server), 'meta': {'_type': 'gradio.FileData'}}
        data = ['stolen', secret] + [p['parameter_default'] for p in params[2:]]
        event = httpx.post(f'http://127.0.0.1:{port}/gradio_api/call/train', json={'data': data}).json()['event_id']
        answer = httpx.get(f'http://127.0.0.1:{port}/gradio_api/call/train/{event}', timeout=30).text
    finally:
        demo.close()
    assert 'event: error' in answer
    assert not hasattr(job, 'asked')  # refused before the handler read it: no run was asked for


def test_a_request_asked_again_while_it_runs_waits_for_its_answer_and_nothing_is_cached():
    from vitdemo.ui.common import joins_running
    release, calls = threading.Event(), []

    @joins_running
    def work(image: bytes, option: int = 1, request: gr.Request = None):
        calls.append((image, option, request.session_hash))
        release.wait(10)
        if option < 0:
            raise ValueError('option must not be negative')
        return object()
    alice, bob = gr.Request(session_hash='alice'), gr.Request(session_hash='bob')
    asked = [(b'cat', 1, alice), (b'cat', 1, alice), (b'cat', 1, bob), (b'dog', 1, alice), (b'cat', 2, alice),
             (b'cat', -1, alice), (b'cat', -1, alice)]
    answers: list = [None] * len(asked)

    def ask(i):
        try:
            answers[i] = work(*asked[i][:2], request=asked[i][2])
        except ValueError as e:
            answers[i] = e
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asked))]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    release.set()
    for thread in threads:
        thread.join(10)
    # the same session and inputs ran once and got the one answer (or error); any other session or input ran
    assert sorted(calls, key=repr) == sorted({(i, o, r.session_hash) for i, o, r in asked}, key=repr)
    assert answers[0] is answers[1] and len({id(a) for a in answers[1:5]}) == 4
    assert isinstance(answers[5], ValueError) and answers[5] is answers[6]
    assert work(b'cat', 1, request=alice) is not answers[0] and len(calls) == 6  # ended: asked again, runs again


def test_a_stream_asked_again_follows_its_answers_from_the_latest():
    from vitdemo.ui.common import joins_running
    steps = [threading.Event() for _ in range(3)]

    @joins_running
    def stream(image: bytes, request: gr.Request = None):
        for i, step in enumerate(steps):
            step.wait(10)
            yield i
    request = gr.Request(session_hash='alice')
    first = stream(b'cat', request=request)
    steps[0].set()
    assert next(first) == 0
    steps[1].set()
    assert next(first) == 1
    second = stream(b'cat', request=request)
    got = []
    follower = threading.Thread(target=lambda: got.extend(second))
    follower.start()
    time.sleep(0.2)
    assert got == [1]  # the latest answer at once, then each new one
    steps[2].set()
    assert list(first) == [2]
    follower.join(10)
    assert got == [1, 2]
    # the first stream closed early (its visitor left): one asking with it is told, not left waiting
    steps = [threading.Event() for _ in range(3)]
    first, second = stream(b'dog', request=request), stream(b'dog', request=request)
    steps[0].set()
    assert next(first) == 0
    assert next(second) == 0
    first.close()
    with pytest.raises(Stopped, match='ended without an answer'):
        next(second)


def test_one_asking_again_waits_a_few_seconds_at_most_then_leaves_the_outputs_to_the_first():
    # a waiting request holds one of the two model slots: through a minute-long test it would hold both
    from vitdemo.ui.common import joins_running
    release = threading.Event()

    @joins_running(patience=0.3)
    def work(image: bytes, request: gr.Request = None):
        release.wait(10)
        return 'maps'

    @joins_running(patience=0.3)
    def stream(image: bytes, request: gr.Request = None):
        yield 'figures'
        release.wait(10)
        yield 'figures and test'
    alice = gr.Request(session_hash='alice')
    first = threading.Thread(target=lambda: answers.append(work(b'cat', request=alice)))
    answers = []
    first.start()
    time.sleep(0.1)
    start = time.monotonic()
    again = work(b'cat', request=alice)
    assert again == gr.skip() and 0.25 < time.monotonic() - start < 2  # nothing answered yet: nothing changed
    figures = stream(b'cat', request=alice)
    assert next(figures) == 'figures'
    assert list(stream(b'cat', request=alice)) == ['figures']  # what there was; the rest comes to the first
    release.set()
    first.join(10)
    assert answers == ['maps'] and list(figures) == ['figures and test']


def test_pressing_the_button_while_the_pick_runs_works_once_per_tab(weights_dir, tmp_path, monkeypatch):
    views = {}
    for module, name in ((predict_tab, 'predict_view'), (figures, 'inspect_steps'), (compare, 'compare_view'),
                         (predict_tab, 'sanity_view')):
        views[name] = Concurrency(0.5)
        monkeypatch.setattr(module, name, views[name].wrap(getattr(module, name)))
    demo, port = launch(app.create_demo(ModelCache(weights_dir=weights_dir), policy=ServerPolicy()), ServerPolicy())
    try:
        visitor, image = connect(port, tmp_path), handle_file(CAT)
        asks = [((image, 'scratch/vit_cifar10'), '/predict'), ((image, 'scratch/vit_cifar10'), '/inspect'),
                ((image, 'scratch/vit_cifar10', 'scratch/vit_cifar10'), '/compare'),
                ((image, 'scratch/vit_cifar10'), '/sanity')]  # and the sanity check, asked twice at once
        answers = []
        for args, api in asks:  # the button pressed while the pick's request runs, in each tab
            jobs = [visitor.submit(*args, api_name=api) for _ in range(2)]
            answers += [job.result(timeout=120) for job in jobs]
        once = {name: view.calls for name, view in views.items()}
        visitor.predict(*asks[0][0], api_name='/predict')  # after the first has ended: computed again
    finally:
        demo.close()
    assert once == dict(predict_view=1, inspect_steps=1, compare_view=1, sanity_view=1)
    assert views['predict_view'].calls == 2
    assert answers[0][0] == answers[1][0] and answers[4][0] == answers[5][0]  # the same predictions, both asks
