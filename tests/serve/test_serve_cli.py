"""`rlhfkit serve` through the real CLI, LoRA adapter folders, API keys, failures over HTTP."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from rlhfkit.config import parse_config
from rlhfkit.errors import InputError
from rlhfkit.serve.server import Config, start_background

MSG = [{"role": "user", "content": "hi"}]


def test_config_defaults_and_validation():
    cfg = parse_config(Config, ["--model", "m", "--port", "9000", "--max-batch-size", "4"])
    assert (cfg.model, cfg.port, cfg.max_batch_size, cfg.served_model_name) == ("m", 9000, 4, "")
    with pytest.raises(InputError) as e:
        parse_config(Config, ["--port", "70000", "--max-batch-size", "0", "--batch-wait-ms", "-1"])
    assert len(e.value.problems) == 3
    with pytest.raises(InputError, match="RLHFKIT_TEST_NO_SUCH_KEY"):
        parse_config(Config, ["--api-key-env", "RLHFKIT_TEST_NO_SUCH_KEY"])


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    env["PYTHONPATH"] = os.path.abspath(src) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_cli_serves_and_stops(tiny_path):
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit", "serve", "--model", tiny_path, "--port", "0",
                             "--served-model-name", "tiny", "--log-level", "warning", "--threads", "1"],
                            stderr=subprocess.PIPE, text=True, env=_env())
    lines, found = [], threading.Event()
    url = {}

    def read():
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"at (http://\S+)/v1", line)
            if m:
                url["base"] = m.group(1)
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert found.wait(180), "".join(lines)
        with httpx.Client(timeout=60) as http:
            for _ in range(600):
                try:
                    if http.get(url["base"] + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
        client = openai.OpenAI(base_url=url["base"] + "/v1", api_key="x", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=5)
        assert r.choices[0].finish_reason in ("stop", "length")
        client.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            raise
    assert proc.returncode in (0, 130), "".join(lines)


def test_cli_port_in_use_is_a_clean_error(tiny_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "rlhfkit", "serve", "--model", tiny_path, "--port", str(port)],
                             capture_output=True, text=True, env=_env(), timeout=300)
    assert out.returncode == 2
    assert f"error: cannot listen on 127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr


def test_lora_adapter_folder(tmp_path, tiny_path):
    from rlhfkit.models.loading import apply_lora, load_causal_lm

    adapter = apply_lora(load_causal_lm(tiny_path), r=2, alpha=4)
    adapter.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    with start_background(str(tmp_path / "adapter")) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)
        assert client.models.list().data[0].id == str(tmp_path / "adapter")
        r = client.chat.completions.create(model=server.model_name, messages=MSG, max_tokens=4)
        assert r.usage.completion_tokens >= 1
        client.close()


def test_api_key(policy):
    model, tok = policy
    with start_background(model, tok, served_model_name="keyed", api_key="s3cret") as server:
        bad = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0, timeout=120)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=server.base_url, api_key="s3cret", max_retries=0, timeout=120)
        assert good.models.list().data[0].id == "keyed"
        assert httpx.get(server.url + "/health").status_code == 200  # outside /v1: no key needed
        bad.close()
        good.close()


def test_generation_failure_over_http_is_a_json_error(policy, monkeypatch):
    """A failing model is answered with OpenAI's error object (plain and mid-stream), and the
    server keeps serving."""
    model, tok = policy
    with start_background(model, tok, served_model_name="tiny") as server:
        def boom(*args, **kwargs):
            raise RuntimeError("simulated device failure")

        monkeypatch.setattr(model, "forward", boom)  # decoding calls the forward
        body = {"model": "tiny", "messages": MSG, "max_tokens": 3}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
        error = r.json()["error"]
        assert r.status_code == 500 and error["type"] == "server_error"
        assert "simulated device failure" in error["message"]
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)
        with pytest.raises(openai.APIError, match="simulated device failure"):
            for _ in client.chat.completions.create(model="tiny", messages=MSG, max_tokens=3, stream=True):
                pass
        monkeypatch.undo()
        assert client.chat.completions.create(model="tiny", messages=MSG, max_tokens=3).choices
        client.close()
