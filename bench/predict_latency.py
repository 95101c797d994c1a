"""Single-image latency of `Model.predict` (with every layer's attention) for each backend, next to timm's
plain forward of the same network with the same weights, measured side by side in one run.

    python bench/predict_latency.py            # all backends, 30 rounds
    python bench/predict_latency.py --rounds 10 --models timm/vit_tiny_patch16_224

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
from vitdemo.backends import OURS_ARCHS, TIMM_ARCHS, WEIGHTS_DIR, load_model  # noqa: E402
from vitdemo.model import VisionTransformer  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / 'examples' / 'cat.jpg'


def plain_timm_twin(model) -> torch.nn.Module:
    """timm's VisionTransformer with the weights of `model.module`, run with fused attention. A conv stem
    has no plain timm twin: our module's own plain forward (fused attention too) stands in."""
    if isinstance(model.module, VisionTransformer) and model.module.config.stem == 'patch':
        c = model.module.config
        twin = timm.create_model('vit_tiny_patch16_224', img_size=c.img_size, patch_size=c.patch_size,
                                 num_classes=c.num_classes, embed_dim=c.embed_dim, depth=c.depth,
                                 num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias,
                                 global_pool=c.global_pool)
        twin.load_state_dict(model.module.state_dict())
        return twin.eval()
    return model.module  # its plain forward uses fused attention


def time_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rounds', type=int, default=30, help='timed calls per contender')
    parser.add_argument('--models', nargs='*', help='model names (default: every backend)')
    args = parser.parse_args()

    weights = Path(tempfile.mkdtemp(prefix='vitdemo-bench-'))
    for arch in TIMM_ARCHS:
        save_file(timm.create_model(arch).state_dict(), str(weights / f'{arch}.safetensors'))
    scratch = WEIGHTS_DIR / 'vit_cifar10.safetensors'
    names = args.models or ([str(scratch)] if scratch.exists() else []) + \
        [f'timm/{a}' for a in TIMM_ARCHS] + [f'ours/{a}' for a in OURS_ARCHS]

    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds, median ms\n')
    print(f'{"model":42s} {"timm plain":>10s} {"attention":>10s} {"ratio":>6s} {"predict":>8s}')
    for name in names:
        model = load_model(name, weights)
        twin = plain_timm_twin(model)
        image = EXAMPLE
        x = model.transform(model.predict(image).image).unsqueeze(0)
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


if __name__ == '__main__':
    main()
