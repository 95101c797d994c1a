"""vitdemo: see how a Vision Transformer sees. `python app.py` serves it on http://127.0.0.1:7860.

This file only wires Gradio components to functions of the `vitdemo` package.
"""
from pathlib import Path

import gradio as gr

from vitdemo.backends import DEFAULT_SCRATCH, ModelCache, ModelUnavailable, list_models
from vitdemo.images import ImageError
from vitdemo.views import FUSIONS, predict_view
from vitdemo.weights import CheckpointError

EXAMPLES = sorted(str(p) for p in (Path(__file__).parent / 'examples').glob('*.*') if p.suffix != '.md')
USER_ERRORS = (ImageError, ModelUnavailable, CheckpointError, ValueError)

INTRO = """# vitdemo: how a Vision Transformer sees
Upload an image and pick a model: you get its top predictions and, for every layer, where the **CLS token**
looks (the token whose final state is classified). The last map, *rollout*, follows attention through all
layers at once. `scratch/` models are our ViT trained from scratch on CIFAR-10; `timm/` are timm's
ImageNet-1k ViTs; `ours/` run the same ImageNet weights on our own from-scratch code."""


def create_demo(cache: ModelCache | None = None) -> gr.Blocks:
    cache = cache or ModelCache()
    names = list_models(cache.weights_dir)
    has_scratch = any(n.startswith('scratch/') for n in names)

    def predict(image: str, model: str, top_k: int = 5, fusion: str = 'mean', head: int = 0,
                opacity: float = 0.6, discard_ratio: float = 0.9, progress=gr.Progress(track_tqdm=True)):
        try:
            if model not in cache:
                progress(0, desc=f'Loading {model} (the first time downloads its weights)')
            return predict_view(cache.get(model), image, top_k, fusion, head, opacity, discard_ratio)
        except USER_ERRORS as e:
            raise gr.Error(str(e), print_exception=False) from None

    def refresh(image, *rest):
        # re-draw when a control changes, once there is an image to draw on
        return gr.skip() if image is None else predict(image, *rest)

    with gr.Blocks(title='vitdemo') as demo:
        gr.Markdown(INTRO)
        if not has_scratch:
            gr.Markdown(f'*No trained scratch weights are present (expected `weights/{DEFAULT_SCRATCH[8:]}'
                        '.safetensors`): train one with `python -m vitdemo.train`, or use a pretrained model.*')
        with gr.Tab('Predict'):
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.File(label='Image', file_types=['image'], type='filepath')
                    model = gr.Dropdown(names, value=names[0], label='Model')
                    top_k = gr.Slider(1, 10, value=5, step=1, label='Top-k predictions')
                    with gr.Accordion('Attention view', open=True):
                        fusion = gr.Radio(FUSIONS, value='mean', label='Fuse heads by')
                        head = gr.Slider(0, 15, value=0, step=1, label="Head (for 'one head')")
                        opacity = gr.Slider(0.0, 1.0, value=0.6, step=0.05, label='Overlay opacity')
                        discard_ratio = gr.Slider(0.0, 0.99, value=0.9, step=0.01,
                                                  label='Rollout: discard the weakest fraction of attention')
                    run = gr.Button('Predict', variant='primary')
                    gr.Examples(EXAMPLES, inputs=[image], label='Example images')
                with gr.Column(scale=2):
                    label = gr.Label(label='Predictions')
                    info = gr.Markdown()
                    gallery = gr.Gallery(label='Where the CLS token looks, layer by layer', columns=4,
                                         height='auto', object_fit='contain')
        inputs = [image, model, top_k, fusion, head, opacity, discard_ratio]
        outputs = [label, gallery, info]
        run.click(predict, inputs, outputs, api_name='predict')
        gr.on([image.upload, model.change, fusion.change, head.release, opacity.release, discard_ratio.release],
              refresh, inputs, outputs, api_visibility='private', trigger_mode='always_last')
    return demo


if __name__ == '__main__':
    create_demo().queue(default_concurrency_limit=2).launch()
