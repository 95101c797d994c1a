import socket

import gradio as gr
import pytest
from gradio_client import Client, handle_file

from app import create_demo
from conftest import ROOT
from vitdemo.backends import ModelCache


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def client(weights_dir):
    demo = create_demo(ModelCache(weights_dir=weights_dir))
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name='127.0.0.1', server_port=port, quiet=True)
    try:
        yield Client(f'http://127.0.0.1:{port}/', verbose=False)
    finally:
        demo.close()


def test_api_contract_without_a_server(weights_dir):
    info = create_demo(ModelCache(weights_dir=weights_dir)).get_api_info()
    params = info['named_endpoints']['/predict']['parameters']
    assert [p['parameter_name'] for p in params[:2]] == ['image', 'model']
    assert not params[0]['parameter_has_default']
    assert all(p['parameter_has_default'] for p in params[1:])
    assert sorted(info['named_endpoints']) == ['/compare', '/inspect', '/predict', '/stop_training', '/train']
    assert [p['parameter_name'] for p in info['named_endpoints']['/compare']['parameters'][:3]] == \
        ['image', 'model_a', 'model_b']
    assert [p['parameter_name'] for p in info['named_endpoints']['/inspect']['parameters']] == ['image', 'model']


def test_predict_through_the_api_for_scratch_and_timm(client):
    labels, gallery, text = client.predict(handle_file(str(ROOT / 'examples' / 'cat.jpg')), 'scratch/vit_cifar10',
                                           api_name='/predict')
    assert len(labels['confidences']) == 5 and labels['label'] == labels['confidences'][0]['label']
    assert len(gallery) == 2 + 2 and 'scratch/vit_cifar10' in text
    labels, gallery, _ = client.predict(handle_file(str(ROOT / 'examples' / 'coffee.jpg')),
                                        'timm/vit_tiny_patch16_224', 3, 'max', api_name='/predict')
    assert len(labels['confidences']) == 3 and len(gallery) == 12 + 2


def test_inspect_through_the_api(client):
    rocket = handle_file(str(ROOT / 'examples' / 'rocket.jpg'))
    grid, costs, *plots = client.predict(rocket, 'timm/vit_tiny_patch16_224', api_name='/inspect')
    assert grid and len(plots) == 5 and all(plots)
    assert [row[2] for row in costs['data']] == [3137, 785, 197, 50]  # tokens at 224 for patches 4, 8, 16, 32


def test_compare_through_the_api(client):
    a, b, gallery, text = client.predict(handle_file(str(ROOT / 'examples' / 'cat.jpg')), 'scratch/vit_cifar10',
                                         'timm/vit_tiny_patch16_224', api_name='/compare')
    assert len(a['confidences']) == 5 and len(b['confidences']) == 11  # 10 CIFAR-10 classes and "other"
    assert len(gallery) == 2 * 2 + 2 and 'IoU' in text


def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(client, tmp_path):
    fake = tmp_path / 'photo.jpg'
    fake.write_text('this is not a jpeg')
    with pytest.raises(Exception, match='not an image format this app can read'):
        client.predict(handle_file(str(fake)), 'scratch/vit_cifar10', api_name='/predict')
    with pytest.raises(Exception, match='choose a head from 0 to 3'):
        client.predict(handle_file(str(ROOT / 'examples' / 'cat.jpg')), 'scratch/vit_cifar10', 5, 'one head', 9,
                       api_name='/predict')
    with pytest.raises(Exception, match='Hugging Face Hub'):
        client.predict(handle_file(str(ROOT / 'examples' / 'cat.jpg')), 'timm/vit_base_patch16_224',
                       api_name='/predict')
    labels, _, _ = client.predict(handle_file(str(ROOT / 'examples' / 'cifar_ship.jpg')), 'scratch/vit_cifar10',
                                  api_name='/predict')
    assert labels['confidences']


def test_train_tab_through_the_api_then_predict_with_the_new_model(tmp_path, weights_dir):
    from test_data import make_folder
    from vitdemo.training_job import TrainingJob
    make_folder(tmp_path / 'data', classes=[f'c{i}' for i in range(10)], per_class=12, size=32)
    job = TrainingJob(tmp_path / 'data', weights_dir=tmp_path / 'weights', update_seconds=0.0)
    demo = create_demo(ModelCache(weights_dir=tmp_path / 'weights'), job=job)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name='127.0.0.1', server_port=port, quiet=True)
    try:
        client = Client(f'http://127.0.0.1:{port}/', verbose=False)
        with pytest.raises(Exception, match='divisible by num_heads'):
            client.predict(100, 2, 3, 4, 0.05, 32, 1e-3, 'bad', api_name='/train')
        status, loss, accuracy, picture, *_ = client.predict(64, 2, 2, 8, 0.05, 32, 1e-3, 'tiny_run',
                                                                 api_name='/train')
        assert 'finished after' in status and 'saved as tiny_run' in status
        assert (tmp_path / 'weights' / 'tiny_run.safetensors').exists()
        assert loss['columns'] == ['epoch', 'value', 'split'] and loss['data'] and picture
        labels, _, _ = client.predict(handle_file(str(ROOT / 'examples' / 'cat.jpg')), 'scratch/tiny_run',
                                      api_name='/predict')
        assert {c['label'] for c in labels['confidences']} <= {f'c{i}' for i in range(10)}
    finally:
        demo.close()


def test_the_app_starts_without_trained_weights_and_says_so(tmp_path):
    demo = create_demo(ModelCache(weights_dir=tmp_path))
    texts = [b.value for b in demo.blocks.values() if isinstance(b, gr.Markdown)]
    assert any('No trained scratch weights are present' in t for t in texts)
    dropdown = next(b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and b.label == 'Model')
    assert dropdown.value == 'timm/vit_tiny_patch16_224'
