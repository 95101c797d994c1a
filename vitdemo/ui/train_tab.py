"""The Train tab: a small ViT (or the CNN baseline) trained from scratch on CIFAR-10, watched as it learns.

The form's fields, the presets and the `/train` API's named parameters all come from one definition,
`vitdemo.train_form.TrainForm`."""
import inspect
import json
from dataclasses import asdict, fields, replace
from pathlib import Path

import gradio as gr

from ..serving import publish_image
from ..archive import ZipLimits, read_image_zip
from ..filmstrip import filmstrip_figure
from ..train_form import (FINETUNE_ARCHS, FINETUNE_MODES, SMALL_PRESET, TRAIN_PRESETS, TrainForm, default_preset,
                          trains_in_float32)
from ..training_job import Snapshot, add_checkpoint
from ..views import accuracy_title, progress_html, runs_frame, training_curves
from ..metadata import read_metadata
from .common import Number, Server, Slider, keeps_errors, shows_user_errors

FORM_FIELDS = [f.name for f in fields(TrainForm)]
# bench/finetune_cost.py on 2-core AMD EPYCs with bf16 and without (docs/benchmarks.md); a run's status gives its
# own ETA
FINETUNE_COST = {
    'bf16': ('On a 2-core CPU with bf16 arithmetic, ViT-Ti/16 computes a probe\'s features at ~120 images/s (all of '
             'CIFAR-10: ~7 minutes; 2,000 of your own: ~20 s), and learns at ~60 images/s in a full fine-tune, ~110 '
             'with 8 blocks frozen; ViT-S/16 takes 2-3x as long, ViT-B/16 ~10x.'),
    'float32': ('On this server\'s CPU, which trains in float32, ViT-Ti/16 computes a probe\'s features at ~30 '
                'images/s (all of CIFAR-10: ~27 minutes; 2,000 of your own: ~70 s), and learns at ~16 images/s in a '
                'full fine-tune, ~24 with 8 blocks frozen; ViT-S/16 takes 2-5x as long.'),
}
# the 10-minute presets on a 2-core AMD EPYC with AVX2 only: whole runs from the command line, and the CNNs'
# training rates from bench/preset_rates.py (0.4 and 1.8 epochs in ten minutes; docs/benchmarks.md)
FLOAT32_CPU = ('\n\n*This server\'s CPU has no bf16 arithmetic: it trains in float32, about a quarter as fast. So '
               f'the form starts from a smaller, cheaper model ({SMALL_PRESET!r}): 13-14 epochs and about 79% '
               'validation accuracy in ten minutes here, where the first preset gets through 4 (74%). For a longer '
               'run, give this preset more minutes (under Model and recipe; thirty: 82%) rather than taking the '
               '30-minute larger model, which gets through 5 epochs here (74%). CNNs slow down more (ResNet-18: a '
               'third of an epoch in ten minutes): give a CNN baseline more minutes before you compare.*')


def speed_note() -> str:
    """What the intro adds where a run here trains in float32."""
    return FLOAT32_CPU if trains_in_float32() else ''


def finetune_cost() -> str:
    """What a fine-tune costs on this kind of CPU, and what bounds it."""
    return (FINETUNE_COST['float32' if trains_in_float32() else 'bf16'] + ' The minutes bound every run: a probe '
            'stopped early trains its head on the features it has.')


NAME_INFO = 'listed as trained/NAME; a name in use gets -2, -3, ...'
# a public visitor's models belong to the page's session, and the store evicts the oldest when it is full
NAME_INFO_PUBLIC = ('listed as trained/NAME (a name in use gets -2, -3) while this page stays open (a reload starts '
                    'afresh) and the server has room: download it to keep it')
USE_DOWNLOAD = ('A safetensors file: `vitdemo.load_model("{stem}.safetensors")` in Python, or put it in `weights/` of '
                'your own copy of vitdemo, where the app lists it as `scratch/{stem}`.')

LEAVING = 'A run is in progress: leave the page and its model stays with this page, out of your reach.'

SNAPSHOT_LABEL = ('Where the last layer looks (a ViT: its attention; a CNN: last-stage Grad-CAM) on one validation '
                  'image, after each epoch')


def epoch_views(snap: Snapshot) -> tuple:
    """The attention a run shows after an epoch: a ViT's filmstrip (the fixed image under every layer's map,
    an epoch a column), or else the gallery of the last layer (a CNN: its last-stage Grad-CAM). With a
    filmstrip, the gallery (its last row) stays hidden but filled for the API."""
    filmed = snap.filmstrip is not None and bool(snap.filmstrip.epochs)
    strip = film = gr.skip()
    if snap.strip:
        strip = gr.Gallery([(publish_image(p), c) for p, c in reversed(snap.strip)], visible=not filmed,
                           label=f'{SNAPSHOT_LABEL}: a {snap.subject}; the class it gives, newest first')
    if filmed:
        film = gr.Plot(filmstrip_figure(snap.filmstrip, 0, snap.classes), visible=True)
    elif snap.strip:
        film = gr.Plot(None, visible=False)
    return strip, film


def train_tab(server: Server, page_load) -> gr.State:
    """Builds the tab and wires its events; returns a state that changes when a run saved a model.
    `page_load`: the page's load event, when the lists of the visitor's models are filled."""
    @shows_user_errors(server)
    def start_training(name: str, images: str | None, *values):
        *values, request = values
        if len(values) != len(FORM_FIELDS) or not isinstance(request, gr.Request | None):
            raise RuntimeError('the /train handler got its arguments out of step with TrainForm')
        form = TrainForm(**dict(zip(FORM_FIELDS, values)))
        model_config, train_config = form.configs()
        data = None
        if images:  # the visitor's own classes; a pretrained ViT gets more of each image to upscale
            yield progress_html(0.0, 'reading your images'), *(gr.skip(),) * 5
            data = read_image_zip(images, size=64 if form.start_from else 32)
        epochs, points = 0, 0
        for snap in server.job.run(model_config, train_config, name, server.owner(request), data):
            # curves when they have new points, once the first epoch gave both splits (an empty first frame
            # leaves the plots' colour legend empty); the strip of attention snapshots when an epoch ends
            new_epoch = len(snap.history) > epochs or snap.done
            moved = snap.history and (new_epoch or len(snap.steps) > points)
            curves = training_curves(snap.history, snap.steps) if moved else None
            loss = accuracy = gr.skip()
            if curves:
                loss = gr.LinePlot(curves[0], visible=True)
                accuracy = gr.LinePlot(curves[1], visible=True, title=accuracy_title(snap.history))
            strip, film = epoch_views(snap) if new_epoch else (gr.skip(),) * 2
            epochs, points = len(snap.history), len(snap.steps)
            saved = gr.skip()
            if snap.checkpoint:  # every model list picks the new model up
                server.cache.forget(snap.checkpoint)
                saved = str(snap.checkpoint)
            yield progress_html(snap.progress, snap.status), loss, accuracy, strip, film, saved

    # the API's named parameters: the run's name, then the form's fields with the default preset's values (those the
    # form starts from); Gradio reads the signature for the parameters and the annotations for the request it passes
    default_name = default_preset()
    default = TRAIN_PRESETS[default_name]
    parameters = [inspect.Parameter('name', inspect.Parameter.POSITIONAL_OR_KEYWORD, default='my_vit', annotation=str),
                  inspect.Parameter('images', inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                    annotation=str | None)]
    parameters += [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=v, annotation=type(v))
                   for k, v in asdict(default).items()]
    parameters += [inspect.Parameter('request', inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                     annotation=gr.Request)]
    start_training.__signature__ = inspect.Signature(parameters)
    start_training.__annotations__ = {p.name: p.annotation for p in parameters}

    def stop_training(request: gr.Request):
        if server.job.stop(server.owner(request)):
            return 'Stopping: the run ends after its current step and keeps what it learned.'
        return gr.skip() if not server.job.busy else 'The run in progress is not yours to stop.'

    def checkpoints(request: gr.Request | None) -> list[str]:
        # our checkpoints this visitor may use; the pretrained ImageNet models know other classes
        return server.cache.store.checkpoint_names(server.owner(request))

    def teachers(request: gr.Request | None) -> list[tuple[str, str]]:
        return [('none', '')] + [(n, n) for n in checkpoints(request)]

    def refresh_teachers(request: gr.Request):
        return gr.Dropdown(choices=teachers(request)), gr.Dropdown(choices=checkpoints(request))

    def offer_download(checkpoint: str | None):
        # a copy the page can fetch: a visitor's models last as long as their page and the store's room
        if not checkpoint or not Path(checkpoint).is_file():
            return gr.DownloadButton(visible=False), gr.Markdown(visible=False)
        stem, size = Path(checkpoint).stem, Path(checkpoint).stat().st_size / 2 ** 20
        return (gr.DownloadButton(f'Download trained/{stem} ({size:,.1f} MB)',
                                  value=server.downloads.publish(checkpoint), visible=True),
                gr.Markdown(USE_DOWNLOAD.format(stem=stem), visible=True))

    @shows_user_errors(server)
    def add_model(checkpoint_file: str | None, request: gr.Request):
        if not checkpoint_file:
            return gr.skip(), gr.skip()
        path, left_out = add_checkpoint(server.cache.store, checkpoint_file, server.owner(request),
                                        server.policy.max_params)
        server.cache.forget(path)
        note = f'Added as `trained/{path.stem}`: pick it in any model list.'
        return note + (f' Left out: {"; ".join(left_out)}.' if left_out else ''), str(path)

    @shows_user_errors(server)
    def show_runs(names: list[str], against: str, request: gr.Request):
        histories = {}
        for name in names or []:
            path = server.cache.store.path(name, server.owner(request))
            if path is None:
                raise ValueError(f'{name!r} is not one of your models')
            histories[name] = read_metadata(path).get('history') or []
        return gr.LinePlot(runs_frame(histories, against), x_title='epoch' if against == 'epoch' else 'minutes')

    gr.Markdown('Train a small ViT from scratch on CIFAR-10 and watch it learn. The defaults finish in about ten '
                'minutes (on a 2-core CPU with bf16 arithmetic: 10-17 epochs, 75-80% validation accuracy; a random '
                'guess is 10%); the result joins every model list as `trained/NAME`. Train the CNN baseline '
                '(ResNet-18) the same way, then set the two side by side in Compare: ViT vs CNN on small data. '
                'Or fine-tune an ImageNet-pretrained ViT, on CIFAR-10 or on a zip of your own images.' + speed_note())
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            preset = gr.Dropdown(list(TRAIN_PRESETS), value=default_name, label='Preset')
            source = gr.Radio(['CIFAR-10', 'my own images (.zip)'], value='CIFAR-10', label='Train on')
            images = gr.File(file_types=['.zip'], type='filepath', label='Your images', visible=False)
            images_note = gr.Markdown(f'{ZipLimits().describe()}; each image is cropped to a square and shrunk '
                                      '(32 px, 64 px for a fine-tune). Nothing of it is kept but the model.',
                                      visible=False)
            form = dict(start_from=gr.Dropdown([('random weights: train from scratch', '')] +
                                               [(f'{a} (pretrained on ImageNet): fine-tune', a)
                                                for a in FINETUNE_ARCHS],
                                               value=default.start_from, label='Start from'))
            form['arch'] = gr.Radio([('ViT', 'vit'), ('ResNet-18, the CNN baseline', 'resnet18'),
                                     ('a fast 8-layer CNN (a teacher)', 'convnet')],
                                    value=default.arch, label='Model', visible=not default.start_from)
            with gr.Group(visible=bool(default.start_from)) as finetune_settings:
                form['finetune'] = gr.Radio([(v, k) for k, v in FINETUNE_MODES.items()], value=default.finetune,
                                            label='Fine-tune how')
                with gr.Row():
                    form['frozen_blocks'] = Number(default.frozen_blocks, precision=0,
                                                   label='Frozen blocks (partial)')
                    form['layer_decay'] = Number(default.layer_decay, label='Layer decay (full)')
                gr.Markdown(finetune_cost())
            name = gr.Textbox('my_vit', label='Save as', info=NAME_INFO_PUBLIC if server.policy.public else NAME_INFO)
            with gr.Row():
                start = gr.Button('Start', variant='primary')
                stop = gr.Button('Stop')
            download = gr.DownloadButton('Download the model', size='md', visible=False)
            download_note = gr.Markdown(visible=False)
            with gr.Accordion('Model and recipe', open=False):
                with gr.Column(visible=default.arch == 'vit') as vit_settings:
                    with gr.Row():
                        form['embed_dim'] = Number(default.embed_dim, label='Embed dim', precision=0)
                        form['depth'] = Number(default.depth, label='Depth (layers)', precision=0)
                        form['num_heads'] = Number(default.num_heads, label='Heads', precision=0)
                        form['patch_size'] = gr.Dropdown([2, 4, 8, 16], value=default.patch_size, label='Patch size')
                    with gr.Row():
                        form['pos_embed'] = gr.Radio(['learn', 'sincos'], value=default.pos_embed,
                                                     label='Position embedding: learned, or fixed sin-cos')
                        form['stem'] = gr.Radio([('3x3 convolutions (learns faster)', 'conv'),
                                                 ('3x3 convolutions, each halving the image (cheaper)', 'strided'),
                                                 ("one patch projection (timm's ViT)", 'patch'),
                                                 ("a ResNet stage (the ViT paper's hybrid)", 'hybrid')],
                                                value=default.stem, label='Tokens from')
                    form['patch_drop'] = Slider(0, 0.75, value=default.patch_drop, step=0.25,
                                                label='Share of patch tokens left out of each training image',
                                                info='PatchDropout: cheaper steps, so more epochs in the minutes. '
                                                     'Predictions see every patch, so validation accuracy can read '
                                                     'above training')
                    form['global_pool'] = gr.Radio([('the CLS token (as the ViT paper)', 'token'),
                                                    ('the mean of the patch tokens (learns faster)', 'avg')],
                                                   value=default.global_pool, label='Classify from',
                                                   info='with the mean, the maps show the attention each patch '
                                                        'receives: no CLS token decides')
                    form['optimizer'] = gr.Radio([('AdamW', 'adamw'),
                                                  ("Muon for the blocks' matrices (learns faster)", 'muon')],
                                                 value=default.optimizer, label='Optimizer',
                                                 info='Muon makes each update of a weight matrix orthogonal, so '
                                                      'every direction moves alike; the rest learns with AdamW, '
                                                      'as does a fine-tune')
                with gr.Row():
                    form['minutes'] = Number(default.minutes, label='Minutes')
                    form['batch_size'] = Number(default.batch_size, label='Batch size', precision=0)
                    form['lr'] = Number(default.lr, label='Learning rate')
                form['crop_padding'] = Number(default.crop_padding, precision=0,
                                              label='Random crops: padding in pixels (0: flips only)')
            with gr.Accordion('Distillation: a trained model teaches (DeiT)', open=False):
                form['teacher'] = gr.Dropdown(teachers(None), value=default.teacher, label='Teacher',
                                              info="a ViT student gets DeiT's distillation token, which learns the "
                                                   "teacher's answers while the CLS token learns the labels")
                form['distill'] = gr.Radio([("hard: the teacher's top class", 'hard'),
                                            ('soft: its whole distribution (temperature 3)', 'soft')],
                                           value=default.distill, label='Learn from the teacher')
                form['teacher_once'] = gr.Checkbox(default.teacher_once, label="The teacher answers once per image "
                                                   "and its mirror, before the first step",
                                                   info='measured faster at ten minutes than an answer for '
                                                        'every crop (more epochs in the budget)')
            with gr.Accordion('Bring back a model you downloaded', open=False):
                model_file = gr.File(file_types=['.safetensors'], type='filepath', elem_classes=['bring-back'],
                                     label='A .safetensors file of vitdemo')
                model_note = gr.Markdown('This tab\'s download, or a model trained with `python -m vitdemo.train`. It '
                                         'joins your models as `trained/NAME`, checked and written again: its '
                                         'weights, classes, training curves and attention through training, nothing '
                                         'else of the file.')
        with gr.Column(scale=2):
            # the plots stay hidden until they have something to show: empty frames tell a stranger nothing
            status = gr.HTML('<p>Press Start. After the first epoch, the loss and accuracy curves appear here, '
                             'and where the model looks.</p>')
            with gr.Row():
                loss_plot = gr.LinePlot(x='epoch', y='value', color='split', title='Loss', y_title='loss',
                                        x_title='epoch', height=260, visible=False, elem_classes=['curves'])
                accuracy_plot = gr.LinePlot(x='epoch', y='value', color='split', title='Accuracy', y_title='accuracy',
                                            x_title='epoch', height=260, visible=False, elem_classes=['curves'])
            snapshot = gr.Gallery(label=SNAPSHOT_LABEL, columns=5, fit_columns=False, height='auto',
                                  object_fit='contain', format='jpeg', allow_preview=False, elem_classes=['maps'],
                                  visible=False)
            film_plot = gr.Plot(label='Attention through training', show_label=False,
                                elem_classes=['filmstrip'], visible=False)
            with gr.Accordion('Runs side by side: the validation accuracy of any of your models', open=False):
                with gr.Row():
                    runs = gr.Dropdown(checkpoints(None), multiselect=True, label='Runs', scale=3,
                                       info='e.g. a ViT and the ResNet-18, or a run with a teacher and one without')
                    against = gr.Radio(['epoch', 'minutes'], value='epoch', label='Against', scale=1)
                runs_plot = gr.LinePlot(x='x', y='accuracy', color='run', x_title='epoch',
                                        y_title='validation accuracy', height=300, show_label=False)
                runs_note = gr.Markdown()
    saved = gr.State(None)

    inputs = [form[k] for k in FORM_FIELDS]  # the order of TrainForm: no other list to keep in step
    preset.change(lambda p: [getattr(TRAIN_PRESETS[p], k) for k in FORM_FIELDS], preset, inputs,
                  api_visibility='private')
    form['arch'].change(lambda a: gr.Column(visible=a == 'vit'), form['arch'], vit_settings, api_visibility='private')
    # a taught ViT learns the teacher in a token of its own beside the CLS token, which is then what it classifies;
    # without a teacher, the preset's choice again. Switched in the browser: a Start pressed before a server's
    # answer came back would send the old choice, and be refused for it
    pools = json.dumps({name: p.global_pool for name, p in TRAIN_PRESETS.items()})
    form['teacher'].change(None, [form['teacher'], preset, form['global_pool']], form['global_pool'],
                           js=f'(teacher, preset, pool) => teacher ? "token" : ({pools}[preset] ?? pool)',
                           api_visibility='private')
    source.change(lambda s: (gr.File(visible=s != 'CIFAR-10', value=None), gr.Markdown(visible=s != 'CIFAR-10')),
                  source, [images, images_note], api_visibility='private')
    form['start_from'].change(lambda a: (gr.Group(visible=bool(a)), gr.Radio(visible=not a)), form['start_from'],
                              [finetune_settings, form['arch']], api_visibility='private')

    def suggest_batch(preset_name: str, start_from: str, finetune: str):
        # the preset's batch, or less where this server could not train it: not refused at Start
        try:
            return server.job.batch_for(replace(TRAIN_PRESETS[preset_name], start_from=start_from,
                                                finetune=finetune))
        except (KeyError, ValueError):  # a value the form refuses at Start, with its message
            return gr.skip()

    gr.on([form['start_from'].change, form['finetune'].change], suggest_batch,
          [preset, form['start_from'], form['finetune']], form['batch_size'], api_visibility='private',
          show_progress='hidden')
    public = server.policy.public  # (locally, one user owns every model: a new page lists it)
    if public:
        # while a run goes on, the browser asks before the page is left: the run would finish, but its model
        # belongs to this page's session, which a reload ends, and the new page could not see it. Wired before
        # the run: Gradio's page ran a browser-only event wired after it on the same click once the run ended
        ask = f'(e) => {{ e.preventDefault(); return {LEAVING!r}; }}'
        start.click(None, js=f'() => {{ window.onbeforeunload = {ask}; }}')
    run = start.click(start_training, [name, images] + inputs,
                      [status, loss_plot, accuracy_plot, snapshot, film_plot, saved],
                      api_name='train', concurrency_limit=2, concurrency_id='train')
    keeps_errors(run, server, status)
    if public:
        run.then(None, js='() => { window.onbeforeunload = null; }')
    stop.click(stop_training, None, status, api_name='stop_training')
    keeps_errors(model_file.upload(add_model, model_file, [model_note, saved], api_name='add_model'), server,
                 model_note)
    # each click renews the copy for the next one: the cache's sweep removes files some minutes old
    gr.on([saved.change, download.click], offer_download, saved, [download, download_note], api_visibility='private',
          show_progress='hidden')
    gr.on([page_load, saved.change], refresh_teachers, None, [form['teacher'], runs], api_visibility='private',
          show_progress='hidden')
    keeps_errors(gr.on([runs.change, against.change], show_runs, [runs, against], runs_plot,
                       api_visibility='private'), server, runs_note)
    return saved
