"""The Compare tab: one image, two models side by side, their layers paired by relative depth."""
import gradio as gr

from ..lazy import late_import
from ..views import FUSIONS, colour_bar_html, fusion_mode
from .common import (MODEL_WORK, Server, example_picker, image_box, joins_running, keeps_errors, model_list,
                     published, releases_workers, shows_user_errors)


def compare_tab(server: Server) -> list[gr.Dropdown]:
    """Builds the tab and wires its events; returns its model lists, for the app to keep up to date."""
    first, second = server.defaults()

    @shows_user_errors(server)
    @releases_workers
    @joins_running
    def compare(image: bytes, model_a: str, model_b: str, fusion: str = 'mean', as_cifar10: bool = True,
                request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
        fusion = fusion_mode(fusion)  # checked before any model loads
        compare_view = late_import('vitdemo.compare').compare_view
        a, b, gallery, text = compare_view(server.model(model_a, request, progress),
                                           server.model(model_b, request, progress), image, fusion, bool(as_cifar10))
        return a, b, published(gallery), text

    def recompare(image, model_a, model_b, fusion, as_cifar10, request: gr.Request,
                  progress=gr.Progress(track_tqdm=True)):
        # an image, a model or an option changed: compare again, once there is an image (as Predict does)
        if image is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return compare(image, model_a, model_b, fusion, as_cifar10, request, progress)

    gr.Markdown('One image, two models. Layers are paired by relative depth (a 6-layer and a 12-layer model line '
                'up); each pair is scored by how much their attention overlaps. A CNN (the shipped '
                '`scratch/convnet_cifar10`, or one trained in the Train tab) shows the Grad-CAM of each stage instead.')
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            image = image_box()
            example_picker(image, 'Examples: click one to compare')
            model_a = model_list(server, 'Model A', first)
            model_b = model_list(server, 'Model B', second)
            run = gr.Button('Compare', variant='primary')
            fusion = gr.Radio(FUSIONS[:3], value='mean', label='Fuse heads by')
            as_cifar10 = gr.Checkbox(True, label='Read ImageNet predictions as CIFAR-10 classes')
        with gr.Column(scale=2):
            with gr.Row():
                label_a = gr.Label(label='Model A')
                label_b = gr.Label(label='Model B')
            text = gr.Markdown()
            gallery = gr.Gallery(label='A | B, one pair of layers a row, then both rollouts', columns=2,
                                 height='auto', object_fit='contain', format='jpeg',
                                 elem_classes=['maps'])
            gr.HTML(colour_bar_html())
    inputs, outputs = [image, model_a, model_b, fusion, as_cifar10], [label_a, label_b, gallery, text]
    keeps_errors(run.click(compare, inputs, outputs, api_name='compare', **MODEL_WORK), server, text)
    keeps_errors(gr.on([image.change, model_a.change, model_b.change, fusion.change, as_cifar10.change], recompare,
                       inputs, outputs, api_visibility='private', trigger_mode='always_last', **MODEL_WORK),
                 server, text)
    return [model_a, model_b]
