"""The Predict tab: an image and a model in; the top classes and, layer by layer, where the CLS token looks."""
import gradio as gr

from ..views import FUSIONS, colour_bar, predict_view, sanity_view
from .common import (MODEL_WORK, Server, Slider, example_picker, image_box, keeps_errors, model_list, published,
                     shows_user_errors)


def predict_tab(server: Server) -> list[gr.Dropdown]:
    """Builds the tab and wires its events; returns its model lists, for the app to keep up to date."""
    first, _ = server.defaults()
    layers, heads = server.shape(first, None)

    @shows_user_errors(server)
    def predict(image: bytes, model: str, top_k: int = 5, fusion: str = 'mean', head: int = 1,
                opacity: float = 0.6, discard_ratio: float = 0.9, scale: str = 'own', method: str = 'attention',
                target: str = '', request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
        labels, gallery, text = predict_view(server.model(model, request, progress), image, top_k, fusion, head,
                                             opacity, discard_ratio, scale, method, target or None)
        return labels, published(gallery), text

    @shows_user_errors(server)
    def sanity(image: bytes, model: str, method: str = 'attention', target: str = '', request: gr.Request = None):
        gallery, text = sanity_view(server.model(model, request), image, method, target or None)
        return published(gallery), text

    def redraw(image, model, top_k, fusion, head, opacity, discard_ratio, scale, method, target,
               request: gr.Request):
        # a control changed: draw again, once there is an image to draw on
        if image is None:
            return gr.skip(), gr.skip(), gr.skip()
        return predict(image, model, top_k, fusion, head, opacity, discard_ratio, scale, method, target, request)

    def follow_model(model: str, head, method: str, request: gr.Request):
        # the head slider, the methods and the classes of the chosen model
        _, heads = server.shape(model, request)
        methods = server.methods(model, request)
        return (gr.Slider(minimum=1, maximum=max(heads, 1), value=min(max(int(head or 1), 1), max(heads, 1)),
                          interactive=heads > 0),
                gr.Radio(choices=methods, value=method if method in [v for _, v in methods] else methods[0][1]),
                gr.Dropdown(choices=[''] + server.classes(model, request), value=''))

    def explain_class(evt: gr.SelectData, method: str, model: str, request: gr.Request):
        # a class clicked among the predictions: explain it, with a method that takes a class
        methods = [v for _, v in server.methods(model, request)]
        chosen = method if method != 'attention' else next((m for m in methods if m != 'attention'), method)
        return evt.value if isinstance(evt.value, str) else str(evt.value), chosen

    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            image = image_box()
            example_picker(image, 'Examples (CIFAR-10 photos first): click one to predict')
            model = model_list(server, 'Model', first)
            method = gr.Radio(server.methods(first, None), value=server.methods(first, None)[0][1],
                              label='Explain with')
            target = gr.Dropdown([''] + server.classes(first, None), value='', label='Class to explain',
                                 info='empty: the predicted class; or click a class among the predictions',
                                 allow_custom_value=True, filterable=True)
            run = gr.Button('Predict', variant='primary')
        with gr.Column(scale=2):  # on a phone this column follows the few controls above, not all of them
            label = gr.Label(label='Predictions')
            info = gr.Markdown()
            with gr.Accordion('Options: top-k, heads, opacity, rollout, colour scale', open=False):
                top_k = Slider(1, 10, value=5, step=1, label='Top-k predictions')
                fusion = gr.Radio(FUSIONS, value='mean', label='Fuse heads by')
                head = Slider(1, max(heads, 1), value=1, step=1, label="Head (for 'one head')")
                opacity = Slider(0.0, 1.0, value=0.6, step=0.05, label='Overlay opacity')
                discard_ratio = Slider(0.0, 0.99, value=0.9, step=0.01,
                                       label='Rollout: discard the weakest fraction of attention')
                scale = gr.Radio([('each map its own range', 'own'), ('one scale for all layers', 'shared')],
                                 value='own', label='Colour scale',
                                 info='one scale shows attention go from scattered to focused with depth')
            # JPEG: encoding eight overlays takes 3 ms, against 80 ms as WebP (Gradio's default)
            gallery = gr.Gallery(label='The maps, layer by layer (brighter: more attention, or more relevance)',
                                 columns=3, height='auto', object_fit='contain', format='jpeg',
                                 elem_classes=['maps'])
            gr.Image(colour_bar(), show_label=False, interactive=False, container=False, buttons=[])
            check = gr.Button('Sanity check: redraw the weights at random, does the map change?')
            check_text = gr.Markdown()
            check_gallery = gr.Gallery(show_label=False, columns=2, height='auto', object_fit='contain',
                                       format='jpeg', elem_classes=['maps'])

    inputs = [image, model, top_k, fusion, head, opacity, discard_ratio, scale, method, target]
    outputs = [label, gallery, info]
    keeps_errors(run.click(predict, inputs, outputs, api_name='predict', **MODEL_WORK), server, info)
    keeps_errors(gr.on([image.change, model.change, fusion.change, head.release, opacity.release,
                        discard_ratio.release, scale.change, method.change, target.change], redraw, inputs, outputs,
                       api_visibility='private',
                       trigger_mode='always_last', **MODEL_WORK), server, info)
    keeps_errors(check.click(sanity, [image, model, method, target], [check_gallery, check_text], api_name='sanity',
                             **MODEL_WORK), server, check_text)
    model.change(follow_model, [model, head, method], [head, method, target], api_visibility='private')
    label.select(explain_class, [method, model], [target, method], api_visibility='private')
    return [model]
