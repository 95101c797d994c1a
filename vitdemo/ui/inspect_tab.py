"""The Inspect tab: the ViT paper's Fig. 7 computed live from the chosen model, and click-a-patch."""
import gradio as gr

from ..catalog import DEFAULT_SCRATCH
from ..filmstrip import IMAGES, Filmstrip, filmstrip_figure
from ..lazy import late_import
from ..metadata import read_metadata
from ..policy import checked_number
from ..serving import publish_image
from ..views import FUSIONS, fusion_mode
from .common import (MODEL_WORK, Reporter, Server, Slider, bounded, example_picker, image_box, joins_running,
                     keeps_errors, model_list, releases_workers, shows_user_errors)


NO_FILMSTRIP = ("This model kept no filmstrip: a ViT trained here (the Train tab or the command line) keeps "
                "every layer's attention on four validation images after each epoch. The shipped and pretrained "
                "models were trained before, or elsewhere.")


def testing(share: float | None = None) -> str:
    done = f' ({share:.0%} done)' if share is not None else ''
    return (f'**Testing whether the maps can be trusted{done}:** its curves appear below, beside the position '
            'embeddings, when it ends (seconds on a CIFAR-10 model, most of a minute on ViT-B/16: Stop ends it).')


def inspect_tab(server: Server) -> list[gr.Dropdown]:
    """Builds the tab and wires its events; returns its model lists, for the app to keep up to date."""
    first, _ = server.defaults()
    layers, _ = server.shape(first, None)

    @shows_user_errors(server)
    @releases_workers
    @joins_running
    def inspect(image: bytes, model: str, layer: int = 1, fusion: str = 'mean', point=None,
                request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
        fusion = fusion_mode(fusion)  # checked before any model loads
        # only a large input's test is slow work (`figures.inspect_steps`): a CIFAR-10 model's takes seconds
        with server.explaining(request, progress, 'the faithfulness test',
                               otherwise=f'pick a model of 32-pixel images such as {DEFAULT_SCRATCH}, whose test '
                                         'takes seconds',
                               faster='pick a smaller model') as tell:
            inspect_steps = late_import('vitdemo.figures').inspect_steps
            reporter = Reporter(tell)
            steps = inspect_steps(server.model(model, request, progress), image, progress=reporter.report,
                                  point=point and tuple(point), layer=layer, fusion=fusion)
            # the figures while the test runs (most of the work on a large model), its progress in the note:
            # Gradio shows no progress bar after a first answer. Then the whole view again, since an API client
            # keeps only the last answer
            yield shown(next(steps), testing())
            for share in reporter.run(lambda: next(steps)):
                yield (gr.skip(),) * 10 + (testing(share),)
            view = reporter.result()
        yield shown(view, view.note)

    def shown(view, note: str) -> tuple:
        # a test not run (yet, or stopped) hides its frame: an empty plot reads as a figure that failed to draw
        picture, caption = view.patch
        return (publish_image(view.grid), view.costs, view.positions, view.filters, view.distance, view.entropy,
                gr.Plot(view.faithfulness, visible=view.faithfulness is not None), view.sizes,
                publish_image(picture), caption, note)

    def reinspect(image: bytes, model: str, layer: int, fusion: str, point, request: gr.Request,
                  progress=gr.Progress(track_tqdm=True)):
        # an image or a model changed: inspect again, once there is an image (as Predict predicts)
        if image is None:
            yield (gr.skip(),) * 11
            return
        yield from inspect(image, model, layer, fusion, point, request, progress)

    @shows_user_errors(server)
    @releases_workers
    def look_from_patch(image: bytes, model: str, layer: int, fusion: str, point, request: gr.Request):
        # no point (no click on this grid yet): the centre patch
        if image is None:
            return gr.skip(), gr.skip()
        fusion = fusion_mode(fusion)
        patch_view = late_import('vitdemo.figures').patch_view
        picture, caption = patch_view(server.model(model, request), image, point and tuple(point), layer, fusion)
        return publish_image(picture), caption

    @shows_user_errors(server)
    def through_training(model: str, which, request: gr.Request):
        path = server.cache.store.path(model, server.owner(request))
        meta = read_metadata(path) if path else {}
        if not meta.get('filmstrip'):
            return None, NO_FILMSTRIP
        strip = Filmstrip.from_metadata(meta['filmstrip'])
        which = checked_number(which, 'image', 1, len(strip.labels), integer=True)
        return filmstrip_figure(strip, which - 1, meta['classes']), ''

    def clicked(evt: gr.SelectData):
        return evt.index

    def bound_layer(model: str, layer, request: gr.Request):
        layers, _ = server.shape(model, request)
        return bounded(layer, 1, layers)

    gr.Markdown("The figures of the ViT paper (Fig. 7), computed live from the chosen model: how it cuts the image "
                "into patches, what its position embeddings learned, what its first layer compares patches with, "
                "and how far and how widely each head looks on your image.")
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            image = image_box()
            example_picker(image, 'Examples: click one to inspect')
            model = model_list(server, 'Model', first)
            with gr.Row():
                run = gr.Button('Inspect', variant='primary', scale=3)
                # a large model's faithfulness test runs for most of a minute on a CPU
                halt = gr.Button('Stop', variant='stop', scale=1, min_width=80)
        with gr.Column(scale=2):
            note = gr.Markdown()
            with gr.Row():
                grid_image = gr.Image(label='The patches the model sees: click one', interactive=False, height=320)
                with gr.Column():
                    patch_image = gr.Image(label='Where the clicked patch looks', interactive=False, height=320)
                    patch_caption = gr.Markdown('**Click a patch** in the grid to see where *that* patch looks.')
                    patch_layer = Slider(1, layers, value=1, step=1, label='Layer')
                    patch_fusion = gr.Radio(FUSIONS[:3], value='mean', label='Fuse heads by')
            # short headers: at a phone's width the four columns fit without scrolling
            costs = gr.Dataframe(headers=['patch', 'grid', 'tokens', 'pairs'],
                                 label='Tokens at this input size, by patch size, and the pairs of them each '
                                       'attention head compares (tokens squared: its cost)',
                                 interactive=False)
            sizes = gr.Dataframe(headers=['model', 'params (M)', 'GMACs', 'layers', 'width', 'heads', 'MLP'],
                                 label="The ViT paper's sizes at this input and patch size, and this model "
                                       "(GMACs: billions of multiply-adds per image)",
                                 interactive=False)
            with gr.Row():
                position_plot = gr.Plot(label='Position embeddings', show_label=False)
                deletion_plot = gr.Plot(label='Can I trust a map', show_label=False)
            with gr.Row():
                distance_plot = gr.Plot(label='Mean attention distance', show_label=False)
                entropy_plot = gr.Plot(label='Attention entropy', show_label=False)
            filters_plot = gr.Plot(label='Patch embedding filters', show_label=False)
            with gr.Accordion('Attention through training: every layer, after each epoch, on a few validation '
                              'images (the runs trained here keep it)', open=False) as film_section:
                film_image = gr.Radio(list(range(1, IMAGES + 1)), value=1, label='Image')
                film_note = gr.Markdown()
                film_plot = gr.Plot(label='Attention through training', show_label=False,
                                    elem_classes=['filmstrip'])
    point = gr.State(None)
    # where a patch looks (the one clicked last, or the centre) comes with the rest, from the same forward pass
    inputs = [image, model, patch_layer, patch_fusion, point]
    outputs = [grid_image, costs, position_plot, filters_plot, distance_plot, entropy_plot, deletion_plot, sizes,
               patch_image, patch_caption, note]
    keeps_errors(run.click(inspect, inputs, outputs, api_name='inspect', **MODEL_WORK), server, note)
    # a point clicked on one image's grid means nothing on another's: forgotten before the new one is inspected
    forget = gr.on([image.change, model.change], lambda: None, None, point, api_visibility='private', queue=False)
    keeps_errors(forget.then(reinspect, inputs, outputs, api_visibility='private', trigger_mode='always_last',
                             **MODEL_WORK), server, note)
    # not queued behind the model work it stops
    halt.click(server.stop, None, None, api_visibility='private', concurrency_limit=None)
    # a click, another layer or fusion: only the look is drawn again
    look = dict(fn=look_from_patch, inputs=inputs, outputs=[patch_image, patch_caption], api_visibility='private',
                trigger_mode='always_last', **MODEL_WORK)
    keeps_errors(grid_image.select(clicked, None, point, api_visibility='private').success(**look), server,
                 patch_caption)
    keeps_errors(gr.on([patch_layer.release, patch_fusion.change], **look), server, patch_caption)
    model.change(bound_layer, [model, patch_layer], patch_layer, api_visibility='private')
    keeps_errors(gr.on([film_section.expand, model.change, film_image.change], through_training, [model, film_image],
                       [film_plot, film_note], api_visibility='private'), server, film_note)
    return [model]
