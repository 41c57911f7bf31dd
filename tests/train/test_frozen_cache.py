"""A frozen LiT tower's features are computed once per distinct caption, equal to recomputing them."""

from __future__ import annotations

import pytest
import torch

from duomo.data.tokenizers import build_tokenizer
from duomo.io.minilm import package_dir
from duomo.io.text_towers import build_model
from duomo.train.frozen_cache import FeatureCache, cache_frozen_features

pytestmark = pytest.mark.skipif(package_dir() is None, reason="the MiniLM package is not installed")


@pytest.fixture(scope="module")
def lit():  # noqa: ANN201
    return build_model("ViT-tiny-conv-MiniLM").eval()


def test_cached_features_equal_recomputing_them(lit) -> None:  # noqa: ANN001
    tok = build_tokenizer(lit.config.text)
    batches = [
        ["a red star", "a small green circle at the top", "hello"],
        ["hello", "a red star", "a blue square", "a red star"],
    ]
    plain = [lit.encode_text(tok(b)) for b in batches]
    caches = cache_frozen_features(lit)
    try:
        assert len(caches) == 1 and caches[0].fn.__self__ is lit.text
        cached = [lit.encode_text(tok(b)) for b in batches]
        for a, b in zip(plain, cached, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert caches[0].misses == 4 and caches[0].hits == 3  # 4 distinct captions, each computed once
        # a row's features do not depend on its batch: the same caption alone gives the cached value exactly
        ids = tok(["a red star"])
        assert torch.equal(caches[0](ids)[0], caches[0].fn(ids)[0]) and caches[0].misses == 4
    finally:
        del lit.text.sentence_embedding  # back to the method for the other tests


def test_gradients_still_reach_the_projection(lit) -> None:  # noqa: ANN001
    tok = build_tokenizer(lit.config.text)
    caches = cache_frozen_features(lit)
    try:
        lit.text.proj.weight.grad = None
        lit.encode_text(tok(["a red star", "hello"])).sum().backward()
        assert lit.text.proj.weight.grad is not None and lit.text.proj.weight.grad.abs().sum() > 0
        assert caches
    finally:
        del lit.text.sentence_embedding


def test_a_trainable_tower_is_not_cached() -> None:
    from duomo.models import create_model

    model = create_model("ViT-micro")  # duomo's own text tower: nothing frozen to cache
    assert cache_frozen_features(model) == []


def test_the_cache_drops_the_least_recently_used() -> None:
    calls = []

    def fn(tokens: torch.Tensor) -> torch.Tensor:
        calls.append(tokens.clone())
        return tokens.float()

    cache = FeatureCache(fn, max_entries=2)
    cache(torch.tensor([[1, 2, 0], [3, 0, 0]]))
    cache(torch.tensor([[4, 0, 0]]))
    assert len(cache.store) == 2 and cache.misses == 3
    cache(torch.tensor([[1, 2, 0]]))  # dropped, computed again
    assert cache.misses == 4


def _lit_run(out, **fields):  # noqa: ANN001, ANN003, ANN202
    from duomo.train.config import TrainConfig
    from duomo.train.run import train

    cfg = TrainConfig(
        model="ViT-tiny-MiniLM",
        data="shapes",
        data_size=64,
        steps=4,
        batch_size=8,
        warmup=1,
        workers=0,
        save_every=2,
        log_every=1,
        quiet=True,
        plot=False,
        out=str(out),
    ).replace(**fields)
    return train(cfg)


@pytest.mark.slow
def test_lit_training_with_the_cache_matches_and_resumes_exactly(tmp_path) -> None:  # noqa: ANN001
    import json

    from duomo.io.native import load_native

    def losses(folder):  # noqa: ANN001, ANN202
        return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]

    _lit_run(tmp_path / "plain", cache_frozen=False)
    _lit_run(tmp_path / "cached")
    assert losses(tmp_path / "cached") == pytest.approx(losses(tmp_path / "plain"), abs=1e-4)
    # a fresh process state (an empty cache) resuming from step 2 ends where the straight run ended
    midway = tmp_path / "cached" / "checkpoints" / "step-00000002.pt"
    _lit_run(tmp_path / "resumed", resume=str(midway))
    a, b = load_native(tmp_path / "cached" / "model")[1], load_native(tmp_path / "resumed" / "model")[1]
    for key in a:
        assert torch.equal(a[key], b[key]), key
