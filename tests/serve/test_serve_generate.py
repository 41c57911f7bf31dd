"""/v1/images/generations: the official `openai` client end to end, the same images as the library, shared
denoiser calls across concurrent requests, and clear 4xx for out-of-bounds requests."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import duomo
from duomo.io.generator import save_generator
from duomo.serve import ServeSettings, create_app
from duomo.tasks.diffusion.generate import GenerateOptions, generate_tensors
from tests.serve.helpers import live_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tasks"))
from generate_helpers import tiny_generator  # noqa: E402


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_generator(tiny_generator(), tmp_path_factory.mktemp("gen") / "tiny-gen")


def decode_png(b64: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def library_images(folder: Path, prompt: str, n: int, seed: int, steps: int) -> np.ndarray:
    model = duomo.load(str(folder)).model
    images = generate_tensors(model, [prompt], n=n, options=GenerateOptions(seed=seed, steps=steps))
    return (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def test_openai_client_images_generate(pipeline: duomo.Pipeline, generator_dir: Path) -> None:
    openai = pytest.importorskip("openai")
    settings = ServeSettings(
        use_index=False, api_keys=["sk-test"], generator=str(generator_dir), max_generate_n=4
    )
    app = create_app(settings, pipeline=pipeline)
    with live_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0, timeout=60)
        res = client.images.generate(
            model="tiny-gen",
            prompt="a red circle",
            n=2,
            response_format="b64_json",
            extra_body={"seed": 7, "steps": 3},
        )
        got = np.stack([decode_png(d.b64_json) for d in res.data])
        want = library_images(generator_dir, "a red circle", 2, 7, 3)
        assert got.shape == (2, 8, 8, 3)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # the same images (to rounding)

        big = client.images.generate(prompt="a red circle", size="32x32", extra_body={"seed": 7, "steps": 3})
        assert decode_png(big.data[0].b64_json).shape == (32, 32, 3)
        url_res = client.images.generate(prompt="x", response_format="url", extra_body={"steps": 2})
        assert url_res.data[0].url.startswith("data:image/png;base64,")

        # concurrent requests share denoiser calls: 6 requests x 3 steps in far fewer than 18 calls
        service = app.state.duomo.generation
        before = service.denoiser_calls
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            outs = list(
                pool.map(
                    lambda i: client.images.generate(prompt=f"p{i}", extra_body={"steps": 3, "seed": i}),
                    range(6),
                )
            )
        assert len(outs) == 6 and service.denoiser_calls - before < 18

        with pytest.raises(openai.BadRequestError, match="n must be"):
            client.images.generate(prompt="x", n=5)
        with pytest.raises(openai.BadRequestError, match="size"):
            client.images.generate(prompt="x", size="1024x768")
        with pytest.raises(openai.BadRequestError, match="steps"):
            client.images.generate(prompt="x", extra_body={"steps": 1000})
        with pytest.raises(openai.BadRequestError, match="dpm"):
            client.images.generate(prompt="x", extra_body={"sampler": "dpn"})
        with pytest.raises(openai.NotFoundError):
            client.images.generate(model="dall-e-3", prompt="x")


def test_no_generator_is_a_404(client) -> None:
    r = client.post("/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 404 and "--generator" in r.json()["error"]["message"]


def test_service_matches_library_at_any_mix_of_requests(generator_dir: Path) -> None:
    """Requests at different steps and settings stepped together give each its own library images."""
    import asyncio

    from duomo.api.generate import GeneratorPipeline
    from duomo.serve.batcher import model_executor
    from duomo.serve.generation import GenerationService

    pipe = duomo.load(str(generator_dir))
    assert isinstance(pipe, GeneratorPipeline)
    service = GenerationService(pipe, model_executor(), name="g", max_batch=16)

    async def run() -> list[list[bytes]]:
        await service.start()
        jobs = [
            service.generate("a red circle", n=2, seed=1, steps=4),
            service.generate("a blue star", n=1, seed=2, steps=2, sampler="euler_a", guidance=5.0),
            service.generate("a cyan heart", n=3, seed=3, steps=3, sampler="dpm", negative="red"),
        ]
        out = await asyncio.gather(*jobs)
        await service.close()
        return out

    results = asyncio.run(run())
    expected = [
        generate_tensors(pipe.model, ["a red circle"], 2, None, GenerateOptions(seed=1, steps=4)),
        generate_tensors(
            pipe.model,
            ["a blue star"],
            1,
            None,
            GenerateOptions(seed=2, steps=2, sampler="euler_a", guidance=5.0),
        ),
        generate_tensors(
            pipe.model, ["a cyan heart"], 3, "red", GenerateOptions(seed=3, steps=3, sampler="dpm")
        ),
    ]
    for pngs, want in zip(results, expected, strict=True):
        got = np.stack([np.array(Image.open(io.BytesIO(p)).convert("RGB")) for p in pngs]).astype(int)
        ref = (want.permute(0, 2, 3, 1).numpy() * 255).round().astype(int)
        assert np.abs(got - ref).max() <= 1
    assert service.denoiser_calls == 4  # the longest request's steps: the others rode along


@contextlib.contextmanager
def slow_generation_server(pipeline: duomo.Pipeline, generator_dir: Path, timeout_s: float):
    """(url, generation service) of a live server whose every shared denoiser step takes at least 50 ms, so
    a 100-step request is reliably mid-way when its time limit passes or its client leaves."""
    settings = ServeSettings(use_index=False, generator=str(generator_dir), generate_timeout_s=timeout_s)
    app = create_app(settings, pipeline=pipeline)
    with live_server(app) as url:
        service = app.state.duomo.generation
        step = service._step

        def slow_step(jobs):
            time.sleep(0.05)
            return step(jobs)

        service._step = slow_step
        yield url, service


def _settles(service, wait: float = 5.0) -> int:
    """Denoiser calls once the loop has gone idle (fails if it keeps stepping for `wait` s)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not service.active and not service.waiting:
            calls = service.denoiser_calls
            time.sleep(0.3)
            if service.denoiser_calls == calls:
                return calls
        time.sleep(0.05)
    raise AssertionError("the generation loop kept stepping after its request was abandoned")


def test_time_limit_is_a_504_and_stops_the_work(pipeline: duomo.Pipeline, generator_dir: Path) -> None:
    import httpx

    with slow_generation_server(pipeline, generator_dir, 0.5) as (url, service):
        r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "steps": 100}, timeout=30)
        assert r.status_code == 504 and "longer than 0.5 s" in r.json()["error"]["message"]
        assert _settles(service) < 60 and service.abandoned == 1  # 100 steps x 50 ms were not all run
        ok = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "steps": 2}, timeout=30)
        assert ok.status_code == 200  # the server goes on


def test_a_client_that_disconnects_stops_its_work(pipeline: duomo.Pipeline, generator_dir: Path) -> None:
    import httpx

    with slow_generation_server(pipeline, generator_dir, 60) as (url, service):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "steps": 100}, timeout=0.5)
        assert _settles(service) < 60 and service.abandoned == 1
