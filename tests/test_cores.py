"""The server's threads and the two cores. A thread that has spread a tensor operation over the cores keeps a
team of OpenMP workers while it lives; with two teams alive, GNU OpenMP lets no worker wait actively between
operations, and a training step of small operations takes up to twice as long (bench/train_tab_rate.py). The
server's threads live on after their work: those that wait, or idle, let their workers go."""
import threading
from pathlib import Path

import torch

import app
from conftest import ROOT, name_this_thread, needs_openmp_teams, threads_named
from test_train import CONFIG, colour_data
from vitdemo.catalog import ModelCache
from vitdemo.lazy import import_ahead
from vitdemo.methods import LIBRARIES
from vitdemo.policy import _torch_openmp, release_openmp_workers
from vitdemo.store import ModelStore
from vitdemo.train import TrainConfig
from vitdemo.training_job import TrainingJob
from vitdemo.ui.common import releases_workers

pytestmark = needs_openmp_teams
# as the server does at start; scikit-learn (pytorch-grad-cam's) brings a GNU OpenMP of its own
import_ahead(*LIBRARIES)
WORKERS = torch.get_num_threads() - 1  # a team: the thread that asks, and these


def spread_over_the_cores() -> None:
    torch.ones(2_000_000).mul_(2)  # large enough for torch to split it between threads


def in_a_thread(name: str, work) -> dict:
    """Runs `work(seen)` in a new thread known to the system as `name` (its workers too); returns `seen`."""
    seen = {}

    def run():
        name_this_thread(name)
        work(seen)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    return seen


def test_a_thread_lets_its_workers_go_and_gets_them_back_when_it_needs_them():
    def work(seen):
        seen['none yet'] = threads_named('vd-release') - 1
        spread_over_the_cores()
        seen['after work'] = threads_named('vd-release') - 1
        release_openmp_workers()
        seen['let go'] = threads_named('vd-release') - 1
        spread_over_the_cores()
        seen['again'] = threads_named('vd-release') - 1
    seen = in_a_thread('vd-release', work)
    assert seen == {'none yet': 0, 'after work': WORKERS, 'let go': 0, 'again': WORKERS}


def test_the_openmp_let_go_is_torchs_own_where_torch_keeps_one():
    # which of the copies loaded is torch's is not told by the order the system lists them in
    loaded = [line.split()[-1] for line in open('/proc/self/maps') if '/libgomp' in line]
    own = {path for path in loaded if path.startswith(str(Path(torch.__file__).parent))}
    if own and len(set(loaded)) > 1:
        assert {lib._name for lib in _torch_openmp()} == own


def test_model_work_lets_its_workers_go_when_it_answers():
    @releases_workers
    def answer():
        spread_over_the_cores()
        return 'maps'

    @releases_workers
    def stream():
        spread_over_the_cores()
        yield 'figures'
        spread_over_the_cores()
        yield 'test'

    def work(seen):
        seen['answer'] = answer(), threads_named('vd-handler') - 1
        answers = stream()
        seen['first'] = next(answers), threads_named('vd-handler') - 1
        seen['second'] = next(answers), threads_named('vd-handler') - 1
        spread_over_the_cores()
        seen['unmarked work'] = threads_named('vd-handler') - 1
    assert in_a_thread('vd-handler', work) == {'answer': ('maps', 0), 'first': ('figures', 0),
                                               'second': ('test', 0), 'unmarked work': WORKERS}


def test_the_apps_predict_inspect_and_compare_let_their_workers_go(weights_dir):
    demo = app.create_demo(ModelCache(weights_dir=weights_dir))
    handlers = {fn.api_name: fn.fn for fn in demo.fns.values() if fn.api_name in ('predict', 'inspect', 'compare')}
    image = (ROOT / 'examples' / 'cat.jpg').read_bytes()
    model = 'timm/vit_tiny_patch16_224'  # 197 tokens: operations that torch spreads over the cores

    def work(seen, name):
        seen['predict'] = handlers['predict'](image, model)[0] is not None, threads_named(name) - 1
        *_, last = handlers['inspect'](image, model, 1, 'mean')
        seen['inspect'] = last[-1] is not None, threads_named(name) - 1
        seen['compare'] = handlers['compare'](image, model, model)[0] is not None, threads_named(name) - 1
    # first once elsewhere: the libraries imported on first use start threads of their own (OpenBLAS's, for one)
    in_a_thread('vd-first', lambda seen: work(seen, 'vd-first'))
    seen = in_a_thread('vd-server', lambda seen: work(seen, 'vd-server'))
    assert seen == {name: (True, 0) for name in ('predict', 'inspect', 'compare')}


def test_the_thread_watching_a_training_run_keeps_no_workers_through_it(tmp_path):
    # a server thread that has answered a prediction has workers of its own; it then waits on the run's reports
    job = TrainingJob(data_path='unused', store=ModelStore(tmp_path), update_seconds=0.0)

    def work(seen):
        spread_over_the_cores()
        seen['before'] = threads_named('vd-watch') - 1
        name_this_thread('vd-waiting')  # the training thread it starts takes this name, and so do its workers
        counts = [threads_named('vd-watch') for snap in job.run(CONFIG, TrainConfig(epochs=2, minutes=None,
                                                                                    batch_size=64, val_size=128),
                                                               'watched', data=colour_data()) if snap.steps]
        seen['during'] = max(counts)
    seen = in_a_thread('vd-watch', work)
    assert seen == {'before': WORKERS, 'during': 0}
