"""Start-up: seconds from `python app.py` to the page's first answer; with `--browser`, to the page drawn in a
headless Chromium (Debian's `chromium` and the `playwright` package) with its Predict button and model list, as a
visitor sees it; and with `--predict-after S`, to the first prediction's answer when it is asked S seconds after
the page answered (a visitor who reads the page first). For this checkout and, side by side in alternating
rounds, another one (e.g. an older commit in a git worktree).

    python bench/startup.py
    python bench/startup.py --browser
    python bench/startup.py --predict-after 5
    python bench/startup.py --predict-after 15 --method gradcam
    git worktree add /tmp/old 545c8d3 && python bench/startup.py --other /tmp/old

Offline (HF_HUB_OFFLINE=1) and with a warm file cache after the first round: the first round shows a
colder start.
"""
import argparse
import shutil
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from vitdemo.app_process import running_app  # noqa: E402

IMAGE = ROOT / 'examples' / 'cat.jpg'


def drawn(browser, url: str) -> float:
    """Seconds until `browser` shows the page at `url` with its Predict button and the model list filled."""
    page = browser.new_page(viewport={'width': 1440, 'height': 1000})
    start = time.perf_counter()
    page.goto(url)
    page.get_by_role('button', name='Predict', exact=True).wait_for(timeout=60_000)
    page.get_by_label('Model', exact=True).first.wait_for(timeout=60_000)
    page.wait_for_function("[...document.querySelectorAll('input')].some(i => i.value.startsWith('scratch/'))",
                           timeout=60_000)
    seconds = time.perf_counter() - start
    page.close()
    return seconds


def timed_start(root: Path, predict_after: float | None, method: str, browser=None) -> tuple[float, float | None]:
    """Seconds to the page's first answer (or, with `browser`, to the page drawn there), and those of the first
    prediction asked `predict_after` s later, explained by `method`."""
    with running_app(root) as (url, seconds):
        if browser is not None:
            seconds += drawn(browser, url)
        if predict_after is None:
            return seconds, None
        from gradio_client import Client, handle_file
        time.sleep(predict_after)
        client = Client(url, verbose=False)
        start = time.perf_counter()
        client.predict(handle_file(str(IMAGE)), 'scratch/vit_cifar10', method=method, api_name='/predict')
        return seconds, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--other', type=Path, help='another checkout to time alongside')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--predict-after', type=float, help='also time a first prediction asked this many '
                                                            'seconds after the page answered')
    parser.add_argument('--method', default='attention', help="the first prediction's explanation method")
    parser.add_argument('--browser', action='store_true', help='time the page until a headless Chromium has drawn '
                                                               'it, not to its first answer')
    args = parser.parse_args()
    roots = {'this checkout': ROOT} | ({f'{args.other}': args.other} if args.other else {})
    times = {name: [] for name in roots}
    with ExitStack() as stack:
        browser = None
        if args.browser:  # started before the rounds: its own start is not the app's
            from playwright.sync_api import sync_playwright
            playwright = stack.enter_context(sync_playwright())
            browser = playwright.chromium.launch(
                executable_path=shutil.which('chromium') or shutil.which('chromium-browser'),
                args=['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run',
                      '--disable-background-networking'])
            stack.callback(browser.close)
        for _ in range(args.rounds):
            for name, root in roots.items():
                times[name].append(timed_start(root, args.predict_after, args.method, browser))
    what = 'drawn' if args.browser else 'page'
    for name, t in times.items():
        page = [p for p, _ in t]
        print(f'{name:24s} {what:8s} ' + ' '.join(f'{x:5.2f}' for x in page) +
              f'   median {statistics.median(page):.2f} s')
        if args.predict_after is not None:
            first = [f for _, f in t]
            print(f'{"":24s} predict  ' + ' '.join(f'{x:5.2f}' for x in first) +
                  f'   median {statistics.median(first):.2f} s')


if __name__ == '__main__':
    main()
