"""Redraw the README's screenshot, `docs/screenshot.png`: the app as a visitor first meets it, with the
shipped weights, one CIFAR-10 example uploaded and its maps drawn.

    python docs/screenshot.py [--method 'relevance for a class (Chefer et al. 2021)']

Needs Playwright and a Chromium (see the README's test command); starts the app on a free port, offline.
"""
import argparse
import os
import sys
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from vitdemo.app_process import running_app  # noqa: E402

CHROMIUM = os.environ.get('VITDEMO_CHROMIUM', '/usr/bin/chromium')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--image', default=str(ROOT / 'examples' / 'cifar_horse.jpg'))
    parser.add_argument('--method', default=None, help='an *Explain with* choice (default: the page\'s own)')
    parser.add_argument('--width', type=int, default=1440)
    parser.add_argument('--height', type=int, default=1690, help='the part of the page kept, in pixels')
    parser.add_argument('--out', default=str(ROOT / 'docs' / 'screenshot.png'))
    args = parser.parse_args()

    # the page: up within a minute, or the app failed to start (`python app.py` shows why)
    with running_app(ROOT, timeout=60) as (url, _):
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=['--headless', '--no-sandbox'])
            page = browser.new_page(viewport={'width': args.width, 'height': args.height})
            page.set_default_timeout(60_000)
            page.goto(url)
            # the upload predicts at once; the rollout's caption is the last map drawn
            tab = page.locator('[role=tabpanel]:visible').first
            tab.locator('input[type=file]').first.set_input_files(args.image)
            expect(page.get_by_text('rollout · all').first).to_be_visible(timeout=60_000)
            if args.method:
                tab.get_by_label('Explain with', exact=True).first.click()
                page.get_by_role('option', name=args.method, exact=True).click()
                expect(page.get_by_text('for the class').first).to_be_visible(timeout=60_000)
            # let the maps' images and the plot finish loading before the picture is taken
            page.wait_for_function('[...document.images].filter(i => i.offsetParent !== null)'
                                   '.every(i => i.complete)')
            page.wait_for_timeout(1500)
            page.screenshot(path=args.out)
            browser.close()
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
