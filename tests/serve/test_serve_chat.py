"""/v1/chat/completions: the official `openai` client, streaming and not, with an image; the same reply as
the library; concurrent requests decoded together; clear 4xx for bad requests; /v1/models lists the model."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import duomo
from duomo.serve import ServeSettings, create_app
from tests.serve.helpers import live_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tasks" / "lm"))
from chat_helpers import tiny_chat_dir  # noqa: E402


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_chat_dir(tmp_path_factory.mktemp("chat") / "tiny-chat")


def data_url(colour=(200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), colour, np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(text: str, url: str) -> dict:
    return {
        "role": "user",
        "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}],
    }


def test_openai_client_chat_with_an_image(pipeline: duomo.Pipeline, chat_dir: Path) -> None:
    openai = pytest.importorskip("openai")
    app = create_app(
        ServeSettings(use_index=False, api_keys=["sk-test"], chat=str(chat_dir)), pipeline=pipeline
    )
    bot = duomo.load(str(chat_dir))
    url = data_url()
    raw = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    want = bot.chat(
        [{"role": "user", "content": "what colour is it ?\n<image>"}],
        [raw],
        duomo.tasks.lm.decode.DecodeSettings(max_tokens=8),
    )
    with live_server(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test", max_retries=0, timeout=60)
        messages = [image_message("what colour is it ?", url)]
        res = client.chat.completions.create(
            model="tiny-chat", messages=messages, max_tokens=8, temperature=0
        )
        assert res.choices[0].message.content == want.text
        assert res.choices[0].finish_reason == want.finish_reason
        assert res.usage.completion_tokens == len(want.tokens) and res.usage.prompt_tokens > 4

        stream = client.chat.completions.create(
            model="default",
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == want.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
        assert chunks[-1].usage.completion_tokens == len(want.tokens)

        text_only = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert text_only.choices[0].message.content is not None
        assert "tiny-chat" in [m.id for m in client.models.list().data]

        # concurrent requests share decode steps: 6 requests x 8 tokens in far fewer than 48 calls
        service = app.state.duomo.chat
        before = service.decode_calls
        with concurrent.futures.ThreadPoolExecutor(6) as pool:

            def ask(i: int):
                hello = [{"role": "user", "content": "hello"}]
                return client.chat.completions.create(
                    model="default",
                    messages=hello,
                    max_tokens=8,
                    temperature=1.0,
                    seed=i,
                    extra_body={"top_k": 5},
                )

            outs = list(pool.map(ask, range(6)))
        assert len(outs) == 6 and service.decode_calls - before < 6 * 7

        bad = [
            ({"messages": []}, "messages is empty"),
            ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role"),
            ({"messages": [image_message("x", "https://example.com/a.png")]}, "does not fetch"),
            ({"messages": [image_message("x", "data:text/plain;base64,aGk=")]}, "data URL of type"),
            ({"messages": [image_message("x", "data:image/png;base64,aGVsbG8=")]}, "image"),
            ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, "max_tokens"),
            ({"messages": [{"role": "user", "content": "<image> hi"}]}, "image_url parts"),
            ({"messages": [{"role": "user", "content": "hi " * 400}]}, "at most 256"),
            ({"messages": [image_message("x", url)] * 5}, "at most 4"),
        ]
        for kwargs, message in bad:
            with pytest.raises(openai.BadRequestError, match=message):
                client.chat.completions.create(model="default", **kwargs)
        with pytest.raises(openai.NotFoundError, match="not served here"):
            client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])


def test_no_chat_model_is_a_clear_404(make_client) -> None:
    res = make_client().post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert res.status_code == 404 and "--chat" in res.json()["error"]["message"]


def test_a_client_that_hangs_up_frees_its_row(pipeline: duomo.Pipeline, chat_dir: Path) -> None:
    import time as _time

    import httpx

    app = create_app(ServeSettings(use_index=False, chat=str(chat_dir)), pipeline=pipeline)
    with live_server(app) as base:
        service = app.state.duomo.chat
        original = service._step

        def slow_step(joining):  # noqa: ANN001, ANN202 - 20 ms a step: the reply outlives the client
            _time.sleep(0.02)
            return original(joining)

        service._step = slow_step
        service.pipeline.end_ids = ()  # the reply can only end by length: 200 steps, 4 s at least
        body = {"model": "default", "messages": [{"role": "user", "content": "hello"}], "stream": True,
                "max_tokens": 200, "temperature": 1.0, "seed": 1}  # fmt: skip
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data:") and "content" in line:
                    break  # one piece read, then hang up
        deadline = _time.monotonic() + 10
        while (service.active or service.waiting) and _time.monotonic() < deadline:
            _time.sleep(0.05)
        assert not service.active and service.abandoned >= 1
