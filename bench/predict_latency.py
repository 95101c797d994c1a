"""Single-image latency of `Model.predict` (with every layer's attention) for each backend, next to timm's
plain forward of the same network with the same weights, measured side by side in one run.

    python bench/predict_latency.py            # all backends, 30 rounds
    python bench/predict_latency.py --rounds 10 --models timm/vit_tiny_patch16_224
    python bench/predict_latency.py --explain  # each explanation method's cost, shipped model and ViT-B/16
    python bench/predict_latency.py --device cuda --models timm/vit_base_patch16_224 ours/vit_base_patch16_224

Speed does not depend on the weights' values, so the pretrained models run on random weights written to a
temporary folder (no download needed); the scratch model is the shipped checkpoint when present.
Rounds interleave the contenders, so a busy machine slows all of them alike; medians are reported.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vitdemo.backends import load_model  # noqa: E402
from vitdemo.catalog import OURS_ARCHS, TIMM_ARCHS, WEIGHTS_DIR  # noqa: E402
from vitdemo.explain import explain, methods_for  # noqa: E402
from vitdemo.methods import METHODS  # noqa: E402
from vitdemo.model import VisionTransformer  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / 'examples' / 'cat.jpg'


def plain_timm_twin(model) -> torch.nn.Module:
    """timm's VisionTransformer with the weights of `model.module`, run with fused attention. A conv stem
    or a distillation token has no plain timm twin: our module's own plain forward (fused attention too)
    stands in."""
    if isinstance(model.module, VisionTransformer) and model.module.config.stem == 'patch' \
            and not model.module.config.distilled:
        c = model.module.config
        twin = timm.create_model('vit_tiny_patch16_224', img_size=c.img_size, patch_size=c.patch_size,
                                 num_classes=c.num_classes, embed_dim=c.embed_dim, depth=c.depth,
                                 num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias,
                                 global_pool=c.global_pool)
        twin.load_state_dict(model.module.state_dict())
        return twin.eval()
    return model.module  # its plain forward uses fused attention


def time_ms(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1000


def sync() -> None:
    if torch.cuda.is_available():  # GPU work is queued: wait for it, or the clock measures the queueing
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rounds', type=int, default=30, help='timed calls per contender')
    parser.add_argument('--models', nargs='*', help='model names (default: every backend)')
    parser.add_argument('--explain', action='store_true',
                        help='time every explanation method instead (default models: the shipped one and ViT-B/16)')
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (the models and inputs go there)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix='vitdemo-bench-') as weights:  # random timm weights: ~700 MB
        timed(args, Path(weights))


def timed(args: argparse.Namespace, weights: Path) -> None:
    for arch in TIMM_ARCHS:
        save_file(timm.create_model(arch).state_dict(), str(weights / f'{arch}.safetensors'))
    scratch = WEIGHTS_DIR / 'vit_cifar10.safetensors'
    names = args.models or ([str(scratch)] if scratch.exists() else []) + \
        [f'timm/{a}' for a in TIMM_ARCHS] + [f'ours/{a}' for a in OURS_ARCHS]

    if args.explain:
        return explanation_costs([load_model(n, weights, args.device) for n in (args.models or
                                  [str(scratch), 'timm/vit_base_patch16_224'])], args.rounds)
    where = torch.cuda.get_device_name() if args.device == 'cuda' else f'{torch.get_num_threads()} CPU threads'
    print(f'torch {torch.__version__}, {where}, {args.rounds} rounds, median ms\n')
    print(f'{"model":42s} {"timm plain":>10s} {"attention":>10s} {"ratio":>6s} {"predict":>8s}')
    for name in names:
        model = load_model(name, weights, args.device)
        twin = plain_timm_twin(model).to(args.device)
        image = EXAMPLE
        x = model.transform(model.predict(image).image).unsqueeze(0).to(args.device)
        with torch.inference_mode():
            for _ in range(3):  # warm up all three
                twin(x), model.attend(x), model.predict(image)
            plain, attend, predict = [], [], []
            for _ in range(args.rounds):
                plain.append(time_ms(lambda: twin(x)))
                attend.append(time_ms(lambda: model.attend(x)))
                predict.append(time_ms(lambda: model.predict(image)))
        p, a, e = statistics.median(plain), statistics.median(attend), statistics.median(predict)
        label = f'scratch ({Path(name).name})' if name.endswith('.safetensors') else name
        print(f'{label:42s} {p:10.2f} {a:10.2f} {a / p:5.2f}x {e:8.2f}')
    print('\nattention: the forward pass that also returns every layer\'s attention (what predict runs);'
          '\npredict: end to end from the image file (decode, resize, forward with attention, top-k).')


def explanation_costs(models, rounds: int) -> None:
    """Each method's time for one image (the prediction it explains already made), as a multiple of the
    model's plain forward pass: medians over `rounds` calls, over 1 call for the slow methods."""
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; median ms, and x a plain forward\n')
    for model in models:
        pred = model.predict(EXAMPLE)
        x = model.transform(pred.image).unsqueeze(0).to(model.device)
        with torch.inference_mode():
            for _ in range(3):
                model.module(x)
            plain = statistics.median(time_ms(lambda: model.module(x)) for _ in range(rounds))
        label = f'scratch ({Path(model.name).name})' if model.name.endswith('.safetensors') else model.name
        print(f'{label}: plain forward {plain:.1f} ms')
        print('| method | ms | x plain forward |\n| --- | ---: | ---: |')
        for method in methods_for(model):
            explain(model, pred, method)  # warm up: imports, first-call allocations
            n = 1 if METHODS[method].slow else rounds
            ms = statistics.median(time_ms(lambda: explain(model, pred, method)) for _ in range(n))
            print(f'| {METHODS[method].label} | {ms:.1f} | {ms / plain:.1f}x |', flush=True)
        print()


if __name__ == '__main__':
    main()
