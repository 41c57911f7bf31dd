"""AltCLIP (XLM-R text tower): a transformers AltCLIPModel directory loads with exact embeddings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.io.reference_helpers import features, perturb


def test_an_altclip_directory_loads_with_exact_embeddings(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AltCLIPConfig(
        text_config=dict(
            vocab_size=250,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=80,
            project_dim=48,
            type_vocab_size=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
    )
    torch.manual_seed(0)
    ref = transformers.AltCLIPModel(cfg).eval()
    perturb(ref)
    ref.save_pretrained(tmp_path / "alt")
    from duomo.io import load_model

    model = load_model(tmp_path / "alt")  # no sentencepiece.bpe.model in this folder: ids are given here
    ids = torch.tensor([[0, 17, 42, 99, 2, 1, 1], [0, 5, 2, 1, 1, 1, 1], [0, 8, 9, 10, 11, 12, 2]])
    images = torch.randn(2, 3, 32, 32)

    with torch.no_grad():
        want = features(ref.get_text_features(input_ids=ids, attention_mask=(ids != 1).long()))
        torch.testing.assert_close(model.encode_text(ids), want, rtol=0, atol=1e-5)
        want = features(ref.get_image_features(pixel_values=images))
        torch.testing.assert_close(model.encode_image(images), want, rtol=0, atol=1e-5)
    assert model.config.text.extra["positions"] == "roberta" and model.config.text.tokenizer == "beit3-spm"
