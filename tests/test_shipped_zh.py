"""The shipped bilingual model: Chinese and English zero-shot labels and queries on the shapes world."""

from __future__ import annotations

import pytest
import torch

import duomo
from duomo.data.shapes import ShapesDataset, all_pairs
from duomo.data.shapes_zh import EVAL_TEMPLATES_ZH, name_zh

pytestmark = pytest.mark.skipif(
    "shapes-zh" not in duomo.list_pretrained() or __import__("importlib").util.find_spec("cn_clip") is None,
    reason="needs the shipped shapes-zh and cn-clip's vocabulary",
)


@pytest.fixture(scope="module")
def pipe() -> duomo.Pipeline:
    return duomo.load("shapes-zh")


@pytest.mark.parametrize(("split", "space", "floor"), [("val", "split", 0.9), ("heldout", "all", 0.85)])
def test_chinese_labels_name_seen_and_unseen_pairs(
    pipe: duomo.Pipeline, split: str, space: str, floor: float
) -> None:
    ds = ShapesDataset(split, size=80, image_size=64, seed=3, label_space=space, max_objects=1)
    names = list(ds.classes) if space == "split" else [f"{c} {s}" for c, s in all_pairs()]
    labels = [name_zh(*n.split()) for n in names]
    probs = pipe.zero_shot_probs([ds[i]["image"] for i in range(len(ds))], labels, list(EVAL_TEMPLATES_ZH))
    targets = torch.tensor([ds[i]["label"] for i in range(len(ds))])
    assert float((probs.argmax(-1) == targets).float().mean()) >= floor


def test_a_chinese_query_finds_the_image_an_english_one_finds(pipe: duomo.Pipeline) -> None:
    ds = ShapesDataset("val", size=40, image_size=64, seed=5, max_objects=1)
    images = pipe.encode_image([ds[i]["image"] for i in range(len(ds))])
    main = ds.scene(0).main
    zh = pipe.encode_text(f"一个{name_zh(main.colour, main.shape)}")
    en = pipe.encode_text(f"a {main.colour} {main.shape}")
    top_zh, top_en = (images @ zh.T).squeeze(1).topk(3).indices, (images @ en.T).squeeze(1).topk(3).indices
    names = [ds.scene(int(i)).main.name for i in top_zh]
    assert names[0] == main.name and int(top_zh[0]) in top_en.tolist()


def test_the_server_takes_chinese_input(tmp_path) -> None:  # noqa: ANN001
    import base64
    import io

    from fastapi.testclient import TestClient

    from duomo.serve import ServeSettings, create_app

    ds = ShapesDataset("val", size=4, image_size=64, seed=5, max_objects=1)
    main = ds.scene(0).main
    buf = io.BytesIO()
    ds[0]["image"].save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    labels = [name_zh(main.colour, main.shape), "蓝色十字" if main.name != "blue cross" else "红色心形"]
    with TestClient(create_app(ServeSettings(use_index=False, model="shapes-zh"))) as client:
        r = client.post("/v1/embeddings", json={"input": ["一个红色的五角星", "红色五角星。"]})
        assert r.status_code == 200 and len(r.json()["data"]) == 2
        r = client.post("/classify", json={"image": image, "labels": labels})
        assert r.status_code == 200, r.text
        assert r.json()["labels"][0]["label"] == labels[0]
