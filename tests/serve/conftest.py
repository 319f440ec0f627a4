"""A tiny random model served once per module; every test talks to it over HTTP."""

import pytest

openai = pytest.importorskip("openai")


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    from rlhfkit.models.tiny import make_tiny_causal_lm

    # A wider initialisation than the default makes greedy decoding produce varied text rather
    # than one repeated token, so the equality checks below compare something.
    return make_tiny_causal_lm(tmp_path_factory.mktemp("serve") / "m", initializer_range=0.5)


@pytest.fixture(scope="session")
def policy(tiny_path):
    from rlhfkit.models.loading import load_policy

    return load_policy(tiny_path)


@pytest.fixture(scope="module")
def server(tiny_path):
    from rlhfkit.serve.server import start_background

    handle = start_background(tiny_path, served_model_name="tiny", max_batch_size=8, batch_wait_ms=20)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine two threads waking
    each other for every 32x64 matmul cost a hundred times the work."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
