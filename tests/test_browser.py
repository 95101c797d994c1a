"""End to end in a real browser: `python app.py` as a user starts it, driven in headless Chromium.

Needs Debian's `chromium` (apt-get install chromium) and the `playwright` package; without them the test
is skipped, unless VITDEMO_REQUIRE_BROWSER is set (CI sets it), when their absence is a failure.
Screenshots go to test-output/browser/.
"""
import os
import re
import shutil
import time

import pytest

from conftest import ROOT
from test_data import make_folder
from vitdemo.app_process import running_app
from vitdemo.backends import load_model
from vitdemo.train_form import TRAIN_PRESETS

pytestmark = pytest.mark.slow  # a real browser and a real server, about two minutes
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
SHOTS = ROOT / 'test-output' / 'browser'
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    sync_playwright = None
if not (CHROMIUM and sync_playwright):
    missing = 'Debian chromium' if not CHROMIUM else 'the playwright package'
    if os.environ.get('VITDEMO_REQUIRE_BROWSER'):
        raise RuntimeError(f'the browser test needs {missing}')
    pytest.skip(f'the browser test needs {missing}', allow_module_level=True)


@pytest.fixture(scope='module')
def app_url(weights_dir, tmp_path_factory):
    """The app as `python app.py` starts it, configured only through the environment, on a free port."""
    tmp = tmp_path_factory.mktemp('browser')
    shutil.copytree(weights_dir, tmp / 'weights')  # the run trained here must not join other tests' models
    make_folder(tmp / 'data', classes=[f'class{i}' for i in range(10)], per_class=20, size=32)
    env = dict(VITDEMO_WEIGHTS=str(tmp / 'weights'), VITDEMO_DATA=str(tmp / 'data'), VITDEMO_CACHE=str(tmp / 'cache'),
               GRADIO_TEMP_DIR=str(tmp / 'gradio'),
               VITDEMO_TRAIN_MEMORY_MB='4000',  # a small server's training memory: a fine-tune's batch must fit
               # a Space's bounds on one session's requests: a visitor going about the app is never refused
               VITDEMO_QUEUED_PER_SESSION='6', VITDEMO_MODEL_WORK_PER_SESSION='2')
    with open(tmp / 'app.log', 'w') as log:
        try:
            with running_app(ROOT, env, log) as (url, seconds):
                print(f'app answered at {url} {seconds:.1f} s after start')
                yield url
        except RuntimeError as e:
            raise AssertionError(f'{e}: {(tmp / "app.log").read_text()[-2000:]}') from None
    refusals = [line for line in (tmp / 'app.log').read_text().splitlines() if 'session already holds' in line]
    assert not refusals, refusals


@pytest.fixture(scope='module')
def browser():
    SHOTS.mkdir(parents=True, exist_ok=True)
    expect.set_options(timeout=30_000)  # an answer may wait its turn for a CPU that is busy training
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope='module')
def page(browser, app_url):
    page = browser.new_page(viewport={'width': 1440, 'height': 1000})
    page.set_default_timeout(90_000)
    page.goto(app_url)
    yield page
    page.close()


def open_tab(page, name: str) -> None:
    """Click a tab; at phone width Gradio may fold some under a "More tabs" menu, as plain buttons."""
    tab, more = page.get_by_role('tab', name=name), page.get_by_role('button', name='More tabs')
    tab.or_(more).first.wait_for(state='visible')
    if tab.count() and tab.first.is_visible():
        tab.first.click()
        return
    more.first.click()
    page.get_by_role('button', name=name, exact=True).filter(visible=True).first.click()


def pick(page, label: str, option: str) -> None:
    tab = page.locator('[role=tabpanel]:visible').first
    tab.get_by_label(label, exact=True).first.click()
    page.get_by_role('option', name=option, exact=True).click()


def upload(page, path) -> None:
    """Into the image box of the open tab, replacing what is there."""
    tab = page.locator('[role=tabpanel]:visible').first
    clear = tab.get_by_role('button', name='Clear')
    if clear.count():
        clear.first.click()
    tab.locator('input[type=file]').first.set_input_files(str(path))


def shoot(page, path) -> None:
    """A full-page screenshot of what a visitor sees after scrolling: Gradio's galleries load their images
    lazily, so the page is scrolled through first and every image waited for, or those below the fold
    would show as empty frames."""
    height = page.evaluate('document.documentElement.scrollHeight')
    for y in range(0, height, 400):
        page.evaluate(f'window.scrollTo(0, {y})')
        page.wait_for_timeout(50)
    # images in hidden tabs never load lazily: only those laid out count
    page.wait_for_function('[...document.images].filter(i => i.offsetParent !== null).every(i => i.complete)',
                           timeout=30_000)
    page.evaluate('window.scrollTo(0, 0)')
    page.screenshot(path=path, full_page=True)


def test_predict_upload_pick_a_model_and_see_labels_and_attention(page):
    upload(page, ROOT / 'examples' / 'cat.jpg')
    top = page.get_by_test_id('label-output-value').first
    expect(top).not_to_be_empty()  # an upload predicts at once, with the default scratch model
    expect(page.get_by_text('rollout · all 2 layers')).to_be_visible()
    expect(page.get_by_text('It knows 10 classes only').first).to_be_visible()
    # the focus plot's caption lies inside its box, not cut off below it
    caption = page.get_by_text('no focus at all').first
    expect(caption).to_be_visible()
    inner = caption.bounding_box()
    box = page.locator('.block').filter(has=caption).last.bounding_box()
    assert inner['y'] + inner['height'] <= box['y'] + box['height']
    shoot(page, SHOTS / '1_predict_scratch.png')

    pick(page, 'Model', 'timm/vit_tiny_patch16_224')
    page.get_by_role('button', name='Predict', exact=True).click()
    expect(page.get_by_text('rollout · all 12 layers')).to_be_visible()
    expect(page.get_by_text('layer 12 · mean of 3 heads')).to_be_visible()
    expect(page.get_by_text("timm's vit_tiny_patch16_224 with ImageNet-1k weights")).to_be_visible()
    shoot(page, SHOTS / '2_predict_timm.png')


def test_an_example_thumbnail_predicts_when_clicked(page):
    open_tab(page, 'Predict')
    pick(page, 'Model', 'scratch/vit_cifar10')
    tab = page.locator('[role=tabpanel]:visible').first
    tab.locator('.block', has_text='Examples (CIFAR-10 photos first)').locator('img').first.click()
    expect(page.get_by_text('rollout · all 2 layers')).to_be_visible()


def test_pick_a_class_and_a_method_and_see_its_relevance(page):
    open_tab(page, 'Predict')
    pick(page, 'Model', 'scratch/vit_cifar10')
    upload(page, ROOT / 'examples' / 'cifar_ship.jpg')
    expect(page.get_by_text('rollout · all 2 layers')).to_be_visible()
    pick(page, 'Explain with', 'relevance for a class (Chefer et al. 2021)')
    pick(page, 'Class to explain', 'truck')
    expect(page.get_by_text('after layer 2 · truck')).to_be_visible()
    expect(page.get_by_text('for the class truck').first).to_be_visible()
    expect(page.locator('#sanity-maps')).to_be_hidden()
    page.get_by_role('button', name='Sanity check: redraw the weights at random, does the map change?').click()
    expect(page.get_by_text('rank correlation of the two maps').first).to_be_visible()
    expect(page.locator('#sanity-maps img')).to_have_count(2)
    shoot(page, SHOTS / '2b_relevance_for_a_class.png')
    pick(page, 'Explain with', 'attention (the same for every class)')


def test_every_head_of_a_layer_and_a_slow_method_stopped(page):
    open_tab(page, 'Predict')
    # the method first: the model's change sets the methods' list for it, keeping the method it was given,
    # and on a busy machine a method picked after the model could be set back by that change's late answer
    pick(page, 'Explain with', 'every head of one layer')
    pick(page, 'Model', 'timm/vit_tiny_patch16_224')
    upload(page, ROOT / 'examples' / 'cat.jpg')
    # ViT-Ti's heads are the slowest figure this test draws: on two cores shared with another job it has
    # taken past the 30 s that every other step is given
    expect(page.get_by_text('layer 12 · head 3')).to_be_visible(timeout=90_000)
    expect(page.get_by_text("How focused each layer's attention is").first).to_be_visible()
    shoot(page, SHOTS / '2c_every_head.png')
    pick(page, 'Explain with', 'Shapley values of patches for a class (slow)')
    expect(page.locator('.progress-text, .eta-bar, .progress-level').first).to_be_attached()
    page.get_by_role('button', name='Stop', exact=True).click()
    # a Stop is no error: the predictions stay, the maps of the method before go, and the text says why
    panel = page.locator('[role=tabpanel]:visible').first
    expect(panel.get_by_text('No maps this time: Shapley values on timm/vit_tiny_patch16_224 stopped at')
           ).to_be_visible()
    expect(panel.get_by_text('input: no maps, see above')).to_be_visible()
    expect(panel.get_by_text('Error', exact=True)).to_have_count(0)
    expect(page.locator('.toast-body', has_text='stopped at')).to_have_count(0)
    shoot(page, SHOTS / '2d_stopped.png')
    # an option moved redraws what was made: the slow method stopped does not start again
    options = page.get_by_text('Options: top-k, heads')
    options.click()
    panel.get_by_label('one scale for all layers').check()
    expect(panel.get_by_text('No maps this time: a slow method runs when you press Predict')).to_be_visible()
    expect(page.locator('.toast-body')).to_have_count(0)
    shoot(page, SHOTS / '2e_option_moved_after_stop.png')
    pick(page, 'Explain with', 'attention (the same for every class)')
    panel.get_by_label('each map its own range').check()
    options.click()


def test_the_head_slider_follows_the_model(page):
    open_tab(page, 'Predict')
    page.get_by_text('Options: top-k, heads').click()
    pick(page, 'Model', 'timm/vit_tiny_patch16_224')
    page.wait_for_function("() => [...document.querySelectorAll('input[type=range]')].some(e => e.max === '3')")
    pick(page, 'Model', 'scratch/vit_cifar10')  # 4 heads
    page.wait_for_function("() => [...document.querySelectorAll('input[type=range]')].some(e => e.max === '4')")


def test_offline_the_pretrained_models_that_need_a_download_are_marked(page):
    open_tab(page, 'Predict')
    tab = page.locator('[role=tabpanel]:visible').first
    tab.get_by_label('Model', exact=True).first.click()
    expect(page.get_by_role('option', name='timm/vit_base_patch16_224  (needs a download: not available offline)',
                            exact=True)).to_be_visible()
    page.keyboard.press('Escape')


def test_bad_upload_shows_a_message_not_a_trace(page, tmp_path):
    open_tab(page, 'Predict')
    fake = tmp_path / 'holiday.jpg'
    fake.write_text('this is text, not a photo')
    upload(page, fake)
    expect(page.get_by_text('Could not answer: the uploaded file is not an image format').first).to_be_visible()
    assert 'Traceback' not in page.content()
    shoot(page, SHOTS / '3_bad_upload.png')


def test_compare_answers_with_its_defaults_and_inspect_draws(page):
    open_tab(page, 'Compare')
    # an image is compared as it arrives, as Predict predicts (defaults: models that work here)
    upload(page, ROOT / 'examples' / 'cifar_ship.jpg')
    expect(page.get_by_text('A rollout').first).to_be_visible()
    panel = page.locator('[role=tabpanel]:visible').first
    with page.expect_request(lambda r: '/queue/join' in r.url):  # an option changed compares again
        panel.get_by_label('max', exact=True).check()
    expect(panel.get_by_text('Could not answer')).to_have_count(0)
    panel.get_by_label('mean', exact=True).check()
    page.get_by_role('button', name='Compare', exact=True).click()
    expect(page.get_by_text('A rollout').first).to_be_visible()
    assert not page.locator('[role=tabpanel]:visible').first.get_by_text('Could not answer').count()
    shoot(page, SHOTS / '4_compare.png')

    open_tab(page, 'Inspect')
    upload(page, ROOT / 'examples' / 'rocket.jpg')  # inspected as it arrives, as Predict predicts
    expect(page.get_by_text('each attention head compares')).to_be_visible()
    expect(page.get_by_text('this model', exact=True).filter(visible=True).first).to_be_visible()  # sizes: answered
    expect(page.locator('.js-plotly-plot, img[src*="data:image"], canvas').first).to_be_attached()
    panel = page.locator('[role=tabpanel]:visible').first
    # beside the grid, where its centre patch looks, before any click; a click picks another patch
    expect(panel.get_by_text('(the centre: click any patch in the grid) in layer 1')).to_be_visible()
    expect(panel.get_by_text('Testing whether the maps can be trusted')).to_have_count(0)  # the test is done
    grid = panel.locator('.block', has_text='The patches the model sees').locator('img').first
    box = grid.bounding_box()
    grid.click(position={'x': box['width'] * 0.56, 'y': box['height'] * 0.3})
    expect(panel.get_by_text('the centre: click any patch')).to_have_count(0)
    expect(panel.get_by_text(re.compile(r'^patch \(row \d+, column \d+\) in layer 1: where it looks'))).to_be_visible()
    shoot(page, SHOTS / '5_inspect.png')
    # another model is inspected as it is picked. ViT-Ti's test at 224 px takes seconds: its figures come
    # first, and the centre patch's look, while the note tells the test's progress; Inspect's own Stop ends it
    pick(page, 'Model', 'timm/vit_tiny_patch16_224')
    # a Stop that reaches the server before this request starts is cleared with the session's earlier ones:
    # click once the note tells the test's progress
    expect(panel.get_by_text(re.compile(r'Testing whether the maps can be trusted \(\d+% done\)'))).to_be_visible()
    panel.get_by_role('button', name='Stop', exact=True).click()
    expect(panel.get_by_text('No faithfulness test this time: the faithfulness test stopped at')).to_be_visible()
    expect(panel.get_by_text('Error', exact=True)).to_have_count(0)
    expect(panel.get_by_text('3137', exact=True).filter(visible=True).first).to_be_visible()  # 4 px patches, 224 px
    expect(panel.get_by_text('(the centre: click any patch in the grid) in layer 1')).to_be_visible()
    shoot(page, SHOTS / '5b_inspect_stopped.png')
    pick(page, 'Model', 'scratch/vit_cifar10')
    expect(panel.get_by_text('No faithfulness test this time')).to_have_count(0)


def test_the_cnn_model_hides_the_vit_settings(page):
    open_tab(page, 'Train')
    panel = page.locator('[role=tabpanel]:visible').first  # before a run: what will appear, no empty frames
    expect(panel.get_by_text('After the first epoch, the loss and accuracy curves appear here')).to_be_visible()
    expect(panel.locator('.curves:visible')).to_have_count(0)
    expect(panel.locator('.filmstrip')).to_be_hidden()
    page.get_by_role('button', name='Model and recipe').click()
    expect(page.get_by_label('Embed dim')).to_be_visible()
    page.get_by_label('ResNet-18, the CNN baseline').check()
    expect(page.get_by_label('Embed dim')).to_be_hidden()
    shoot(page, SHOTS / '6_train_cnn.png')
    page.get_by_label('ViT', exact=True).check()
    expect(page.get_by_label('Embed dim')).to_be_visible()


def test_a_teacher_is_picked_from_the_list_and_one_of_other_classes_is_refused_in_words(page):
    open_tab(page, 'Train')
    page.get_by_text('Distillation: a trained model teaches (DeiT)').click()
    # the server answers nothing until Start is pressed: the form switches the ViT to its CLS token in the
    # browser, or Start would send the mean of the patch tokens, which a taught ViT cannot classify
    held = []
    page.route('**/gradio_api/queue/join*', lambda route: held.append(route))
    pick(page, 'Teacher', 'scratch/vit_cifar10')  # CIFAR-10's classes; this server's data has class0..class9
    page.get_by_role('button', name='Start', exact=True).click()
    for request in held:
        request.continue_()
    page.unroute('**/gradio_api/queue/join*')
    expect(page.get_by_text('the teacher vit_cifar10.safetensors knows other classes').first).to_be_visible()
    shoot(page, SHOTS / '6b_train_teacher.png')
    # a taught ViT classifies its CLS token; without the teacher, the form pools as its preset does
    cls_token, mean = (page.get_by_label(label, exact=True) for label in
                       ('the CLS token (as the ViT paper)', 'the mean of the patch tokens (learns faster)'))
    if not cls_token.count():  # the form's settings, folded away unless an earlier test opened them
        page.get_by_role('button', name='Model and recipe').click()
    expect(cls_token).to_be_checked()
    pick(page, 'Teacher', 'none')
    preset = TRAIN_PRESETS[page.get_by_label('Preset', exact=True).input_value()]
    expect(mean if preset.global_pool == 'avg' else cls_token).to_be_checked()


def offered(page, option: str) -> bool:
    tab = page.locator('[role=tabpanel]:visible').first
    tab.get_by_label('Model', exact=True).first.click()
    found = page.get_by_role('option', name=option, exact=True).count() > 0
    page.keyboard.press('Escape')
    page.mouse.click(5, 5)  # away from the list: the next click opens it again
    return found


def test_a_trained_model_is_kept_across_a_reload_and_for_other_clients(browser, page, app_url, tmp_path):
    other = browser.new_page(viewport={'width': 1440, 'height': 1000})  # another tab, open before the run
    other.goto(app_url)
    expect(other.get_by_role('tab', name='Predict')).to_be_visible()
    open_tab(page, 'Train')
    if not page.get_by_label('Minutes').is_visible():
        page.get_by_role('button', name='Model and recipe').click()
    page.get_by_label('Minutes').fill('5')
    page.get_by_label('Save as').fill('browser_run')
    page.get_by_role('button', name='Start', exact=True).click()
    expect(page.get_by_text('ETA').first).to_be_visible()
    expect(page.get_by_text('val acc').first).to_be_visible()  # an epoch ended: curves and attention drawn
    train_panel = page.locator('[role=tabpanel]:visible').first
    expect(train_panel.locator('.filmstrip img').first).to_be_visible()
    expect(train_panel.locator('.maps')).to_be_hidden()  # its last layer is the filmstrip's last row
    expect(train_panel.locator('.curves:visible')).to_have_count(2)  # loss and accuracy
    shoot(page, SHOTS / '6_training.png')
    page.get_by_role('button', name='Stop', exact=True).click()
    expect(page.get_by_text('stopped after').first).to_be_visible()
    expect(page.get_by_text('saved as trained/browser_run').first).to_be_visible()
    with page.expect_download() as fetched:  # the visitor keeps the model: a file that loads as it was saved
        page.get_by_role('button', name='Download trained/browser_run (').click()
    kept = tmp_path / fetched.value.suggested_filename
    fetched.value.save_as(kept)
    assert kept.name == 'browser_run.safetensors'
    assert load_model(kept).classes == [f'class{i}' for i in range(10)]
    page.get_by_text('Bring back a model you downloaded').click()  # and brought back, as after a reload
    page.locator('.bring-back input[type=file]').set_input_files(str(kept))
    expect(page.get_by_text('Added as trained/browser_run-2').first).to_be_visible()
    shoot(page, SHOTS / '7_stopped.png')
    page.get_by_text('Runs side by side').click()  # the run's validation curve, beside any other of yours
    pick(page, 'Runs', 'trained/browser_run')
    expect(page.locator('[role=tabpanel]:visible').first.get_by_text('validation accuracy').first).to_be_visible()
    shoot(page, SHOTS / '7b_runs_side_by_side.png')
    open_tab(page, 'Inspect')  # the run kept every layer's attention after each epoch: its filmstrip
    pick(page, 'Model', 'trained/browser_run')
    page.get_by_role('button', name=re.compile('^Attention through training:')).click()
    section = page.locator('[role=tabpanel]:visible').first
    expect(section.locator('.filmstrip img').first).to_be_visible()
    shoot(page, SHOTS / '7e_filmstrip_in_inspect.png')

    open_tab(page, 'Predict')  # the new model is offered without a restart
    pick(page, 'Model', 'trained/browser_run-2')
    pick(page, 'Model', 'trained/browser_run')
    page.reload()  # and after a reload
    open_tab(page, 'Predict')
    pick(page, 'Model', 'trained/browser_run')
    other.bring_to_front()  # a background tab's timers are throttled by the browser
    deadline = time.monotonic() + 60  # the other tab's lists follow the store within 20 s, no reload
    while not offered(other, 'trained/browser_run'):
        assert time.monotonic() < deadline, 'the other tab never offered the new model'
        time.sleep(2)
    other.close()
    from gradio_client import Client, handle_file
    labels, *_ = Client(app_url, verbose=False, download_files=str(tmp_path)).predict(
        handle_file(str(ROOT / 'examples' / 'cat.jpg')), 'trained/browser_run', api_name='/predict')
    assert {c['label'] for c in labels['confidences']} <= {f'class{i}' for i in range(10)}


def test_a_distillation_run_from_the_train_tab(page):
    page.reload()
    open_tab(page, 'Train')
    page.get_by_text('Distillation: a trained model teaches (DeiT)').click()
    pick(page, 'Teacher', 'trained/browser_run')  # trained above on this server's classes
    page.get_by_label('Save as').fill('taught')
    page.get_by_role('button', name='Start', exact=True).click()
    expect(page.get_by_text('val acc').first).to_be_visible()
    page.get_by_role('button', name='Stop', exact=True).click()
    expect(page.get_by_text('saved as trained/taught').first).to_be_visible()
    shoot(page, SHOTS / '7c_distilled.png')
    open_tab(page, 'Predict')  # the student has DeiT's two tokens: the method list offers them side by side
    pick(page, 'Model', 'trained/taught')
    page.locator('[role=tabpanel]:visible').first.get_by_label('Explain with', exact=True).first.click()
    expect(page.get_by_role('option', name=re.compile('CLS and distillation'))).to_be_visible()
    page.keyboard.press('Escape')


def test_a_finetune_on_an_uploaded_zip_and_a_hostile_zip_refused(page, tmp_path):
    from test_archive import good_entries, make_zip, png
    page.reload()
    open_tab(page, 'Train')
    panel = page.locator('[role=tabpanel]:visible').first
    page.get_by_label('my own images (.zip)').check()
    hostile = make_zip(tmp_path / 'hostile.zip', good_entries() | {'../../evil.png': png()})
    panel.locator('input[type=file]').first.set_input_files(str(hostile))
    # the uploaded file's row: its name cell splits the text into stem and extension, the whole name is its label
    expect(panel.get_by_role('cell', name='hostile.zip')).to_be_visible()
    page.get_by_role('button', name='Start', exact=True).click()
    expect(page.get_by_text('points outside the archive').first).to_be_visible()
    page.get_by_test_id('toast-close').first.click()  # read: dismissed, as a visitor would before trying again
    expect(page.get_by_test_id('toast-close')).to_have_count(0)
    panel.get_by_role('button', name='Clear').first.click()
    pets = make_zip(tmp_path / 'pets.zip', {f'cat/{i}.png': png((200, 20 * i, 0)) for i in range(6)} |
                    {f'dog/{i}.png': png((0, 20 * i, 200)) for i in range(6)})
    panel.locator('input[type=file]').first.set_input_files(str(pets))
    expect(panel.get_by_role('cell', name='pets.zip')).to_be_visible()
    pick(page, 'Start from', 'vit_tiny_patch16_224 (pretrained on ImageNet): fine-tune')
    expect(page.get_by_text('linear probe: the head alone')).to_be_visible()
    if not page.get_by_label('Batch size').is_visible():
        page.get_by_role('button', name='Model and recipe').click()
    page.get_by_label('partial: the first K blocks frozen').check()  # 128 at 224 px needs ~11.7 GB: it offers 32
    expect(page.get_by_label('Batch size')).to_have_value('32')
    page.get_by_label('linear probe: the head alone').check()  # a probe keeps no activations: 128 fits
    expect(page.get_by_label('Batch size')).to_have_value('128')
    page.get_by_label('Save as').fill('my_pets')
    page.get_by_role('button', name='Start', exact=True).click()
    expect(page.get_by_text('saved as trained/my_pets').first).to_be_visible()
    expect(panel.locator('.maps img').first).to_be_visible()  # a probe's epochs run the head alone: no filmstrip
    expect(panel.locator('.filmstrip')).to_be_hidden()
    shoot(page, SHOTS / '7d_finetuned_on_a_zip.png')
    open_tab(page, 'Predict')  # the fine-tuned model knows the zip's classes
    pick(page, 'Model', 'trained/my_pets')
    upload(page, ROOT / 'examples' / 'cat.jpg')
    expect(page.locator('[role=tabpanel]:visible').first.get_by_text('dog').first).to_be_visible()


def test_in_public_mode_leaving_the_page_during_a_run_is_asked_first(browser, tmp_path):
    make_folder(tmp_path / 'data', classes=[f'class{i}' for i in range(10)], per_class=20, size=32)
    env = dict(VITDEMO_PUBLIC='1', VITDEMO_DATA=str(tmp_path / 'data'), VITDEMO_RUNS=str(tmp_path / 'runs'),
               VITDEMO_CACHE=str(tmp_path / 'cache'), GRADIO_TEMP_DIR=str(tmp_path / 'gradio'))
    with open(tmp_path / 'app.log', 'w') as log, running_app(ROOT, env, log) as (url, _):
        page = browser.new_page(viewport={'width': 1440, 'height': 1000})
        page.set_default_timeout(90_000)
        page.goto(url)
        open_tab(page, 'Train')
        page.get_by_role('button', name='Model and recipe').click()
        page.get_by_label('Minutes').fill('0.2')
        page.get_by_role('button', name='Start', exact=True).click()
        expect(page.get_by_text('ETA').first).to_be_visible()
        assert page.evaluate('typeof window.onbeforeunload') == 'function'  # the run's model is this page's
        expect(page.get_by_role('button', name='Download trained/my_vit (')).to_be_visible()
        page.wait_for_function('window.onbeforeunload === null')  # saved and offered: nothing to lose by leaving
        page.close()


@pytest.mark.parametrize('width,height', [(1440, 1000), (390, 844)])
def test_every_tab_at_desktop_and_phone_width(browser, app_url, width, height):
    page = browser.new_page(viewport={'width': width, 'height': height})
    page.set_default_timeout(90_000)
    page.goto(app_url)
    for number, tab in enumerate(['Predict', 'Train', 'Compare', 'Inspect'], 1):
        open_tab(page, tab)
        panel = page.locator('[role=tabpanel]:visible').first
        done = {'Predict': 'rollout · all', 'Compare': 'A rollout'}  # text once answered
        if tab != 'Train':
            # each tab answers an upload without a click
            panel.locator('input[type=file]').first.set_input_files(str(ROOT / 'examples' / 'cifar_horse.jpg'))
            if tab == 'Inspect':
                expect(panel.locator('img[src^="data:image"]').first).to_be_visible()  # a figure drawn
                expect(panel.get_by_text('Testing whether the maps can be trusted')).to_have_count(0)  # and the test
            else:
                expect(panel.get_by_text(done[tab]).first).to_be_visible()
        shoot(page, SHOTS / f'w{width}_{number}_{tab.lower()}.png')
    page.close()
