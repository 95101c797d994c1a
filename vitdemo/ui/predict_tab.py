"""The Predict tab: an image and a model in; the top classes and, layer by layer, where the CLS token looks."""
import gradio as gr

from ..methods import METHODS
from ..views import FUSIONS, Explanations, StillMaking, colour_bar_html, predict_view, sanity_view
from .common import (MODEL_WORK, Server, Slider, bounded, example_picker, image_box, joins_running, keeps_errors,
                     model_list, published, releases_workers, session_of, shows_user_errors)


def predict_tab(server: Server) -> list[gr.Dropdown]:
    """Builds the tab and wires its events; returns its model lists, for the app to keep up to date."""
    first, _ = server.defaults()
    layers, heads = server.shape(first, None)
    remembered = Explanations()

    @shows_user_errors(server)
    @releases_workers
    @joins_running
    def predict(image: bytes, model: str, top_k: int = 5, fusion: str = 'mean', head: int = 1,
                opacity: float = 0.6, discard_ratio: float = 0.9, scale: str = 'own', method: str = 'attention',
                target: str = '', layer: int = 0, keep: float = 0.0, request: gr.Request = None,
                progress=gr.Progress(track_tqdm=True), start_slow: bool = True):
        what = METHODS[method].short if method in METHODS else 'the explanation'
        with server.explaining(request, progress, f'{what} on {model}', fresh=start_slow) as tell:
            chosen = server.model(model, request, progress)  # inside: a Stop clicked while it loads still counts
            try:
                view = predict_view(chosen, image, top_k, fusion, head, opacity, discard_ratio, scale, method,
                                    target or None, layer or None, keep, tell, remembered, start_slow=start_slow,
                                    asker=session_of(request))
            except StillMaking:  # an option moved while this visitor's slow method runs: its answer draws the maps
                return gr.skip()
        return view.labels, published(view.gallery), view.text, view.focus

    @shows_user_errors(server)
    @releases_workers
    @joins_running  # the page sends one click at a time (Gradio's trigger_mode 'once'); an API client may not
    def sanity(image: bytes, model: str, method: str = 'attention', target: str = '', request: gr.Request = None,
               progress=gr.Progress()):
        what = METHODS[method].short if method in METHODS else 'the sanity check'
        with server.explaining(request, progress, f'sanity check of {what}') as tell:
            gallery, text = sanity_view(server.model(model, request), image, method, target or None, tell)
        return gr.Gallery(published(gallery), visible=bool(gallery)), text

    def redraw(image, model, top_k, fusion, head, opacity, discard_ratio, scale, method, target, layer, keep,
               request: gr.Request, progress=gr.Progress(track_tqdm=True), start_slow: bool = True):
        # a control changed: draw again, once there is an image to draw on
        if image is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        if target and target not in server.classes(model, request):  # the class of the model chosen before
            target = ''
        return predict(image, model, top_k, fusion, head, opacity, discard_ratio, scale, method, target, layer, keep,
                       request, progress, start_slow)

    def restyle(image, model, top_k, fusion, head, opacity, discard_ratio, scale, method, target, layer, keep,
                request: gr.Request, progress=gr.Progress(track_tqdm=True)):
        # an option moved: the attention methods (fast) answer it, the slow ones only redraw what they made:
        # they run when asked, or a slow method just stopped would start again on every move
        return redraw(image, model, top_k, fusion, head, opacity, discard_ratio, scale, method, target, layer, keep,
                      request, progress, start_slow=False)

    def follow_method(method: str):
        # maps that come in pairs are read two to a row
        return gr.Gallery(columns=2 if method in METHODS and METHODS[method].paired else 3)

    def follow_model(model: str, head, method: str, layer, request: gr.Request):
        # the head and layer sliders, the methods and the classes of the chosen model; a CNN has no focus line.
        # A value is sent only where the new model cannot keep it: this answer can land after the visitor has
        # already picked another method, head or layer, and must not set that pick back.
        layers, heads = server.shape(model, request)
        methods = server.methods(model, request)
        reset = {} if method in [v for _, v in methods] else {'value': methods[0][1]}
        return (bounded(head, 1, max(heads, 1), interactive=heads > 0),
                gr.Dropdown(choices=methods, **reset),
                gr.Dropdown(choices=[''] + server.classes(model, request), value=''),
                bounded(layer, 0, layers, interactive=heads > 0),
                gr.LinePlot(visible=heads > 0))

    def explain_class(evt: gr.SelectData, method: str, model: str, request: gr.Request):
        # a class clicked among the predictions: explain it, with a method that takes a class
        methods = [v for _, v in server.methods(model, request)]
        chosen = method if METHODS.get(method) and METHODS[method].per_class else \
            next((m for m in methods if METHODS[m].per_class), method)
        return evt.value if isinstance(evt.value, str) else str(evt.value), chosen

    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            image = image_box()
            example_picker(image, 'Examples (CIFAR-10 photos first): click one to predict')
            model = model_list(server, 'Model', first)
            method = gr.Dropdown(server.methods(first, None), value=server.methods(first, None)[0][1],
                                 label='Explain with', info='methods marked slow show their progress and can be '
                                                            'stopped')
            target = gr.Dropdown([''] + server.classes(first, None), value='', label='Class to explain',
                                 info='empty: the predicted class; or click a class among the predictions',
                                 allow_custom_value=True, filterable=True)
            with gr.Row():
                run = gr.Button('Predict', variant='primary', scale=3)
                halt = gr.Button('Stop', variant='stop', scale=1, min_width=80)
        with gr.Column(scale=2):  # on a phone this column follows the few controls above, not all of them
            label = gr.Label(label='Predictions')
            info = gr.Markdown()
            with gr.Accordion('Options: top-k, heads, layer, opacity, rollout, colour scale', open=False):
                top_k = Slider(1, 10, value=5, step=1, label='Top-k predictions')
                fusion = gr.Radio(FUSIONS, value='mean', label='Fuse heads by')
                head = Slider(1, max(heads, 1), value=1, step=1, label="Head (for 'one head')")
                layer = Slider(0, layers, value=0, step=1, label="Layer (for 'every head'; 0: the last)")
                keep = Slider(0.0, 0.95, value=0.0, step=0.05,
                              label="'every head': keep the patches holding this share of the attention (0: all)",
                              info="DINO's threshold: 0.6 shows where each head puts most of its attention")
                opacity = Slider(0.0, 1.0, value=0.6, step=0.05, label='Overlay opacity')
                discard_ratio = Slider(0.0, 0.99, value=0.9, step=0.01,
                                       label='Rollout: discard the weakest fraction of attention')
                scale = gr.Radio([('each map its own range', 'own'), ('one scale for all layers', 'shared')],
                                 value='own', label='Colour scale',
                                 info='one scale shows attention go from scattered to focused with depth')
            # JPEG: encoding eight overlays takes 3 ms, against 80 ms as WebP (Gradio's default); columns not
            # fitted to fewer pictures: the input alone (a stopped method) is a thumbnail, not the column's width
            gallery = gr.Gallery(label='The maps, layer by layer',
                                 columns=3, height='auto', object_fit='contain', format='jpeg', fit_columns=False,
                                 elem_classes=['maps'])
            gr.HTML(colour_bar_html())
            # no fixed height: with one, the block's label pushes the legend and the caption out of view
            focus = gr.LinePlot(x='layer', y='entropy', color='line', y_lim=[0, None], color_title='attention',
                                color_map={'this image': '#1f77b4', 'spread evenly': '#ff7f0e'},
                                x_axis_format='d', caption='spread evenly: the same attention on every patch, '
                                                           'no focus at all (the highest entropy there is)',
                                label="How focused each layer's attention is (entropy of its map over the patches: "
                                      'lower is more focused)', x_title='layer', y_title='entropy (nats)')
            check = gr.Button('Sanity check: redraw the weights at random, does the map change?')
            check_text = gr.Markdown()
            # hidden until asked: an empty gallery reads as a picture that failed to load
            check_gallery = gr.Gallery(show_label=False, columns=2, height='auto', object_fit='contain',
                                       format='jpeg', elem_classes=['maps'], elem_id='sanity-maps', visible=False)

    inputs = [image, model, top_k, fusion, head, opacity, discard_ratio, scale, method, target, layer, keep]
    outputs = [label, gallery, info, focus]
    keeps_errors(run.click(predict, inputs, outputs, api_name='predict', **MODEL_WORK), server, info)
    keeps_errors(gr.on([image.change, model.change, method.change, target.change], redraw, inputs, outputs,
                       api_visibility='private', trigger_mode='always_last', **MODEL_WORK), server, info)
    keeps_errors(gr.on([fusion.change, head.release, opacity.release, discard_ratio.release, scale.change,
                        layer.release, keep.release], restyle, inputs, outputs,
                       api_visibility='private', trigger_mode='always_last', **MODEL_WORK), server, info)
    keeps_errors(check.click(sanity, [image, model, method, target], [check_gallery, check_text], api_name='sanity',
                             **MODEL_WORK), server, check_text)
    # not queued behind the model work it stops
    halt.click(server.stop, None, None, api_visibility='private', concurrency_limit=None)
    model.change(follow_model, [model, head, method, layer], [head, method, target, layer, focus],
                 api_visibility='private')
    method.change(follow_method, method, gallery, api_visibility='private')
    label.select(explain_class, [method, model], [target, method], api_visibility='private')
    return [model]
