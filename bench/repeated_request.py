"""One session asking for the same work twice at once, as a visitor does who picks a model (the tab starts
at once) and then presses the tab's button: seconds until both answers are in, for Predict and for Inspect
on ViT-B/16 (its faithfulness test, most of a minute on two cores), and the seconds of another visitor's
prediction asked meanwhile; against `python app.py` of this checkout and, side by side in alternating rounds,
of another one (e.g. an older commit in a git worktree). With `--public`, the app runs in public mode, where a
second slow test finds the one slot for slow work taken; each line says whether an answer told the visitor so.

    python bench/repeated_request.py
    git worktree add /tmp/old e5df979~1 && python bench/repeated_request.py --other /tmp/old --public

Speed does not depend on the weights' values: ViT-B/16 runs on random weights written to a temporary folder
beside the shipped checkpoints (no download needed), and is loaded before the timing starts.
"""
import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from vitdemo.app_process import running_app  # noqa: E402

IMAGE = ROOT / 'examples' / 'cat.jpg'
MODEL = 'timm/vit_base_patch16_224'
REFUSED = 'which another visitor is using'


def twice(client, other, api: str) -> tuple[float, bool, float]:
    """Seconds until two identical requests sent at once are both answered, whether an answer says the slot
    for slow work was taken, and the seconds of another visitor's prediction (the shipped model) asked a
    second after them."""
    from gradio_client import handle_file
    start = time.perf_counter()
    jobs = [client.submit(handle_file(str(IMAGE)), MODEL, api_name=api) for _ in range(2)]
    time.sleep(1)
    asked = time.perf_counter()
    other.predict(handle_file(str(IMAGE)), 'scratch/vit_cifar10', api_name='/predict')
    waited = time.perf_counter() - asked
    answers = [job.result(timeout=600) for job in jobs]
    return time.perf_counter() - start, any(REFUSED in str(answer[-1]) for answer in answers), waited


def timed(root: Path, weights: Path, public: bool) -> dict[str, tuple[float, bool, float]]:
    from gradio_client import Client, handle_file
    env = dict(VITDEMO_WEIGHTS=str(weights), VITDEMO_PUBLIC='1' if public else '0')
    with running_app(root, env) as (url, _):
        client, other = Client(url, verbose=False), Client(url, verbose=False)
        client.predict(handle_file(str(IMAGE)), MODEL, api_name='/predict')  # imports, the model loaded
        other.predict(handle_file(str(IMAGE)), 'scratch/vit_cifar10', api_name='/predict')
        return {api: twice(client, other, api) for api in ('/predict', '/inspect')}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--other', type=Path, help='another checkout to time side by side (e.g. a git worktree)')
    parser.add_argument('--rounds', type=int, default=1)
    parser.add_argument('--public', action='store_true', help='run the apps in public mode')
    args = parser.parse_args()
    import timm
    from safetensors.torch import save_file

    checkouts = {'this': ROOT} | ({'other': args.other.resolve()} if args.other else {})
    times = {(name, api): [] for name in checkouts for api in ('/predict', '/inspect')}
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder)
        for shipped in (ROOT / 'weights').glob('*.safetensors'):
            shutil.copy(shipped, weights)
        arch = MODEL.split('/')[1]
        save_file(timm.create_model(arch).state_dict(), str(weights / f'{arch}.safetensors'))
        for round_ in range(args.rounds):
            for name, root in checkouts.items():
                for api, (seconds, refused, waited) in timed(root, weights, args.public).items():
                    times[name, api].append(seconds)
                    print(f'round {round_ + 1}, {name} ({root}), {api} twice at once on {MODEL}: {seconds:.1f} s'
                          + (' (an answer says the slot for slow work was taken)' if refused else '')
                          + f"; another visitor's prediction meanwhile {waited:.1f} s", flush=True)
    for api in ('/predict', '/inspect'):
        mine = statistics.median(times['this', api])
        line = f'{api}: median {mine:.1f} s'
        if args.other:
            theirs = statistics.median(times['other', api])
            line += f' against {theirs:.1f} s ({theirs / mine:.2f}x)'
        print(line)


if __name__ == '__main__':
    main()
