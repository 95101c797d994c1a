"""vitdemo: see how a Vision Transformer sees. `python app.py` serves it on http://127.0.0.1:7860.

This file only assembles the tabs of `vitdemo.ui`, each of which builds its layout and wires its own
events to tested functions of the `vitdemo` package.
"""
import logging
import threading

from vitdemo.lazy import app_built_at_launch, import_ahead, lean_gradio_import

lean_gradio_import()  # before gradio's first import: seconds of start-up on two cores
import gradio as gr
import huggingface_hub
from starlette.middleware import Middleware

from vitdemo.catalog import DEFAULT_SCRATCH, FIRST_PREDICTION, WEIGHTS_DIR, ModelCache, needs_download
from vitdemo.methods import LIBRARIES
from vitdemo.policy import MB, ServerPolicy
from vitdemo.serving import UploadQuota, limit_queue_per_session
from vitdemo.store import ModelStore
from vitdemo.training_job import TrainingJob
from vitdemo.ui.common import CSS, MODEL_WORK, Server
from vitdemo.ui.compare_tab import compare_tab
from vitdemo.ui.inspect_tab import inspect_tab
from vitdemo.ui.predict_tab import predict_tab
from vitdemo.ui.train_tab import train_tab

MAX_UPLOAD = '50mb'  # a 24-megapixel JPEG is ~10 MB; larger uploads are refused before they reach the app
INTRO = """# vitdemo: how a Vision Transformer sees
Upload an image and pick a model: you get its top predictions and, for every layer, where the **CLS token**
looks (the token whose final state is classified). The last map, *rollout*, follows attention through all
layers at once. `scratch/` models are our ViT trained from scratch on CIFAR-10; `timm/` are timm's
ImageNet-1k ViTs; `ours/` run the same ImageNet weights on our own from-scratch code; `trained/` are yours."""


def notes(server: Server) -> str:
    """What the page says about models that are missing or need a download, in words, without server paths."""
    lines = []
    if not any(n.startswith('scratch/') for n in server.cache.names()):
        expected = f'weights/{DEFAULT_SCRATCH.split("/")[1]}.safetensors'
        lines.append(f'*No trained scratch weights are present (expected `{expected}`): train one in the Train tab '
                     'or with `python -m vitdemo.train`, or use a pretrained model.*')
    if missing := needs_download(server.cache.weights_dir):
        listed = ', '.join(f'`{a}`' for a in missing)
        if huggingface_hub.constants.HF_HUB_OFFLINE:
            lines.append(f'*Offline (`HF_HUB_OFFLINE` is set): the `timm/` and `ours/` models {listed} need a one-time '
                         'download of their pretrained weights and are marked in the lists. To use one offline, save '
                         'its `model.safetensors` from the Hugging Face Hub as `weights/ARCH.safetensors`.*')
        else:
            lines.append(f'*The pretrained models {listed} download their weights from the Hugging Face Hub the first '
                         'time you pick one; later picks load from the cache.*')
    return '\n\n'.join(lines)


def warm_up() -> None:
    """Once the page answers: the imports of the first prediction, then of the explanation methods' libraries,
    done while the first visitor reads the page."""
    log = logging.getLogger('vitdemo.server')
    try:
        log.info('ready for the first prediction (its imports took %.1f s)', import_ahead(*FIRST_PREDICTION))
        log.info('ready for every explanation method (%.1f s more)', import_ahead(*LIBRARIES))
    except Exception:  # the first request that needs them will say what is wrong
        log.exception('could not import ahead what the first requests need')


def launch_options(policy: ServerPolicy) -> dict:
    """`demo.launch` settings that follow the policy: the upload size, and a bound on the upload folder."""
    options = dict(max_file_size=MAX_UPLOAD, css=CSS)
    if policy.uploads_max_mb:
        options['app_kwargs'] = dict(middleware=[Middleware(UploadQuota, max_bytes=int(policy.uploads_max_mb * MB))])
    return options


@app_built_at_launch()  # Gradio's web app, a third of a second each, built by `launch` alone
def create_demo(cache: ModelCache | None = None, job: TrainingJob | None = None,
                policy: ServerPolicy | None = None) -> gr.Blocks:
    policy = policy or ServerPolicy.from_env()
    cache = cache or ModelCache(store=ModelStore.from_policy(WEIGHTS_DIR, policy))
    cache.store.clean_partials()  # what a killed save left behind
    server = Server(cache, job or TrainingJob(data_path=None, store=cache.store, policy=policy), policy)

    def lists_for_session(known: list | None, request: gr.Request):
        # every model list follows the model store, for this visitor; unchanged, nothing is sent (an open
        # list would close)
        choices = server.choices(request)
        if choices == known:
            return [gr.skip()] * (len(lists) + 1)
        return [gr.Dropdown(choices=choices)] * len(lists) + [choices]

    # uploads and drawn outputs are Gradio's temporary files: drop the old ones, in public mode sooner
    with gr.Blocks(title='vitdemo', delete_cache=(300, 900) if policy.public else (3600, 3600)) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(notes(server))
        with gr.Tab('Predict'):
            lists = predict_tab(server)
        with gr.Tab('Train'):
            saved = train_tab(server, demo.load)
        with gr.Tab('Compare'):
            lists += compare_tab(server)
        with gr.Tab('Inspect'):
            lists += inspect_tab(server)
        triggers = [demo.load, saved.change]
        if not policy.public:  # one user, several tabs: a model trained in one shows up in the others
            triggers.append(gr.Timer(20).tick)
        known = gr.State(None)
        gr.on(triggers, lists_for_session, known, lists + [known], api_visibility='private', show_progress='hidden')
    # one limit for all model work (see vitdemo.ui.common.MODEL_WORK); a bounded queue answers "busy" to a
    # flood, and in public mode one session cannot fill it
    demo.queue(default_concurrency_limit=2, max_size=64)
    if policy.queued_per_session:
        model_work = {MODEL_WORK['concurrency_id']: policy.model_work_per_session} \
            if policy.model_work_per_session else {}
        limit_queue_per_session(demo, policy.queued_per_session, model_work, refused=server.refused)
    return demo


if __name__ == '__main__':
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    # GRADIO_SERVER_NAME and GRADIO_SERVER_PORT, when set, choose the address (Gradio reads them)
    server_policy = ServerPolicy.from_env()
    demo = create_demo(policy=server_policy)
    demo.launch(prevent_thread_lock=True, **launch_options(server_policy))
    threading.Thread(target=warm_up, name='warm-up', daemon=True).start()
    demo.block_thread()
