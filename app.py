"""vitdemo: see how a Vision Transformer sees. `python app.py` serves it on http://127.0.0.1:7860.

This file only wires Gradio components to functions of the `vitdemo` package.
"""
import functools
import html
import logging
from inspect import isgeneratorfunction
from pathlib import Path

import gradio as gr
import huggingface_hub
from starlette.middleware import Middleware

from vitdemo.backends import DEFAULT_SCRATCH, WEIGHTS_DIR, ModelCache, ModelUnavailable, needs_download
from vitdemo.compare import compare_view
from vitdemo.data import default_data_path
from vitdemo.figures import inspect_view, patch_view
from vitdemo.images import ImageError
from vitdemo.policy import MB, ServerPolicy
from vitdemo.serving import UploadQuota, limit_queue_per_session, publish_image
from vitdemo.store import ModelStore
from vitdemo.training_job import TRAIN_PRESETS, TrainingBusy, TrainingFailed, TrainingJob, configs_from_form
from vitdemo.views import FUSIONS, predict_view, progress_text, training_curves
from vitdemo.weights import CheckpointError

EXAMPLES = sorted(str(p) for p in (Path(__file__).parent / 'examples').glob('*.*') if p.suffix != '.md')
USER_ERRORS = (ImageError, ModelUnavailable, CheckpointError, TrainingBusy, TrainingFailed, FileNotFoundError,
               ValueError, TypeError)
MAX_UPLOAD = '50mb'  # a 24-megapixel JPEG is ~10 MB; larger uploads are refused before they reach the app
MODEL_WORK = dict(concurrency_id='model', concurrency_limit=2)  # every event that runs a model: 2 cores
log = logging.getLogger('vitdemo.server')
TRAIN_FIELDS = ['embed_dim', 'depth', 'num_heads', 'patch_size', 'minutes', 'batch_size', 'lr', 'arch', 'pos_embed',
                'stem', 'crop_padding']

INTRO = """# vitdemo: how a Vision Transformer sees
Upload an image and pick a model: you get its top predictions and, for every layer, where the **CLS token**
looks (the token whose final state is classified). The last map, *rollout*, follows attention through all
layers at once. `scratch/` models are our ViT trained from scratch on CIFAR-10; `timm/` are timm's
ImageNet-1k ViTs; `ours/` run the same ImageNet weights on our own from-scratch code."""


def shows_user_errors(fn):
    """Known input problems reach the browser as their own clear message (escaped: it is shown as HTML),
    and the server log gets one line; anything else stays Gradio's generic error, with the details only
    in the server log."""
    def raise_for_people(e: Exception):
        log.info('refused %s: %s', fn.__name__, e)
        raise gr.Error(html.escape(str(e), quote=False), print_exception=False) from None

    if isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except USER_ERRORS as e:
                raise_for_people(e)
        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            raise_for_people(e)
    return call


class Slider(gr.Slider):
    """A slider that hands the handler whatever a raw API call sent (None, text, NaN), for the package's
    checks to refuse with a clear message; Gradio's own check fails on those with a TypeError and a
    traceback. `is_template`: the browser draws it as the slider it is."""
    is_template = True

    def preprocess(self, payload):
        return payload


class Number(gr.Number):
    """A number field that hands raw values to the handler, as `Slider` does."""
    is_template = True

    def preprocess(self, payload):
        return payload


def image_box() -> gr.File:
    # bytes, not a path: Gradio's file-path mode leaves an empty temporary file behind on every request
    return gr.File(label='Image', file_types=['image'], type='binary')


def published(gallery: list) -> list[tuple[str, str]]:
    return [(publish_image(picture), caption) for picture, caption in gallery]


def launch_options(policy: ServerPolicy) -> dict:
    """`demo.launch` settings that follow the policy: the upload size, and a bound on the upload folder."""
    options = dict(max_file_size=MAX_UPLOAD)
    if policy.uploads_max_mb:
        options['app_kwargs'] = dict(middleware=[Middleware(UploadQuota, max_bytes=int(policy.uploads_max_mb * MB))])
    return options


def create_demo(cache: ModelCache | None = None, job: TrainingJob | None = None,
                policy: ServerPolicy | None = None) -> gr.Blocks:
    policy = policy or ServerPolicy.from_env()
    cache = cache or ModelCache(store=ModelStore.from_policy(WEIGHTS_DIR, policy))
    cache.store.clean_partials()  # what a killed save left behind
    job = job or TrainingJob(default_data_path(), cache.store, policy)
    names = cache.names()
    has_scratch = any(n.startswith('scratch/') for n in names)

    def owner(request: gr.Request | None) -> str | None:
        """Whose models and run these are: the browser session in public mode; locally, one user owns all."""
        return request.session_hash if policy.public and request is not None else None

    def load(name: str, request: gr.Request, progress: gr.Progress):
        if not isinstance(name, str):
            raise ValueError(f'the model must be a name from the list, got {name!r}')
        if not cache.has(name, owner(request)):
            progress(0, desc=f'Loading {name} (the first time downloads its weights)')
        return cache.get(name, owner(request))

    @shows_user_errors
    def predict(image: bytes, model: str, top_k: int = 5, fusion: str = 'mean', head: int = 0,
                opacity: float = 0.6, discard_ratio: float = 0.9, request: gr.Request = None,
                progress=gr.Progress(track_tqdm=True)):
        labels, gallery, text = predict_view(load(model, request, progress), image, top_k, fusion, head, opacity,
                                             discard_ratio)
        return labels, published(gallery), text

    @shows_user_errors
    def inspect(image: bytes, model: str, request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
        grid, *rest = inspect_view(load(model, request, progress), image)
        return publish_image(grid), *rest

    @shows_user_errors
    def compare(image: bytes, model_a: str, model_b: str, fusion: str = 'mean', as_cifar10: bool = True,
                request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
        a, b, gallery, text = compare_view(load(model_a, request, progress), load(model_b, request, progress), image,
                                           fusion, as_cifar10)
        return a, b, published(gallery), text

    @shows_user_errors
    def look_from_patch(image: bytes, model: str, layer: int, fusion: str, evt: gr.SelectData,
                        request: gr.Request):
        picture, caption = patch_view(cache.get(model, owner(request)), image, tuple(evt.index), layer, fusion)
        return publish_image(picture), caption

    def refresh(image, model, top_k, fusion, head, opacity, discard_ratio, request: gr.Request):
        # re-draw when a control changes, once there is an image to draw on
        if image is None:
            return gr.skip()
        return predict(image, model, top_k, fusion, head, opacity, discard_ratio, request)

    @shows_user_errors
    def start_training(embed_dim: int, depth: int, num_heads: int, patch_size: int, minutes: float,
                       batch_size: int, lr: float, name: str, arch: str = 'vit', pos_embed: str = 'learn',
                       stem: str = 'conv', crop_padding: int = 4, request: gr.Request = None):
        model_config, train_config = configs_from_form(embed_dim, depth, num_heads, patch_size, minutes,
                                                       batch_size, lr, arch=arch, pos_embed=pos_embed, stem=stem,
                                                       crop_padding=crop_padding)
        epochs = 0
        for snap in job.run(model_config, train_config, name, owner(request)):
            # curves and picture only when an epoch ends: fewer bytes, and the plots first get data
            # with both splits in it (an empty first frame leaves their colour legend empty)
            new_epoch = len(snap.history) > epochs or snap.done
            loss, accuracy = training_curves(snap.history) if new_epoch else (gr.skip(),) * 2
            picture = publish_image(snap.attention) if new_epoch and snap.attention else gr.skip()
            epochs = len(snap.history)
            models = gr.skip()
            if snap.checkpoint:  # the new model shows up in every model list at once
                cache.forget(snap.checkpoint)
                models = gr.Dropdown(choices=cache.names(owner(request)))
            yield (progress_text(snap.progress, snap.status), loss, accuracy, picture) + (models,) * 4

    def stop_training(request: gr.Request):
        if job.stop(owner(request)):
            return 'Stopping: the run ends after its current step and keeps what it learned.'
        return gr.skip() if not job.busy else 'The run in progress is not yours to stop.'

    def models_for_session(request: gr.Request):
        # every list follows the model store, for this visitor, at each page load
        return [gr.Dropdown(choices=cache.names(owner(request)))] * 4

    def apply_preset(preset: str):
        return [TRAIN_PRESETS[preset][k] for k in TRAIN_FIELDS]

    # uploads and drawn outputs are Gradio's temporary files: drop the old ones, in public mode sooner
    with gr.Blocks(title='vitdemo', delete_cache=(300, 900) if policy.public else (3600, 3600)) as demo:
        gr.Markdown(INTRO)
        if not has_scratch:
            expected = f'weights/{DEFAULT_SCRATCH.split("/")[1]}.safetensors'
            gr.Markdown(f'*No trained scratch weights are present (expected `{expected}`): train one in the '
                        'Train tab or with `python -m vitdemo.train`, or use a pretrained model.*')
        if missing := needs_download(cache.weights_dir):
            listed = ', '.join(f'`{a}`' for a in missing)
            if huggingface_hub.constants.HF_HUB_OFFLINE:
                gr.Markdown(f'*Offline (`HF_HUB_OFFLINE` is set): the `timm/` and `ours/` models {listed} need a '
                            'one-time download of their pretrained weights and cannot be used until then. To use '
                            'one offline, save its `model.safetensors` from the Hugging Face Hub as '
                            '`weights/ARCH.safetensors`.*')
            else:
                gr.Markdown(f'*The pretrained models {listed} download their weights from the Hugging Face Hub '
                            'the first time you pick one (progress shows meanwhile); later picks load from the '
                            'cache.*')
        with gr.Tab('Predict'):
            with gr.Row():
                with gr.Column(scale=1):
                    image = image_box()
                    model = gr.Dropdown(names, value=names[0], label='Model', allow_custom_value=True)
                    top_k = Slider(1, 10, value=5, step=1, label='Top-k predictions')
                    with gr.Accordion('Attention view', open=True):
                        fusion = gr.Radio(FUSIONS, value='mean', label='Fuse heads by')
                        head = Slider(0, 15, value=0, step=1, label="Head (for 'one head')")
                        opacity = Slider(0.0, 1.0, value=0.6, step=0.05, label='Overlay opacity')
                        discard_ratio = Slider(0.0, 0.99, value=0.9, step=0.01,
                                                  label='Rollout: discard the weakest fraction of attention')
                    run = gr.Button('Predict', variant='primary')
                    gr.Examples(EXAMPLES, inputs=[image], label='Example images')
                with gr.Column(scale=2):
                    label = gr.Label(label='Predictions')
                    info = gr.Markdown()
                    # JPEG: encoding eight overlays takes 3 ms, against 80 ms as WebP (Gradio's default)
                    gallery = gr.Gallery(label='Where the CLS token looks, layer by layer', columns=4,
                                         height='auto', object_fit='contain', format='jpeg')
        with gr.Tab('Train'):
            gr.Markdown('Train a small ViT from scratch on CIFAR-10 and watch it learn. The defaults finish in '
                        'about ten minutes on a 2-core CPU (10-13 epochs, 75-76% validation accuracy measured '
                        'there; a random guess is 10%); the result joins the Predict tab\'s model list. '
                        'Train the CNN baseline (ResNet-18) the same way, then set the two side by side in '
                        'Compare: ViT vs CNN on small data.')
            with gr.Row():
                with gr.Column(scale=1):
                    first = next(iter(TRAIN_PRESETS))
                    preset = gr.Dropdown(list(TRAIN_PRESETS), value=first, label='Preset')
                    p = TRAIN_PRESETS[first]
                    arch = gr.Radio([('ViT', 'vit'), ('ResNet-18, the CNN baseline', 'resnet18')],
                                    value=p['arch'], label='Model')
                    with gr.Column(visible=p['arch'] == 'vit') as vit_settings:
                        with gr.Row():
                            embed_dim = Number(p['embed_dim'], label='Embed dim', precision=0)
                            depth = Number(p['depth'], label='Depth (layers)', precision=0)
                            num_heads = Number(p['num_heads'], label='Heads', precision=0)
                            patch_size = gr.Dropdown([2, 4, 8, 16], value=p['patch_size'], label='Patch size')
                        with gr.Row():
                            pos_embed = gr.Radio(['learn', 'sincos'], value=p['pos_embed'],
                                                 label='Position embedding: learned, or fixed sin-cos')
                            stem = gr.Radio([('3x3 convolutions (learns faster)', 'conv'),
                                             ("one patch projection (timm's ViT)", 'patch')], value=p['stem'],
                                            label='Tokens from')
                    with gr.Row():
                        minutes = Number(p['minutes'], label='Minutes')
                        batch_size = Number(p['batch_size'], label='Batch size', precision=0)
                        lr = Number(p['lr'], label='Learning rate')
                    crop_padding = Number(p['crop_padding'], precision=0,
                                             label='Random crops: padding in pixels (0: flips only)')
                    run_name = gr.Textbox('my_vit', label='Save as',
                                          info='listed as trained/NAME; a name in use gets -2, -3, ...')
                    with gr.Row():
                        start = gr.Button('Start', variant='primary')
                        stop = gr.Button('Stop')
                with gr.Column(scale=2):
                    status = gr.Markdown('Press Start.')
                    with gr.Row():
                        loss_plot = gr.LinePlot(x='epoch', y='value', color='split', title='Loss', height=260)
                        accuracy_plot = gr.LinePlot(x='epoch', y='value', color='split', title='Accuracy',
                                                    height=260)
                    snapshot = gr.Image(label='CLS attention (last layer; a CNN: last-stage Grad-CAM) on a fixed '
                                              'validation image, after each epoch', height=220, interactive=False)
        with gr.Tab('Compare'):
            gr.Markdown('One image, two models. Layers are paired by relative depth (a 6-layer and a 12-layer '
                        'model line up); each pair is scored by how much their attention overlaps. A CNN '
                        '(ResNet-18, trained in the Train tab) shows the Grad-CAM of each stage instead.')
            with gr.Row():
                with gr.Column(scale=1):
                    compare_image = image_box()
                    timm_default = next(n for n in names if n.startswith('timm/'))
                    model_a = gr.Dropdown(names, value=names[0], label='Model A', allow_custom_value=True)
                    model_b = gr.Dropdown(names, value=timm_default, label='Model B', allow_custom_value=True)
                    compare_fusion = gr.Radio(FUSIONS[:3], value='mean', label='Fuse heads by')
                    as_cifar10 = gr.Checkbox(True, label='Read ImageNet predictions as CIFAR-10 classes')
                    compare_run = gr.Button('Compare', variant='primary')
                    gr.Examples(EXAMPLES, inputs=[compare_image], label='Example images')
                with gr.Column(scale=2):
                    with gr.Row():
                        label_a = gr.Label(label='Model A')
                        label_b = gr.Label(label='Model B')
                    compare_text = gr.Markdown()
                    compare_gallery = gr.Gallery(label='A and B, layer by layer (aligned), then both rollouts',
                                                 columns=4, height='auto', object_fit='contain', format='jpeg')
        compare_run.click(compare, [compare_image, model_a, model_b, compare_fusion, as_cifar10],
                          [label_a, label_b, compare_gallery, compare_text], api_name='compare', **MODEL_WORK)

        with gr.Tab('Inspect'):
            gr.Markdown("The figures of the ViT paper (Fig. 7), computed live from the chosen model: how it cuts "
                        "the image into patches, what its position embeddings learned, what its first layer "
                        "compares patches with, and how far and how widely each head looks on your image.")
            with gr.Row():
                with gr.Column(scale=1):
                    inspect_image = image_box()
                    inspect_model = gr.Dropdown(names, value=names[0], label='Model', allow_custom_value=True)
                    inspect_run = gr.Button('Inspect', variant='primary')
                    gr.Examples(EXAMPLES, inputs=[inspect_image], label='Example images')
                with gr.Column(scale=2):
                    with gr.Row():
                        grid_image = gr.Image(label='The patches the model sees', interactive=False, height=320)
                        costs = gr.Dataframe(headers=['patch size', 'grid', 'tokens', 'attention pairs'],
                                             label='Tokens and attention cost (tokens squared) at this input size',
                                             interactive=False)
                    with gr.Row():
                        position_plot = gr.Plot(label='Position embeddings', show_label=False)
                        filters_plot = gr.Plot(label='Patch embedding filters', show_label=False)
                    with gr.Row():
                        distance_plot = gr.Plot(label='Mean attention distance', show_label=False)
                        entropy_plot = gr.Plot(label='Attention entropy', show_label=False)
                    with gr.Row():
                        deletion_plot = gr.Plot(label='Deletion test', show_label=False)
                        with gr.Column():
                            gr.Markdown('**Click a patch** in the grid above to see where *that* patch looks.')
                            patch_layer = Slider(1, 32, value=1, step=1, label='Layer')
                            patch_fusion = gr.Radio(FUSIONS[:3], value='mean', label='Fuse heads by')
                            patch_image = gr.Image(label='Attention of the clicked patch', interactive=False,
                                                   height=300)
                            patch_caption = gr.Markdown()
        inspect_run.click(inspect, [inspect_image, inspect_model],
                          [grid_image, costs, position_plot, filters_plot, distance_plot, entropy_plot,
                           deletion_plot], api_name='inspect', **MODEL_WORK)
        grid_image.select(look_from_patch, [inspect_image, inspect_model, patch_layer, patch_fusion],
                          [patch_image, patch_caption], api_visibility='private', **MODEL_WORK)

        train_fields = [embed_dim, depth, num_heads, patch_size, minutes, batch_size, lr]
        preset.change(apply_preset, preset, train_fields + [arch, pos_embed, stem, crop_padding],
                      api_visibility='private')
        arch.change(lambda a: gr.Column(visible=a == 'vit'), arch, vit_settings, api_visibility='private')
        start.click(start_training, train_fields + [run_name, arch, pos_embed, stem, crop_padding],
                    [status, loss_plot, accuracy_plot, snapshot, model, inspect_model, model_a, model_b],
                    api_name='train', concurrency_limit=2, concurrency_id='train')
        stop.click(stop_training, None, status, api_name='stop_training')

        inputs = [image, model, top_k, fusion, head, opacity, discard_ratio]
        outputs = [label, gallery, info]
        run.click(predict, inputs, outputs, api_name='predict', **MODEL_WORK)
        gr.on([image.upload, model.change, fusion.change, head.release, opacity.release, discard_ratio.release],
              refresh, inputs, outputs, api_visibility='private', trigger_mode='always_last', **MODEL_WORK)
        demo.load(models_for_session, None, [model, inspect_model, model_a, model_b], api_visibility='private')
    # one limit for all model work, two at a time (2 cores), whichever tab or raw call asks; a bounded
    # queue answers "busy" to a flood, and in public mode one session cannot fill it
    demo.queue(default_concurrency_limit=2, max_size=64)
    if policy.queued_per_session:
        limit_queue_per_session(demo, policy.queued_per_session)
    return demo


if __name__ == '__main__':
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    # GRADIO_SERVER_NAME and GRADIO_SERVER_PORT, when set, choose the address (Gradio reads them)
    server_policy = ServerPolicy.from_env()
    create_demo(policy=server_policy).launch(**launch_options(server_policy))
