"""The official `openai` Python client, unchanged, against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest

import duomo
from duomo.serve import ServeSettings, create_app
from tests.serve.helpers import COLORS, data_url, live_server, png_bytes


def test_openai_client_embeddings_end_to_end(pipeline: duomo.Pipeline) -> None:
    openai = pytest.importorskip("openai")
    app = create_app(ServeSettings(use_index=False, api_keys=["sk-test"], max_wait_ms=20), pipeline=pipeline)
    with live_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0, timeout=30)
        texts = ["a red circle", "a blue square"]
        assert [m.id for m in client.models.list()] == [pipeline.name]

        # default: the client asks for base64 and decodes it itself
        res = client.embeddings.create(model=pipeline.name, input=texts)
        got = np.array([d.embedding for d in res.data], np.float32)
        np.testing.assert_allclose(got, pipeline.encode_text(texts).numpy(), atol=1e-5)
        assert res.model == pipeline.name and res.usage.prompt_tokens > 0
        assert [d.index for d in res.data] == [0, 1]

        res = client.embeddings.create(model="default", input="hello", encoding_format="float", dimensions=8)
        assert len(res.data[0].embedding) == 8
        assert np.linalg.norm(res.data[0].embedding) == pytest.approx(1.0, abs=1e-5)

        img = png_bytes(COLORS["red"])
        res = client.embeddings.create(model="default", input=[data_url(img)])
        np.testing.assert_allclose(res.data[0].embedding, pipeline.encode_image([img])[0].numpy(), atol=1e-5)

        # concurrent clients are merged into fewer model calls
        before = app.state.duomo.model.text.forward_calls
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            outs = list(
                pool.map(lambda i: client.embeddings.create(model="default", input=f"t{i}"), range(16))
            )
        assert len(outs) == 16 and app.state.duomo.model.text.forward_calls - before < 16

        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="text-embedding-3-small", input="x")
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="default", input=[])
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.embeddings.create(model="default", input="x")
