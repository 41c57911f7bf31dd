"""/vqa and /caption: the server answers what duomo.tasks answers, and every failure is a clear 4xx/503."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import duomo
from duomo.errors import CheckpointError, InputError
from duomo.io.beit3_tasks import load_task
from duomo.serve import ServeSettings, create_app
from duomo.tasks.beit3.caption import caption_image
from duomo.tasks.beit3.vqa import answer
from tests.serve.helpers import COLORS, data_url, png_bytes

QUESTION = "what color is the circle?"


@pytest.fixture
def tasks_client(make_client: Callable[..., TestClient], task_models: tuple[Path, Path]) -> TestClient:
    """A client for an app serving both task models."""
    vqa_dir, caption_dir = task_models
    return make_client(vqa_model=vqa_dir, caption_model=caption_dir)


def error_of(r, status: int) -> dict:  # noqa: ANN001
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    return err


def test_vqa_answers_what_the_python_api_answers(tasks_client: TestClient, task_models) -> None:  # noqa: ANN001
    model = load_task(task_models[0], "vqa")[0]
    for color in ("red", "blue"):
        img = png_bytes(COLORS[color], 40)
        want = answer(model, img, QUESTION)
        for image in (data_url(img), base64.b64encode(img).decode()):
            r = tasks_client.post("/vqa", json={"image": image, "question": QUESTION})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == "micro-vqa"
            assert body["answer"] in model.answers and 0.0 <= body["score"] <= 1.0
            assert body["answer"] == want[0]
            assert body["score"] == pytest.approx(want[1], abs=1e-6)
        r = tasks_client.post(
            "/vqa", data={"question": QUESTION}, files={"image": ("x.png", img, "image/png")}
        )
        assert r.status_code == 200, r.text
        assert (r.json()["answer"], r.json()["score"]) == (want[0], pytest.approx(want[1], abs=1e-6))


def test_caption_is_what_the_python_api_captions(tasks_client: TestClient, task_models) -> None:  # noqa: ANN001
    model = load_task(task_models[1], "caption")[0]
    img = png_bytes(COLORS["green"], 40, "square")
    r = tasks_client.post("/caption", json={"image": data_url(img)})
    assert r.status_code == 200, r.text
    assert r.json() == {"model": "micro-caption", "caption": caption_image(model, img), "guide": None}
    want = caption_image(model, img, beam=3, max_len=5)
    r = tasks_client.post("/caption", json={"image": data_url(img), "beam": 3, "max_length": 5})
    assert r.status_code == 200, r.text
    assert r.json()["caption"] == want
    files = {"image": ("g.png", img, "image/png")}
    r = tasks_client.post("/caption", data={"beam": "3", "max_length": "5"}, files=files)
    assert r.status_code == 200, r.text
    assert r.json()["caption"] == want


def test_unconfigured_endpoints_say_which_flag_to_pass(client: TestClient) -> None:
    img = data_url(png_bytes())
    for path, body, flag in (
        ("/vqa", {"image": img, "question": QUESTION}, "--vqa-model"),
        ("/caption", {"image": img}, "--caption-model"),
    ):
        r = client.post(path, json=body)
        err = error_of(r, 503)
        assert flag in err["message"] and err["code"] == "not_configured"
        assert "retry-after" not in r.headers  # retrying will not help
    assert client.get("/healthz").json()["tasks"] == {"vqa": None, "caption": None}


def test_one_task_configured_leaves_the_other_unavailable(
    make_client: Callable[..., TestClient], task_models: tuple[Path, Path]
) -> None:
    c = make_client(caption_model=task_models[1])
    assert c.post("/caption", json={"image": data_url(png_bytes())}).status_code == 200
    r = c.post("/vqa", json={"image": data_url(png_bytes()), "question": QUESTION})
    assert "--vqa-model" in error_of(r, 503)["message"]


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        ("/vqa", {"image": data_url(b"not an image at all"), "question": QUESTION}, "image"),
        ("/vqa", {"image": "@@not base64@@", "question": QUESTION}, "base64"),
        ("/vqa", {"image": "", "question": QUESTION}, "empty"),
        ("/vqa", {"image": "data:text/plain;base64,aGk=", "question": QUESTION}, "data:image"),
        ("/caption", {"image": data_url(png_bytes()[:60])}, "image"),
        ("/caption", {"image": base64.b64encode(b"GIF89a broken").decode()}, "image"),
    ],
)
def test_bad_images_are_400_with_a_message(
    tasks_client: TestClient, path: str, body: dict, fragment: str
) -> None:
    err = error_of(tasks_client.post(path, json=body), 400)
    assert fragment in err["message"]


def test_a_path_is_never_read_as_an_image(tasks_client: TestClient, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())
    error_of(tasks_client.post("/vqa", json={"image": str(secret), "question": QUESTION}), 400)
    error_of(tasks_client.post("/caption", json={"image": str(secret)}), 400)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"image": "IMG"}, "question: Field required"),
        ({"question": QUESTION}, "image: Field required"),
        ({"image": "IMG", "question": ""}, "question is empty"),
        ({"image": "IMG", "question": "   \n"}, "question is empty"),
        ({"image": "IMG", "question": "x" * 201}, "201 characters; the limit is 200"),
        ({"image": "IMG", "question": 42}, "question"),
        ({"image": "IMG", "question": QUESTION, "extra": 1}, "extra"),
    ],
)
def test_question_errors(tasks_client: TestClient, body: dict, fragment: str) -> None:
    if body.get("image") == "IMG":
        body = {**body, "image": data_url(png_bytes())}
    err = error_of(tasks_client.post("/vqa", json=body), 400)
    assert fragment in err["message"]


def test_longest_allowed_question_is_answered(tasks_client: TestClient) -> None:
    r = tasks_client.post("/vqa", json={"image": data_url(png_bytes()), "question": "what " * 40})
    assert r.status_code == 200, r.text
    r = tasks_client.post("/vqa", data={}, files={"image": ("x.png", png_bytes(), "image/png")})
    assert "question" in error_of(r, 400)["message"]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"beam": 0}, "beam"),
        ({"beam": 9}, "beam"),
        ({"beam": "wide"}, "beam"),
        ({"max_length": 0}, "max_length"),
    ],
)
def test_caption_parameter_errors(tasks_client: TestClient, extra: dict, fragment: str) -> None:
    err = error_of(tasks_client.post("/caption", json={"image": data_url(png_bytes()), **extra}), 400)
    assert fragment in err["message"]


def test_health_metrics_and_schema_list_the_tasks(tasks_client: TestClient) -> None:
    tasks_client.post("/vqa", json={"image": data_url(png_bytes()), "question": QUESTION})
    tasks_client.post("/caption", json={"image": data_url(png_bytes()), "max_length": 3})
    health = tasks_client.get("/healthz").json()
    assert health["tasks"] == {"vqa": "micro-vqa", "caption": "micro-caption"}
    assert health["queues"]["vqa"]["running"] and health["queues"]["caption"]["running"]
    assert health["limits"]["max_question_chars"] == 200
    text = tasks_client.get("/metrics").text
    assert 'duomo_requests_total{endpoint="/vqa",method="POST",status="200"} 1' in text
    assert 'duomo_requests_total{endpoint="/caption",method="POST",status="200"} 1' in text
    assert 'duomo_batch_size_bucket{queue="vqa",le="1"} 1' in text
    paths = tasks_client.get("/openapi.json").json()["paths"]
    assert "/vqa" in paths and "/caption" in paths


def test_tasks_need_the_api_key(
    make_client: Callable[..., TestClient], task_models: tuple[Path, Path]
) -> None:
    c = make_client(vqa_model=task_models[0], api_keys=["s3cret"])
    body = {"image": data_url(png_bytes()), "question": QUESTION}
    assert c.post("/vqa", json=body).status_code == 401
    r = c.post("/vqa", json=body, headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200, r.text


def test_a_guided_server_captions_what_guided_python_captions(
    make_client: Callable[..., TestClient], task_models: tuple[Path, Path]
) -> None:
    model = load_task(task_models[1], "caption")[0]
    client = make_client(caption_model=task_models[1], caption_guide="shapes-tiny")
    img = png_bytes(COLORS["red"], 40, "circle")
    r = client.post("/caption", json={"image": data_url(img), "max_length": 4})
    assert r.status_code == 200, r.text
    assert r.json() == {
        "model": "micro-caption",
        "caption": caption_image(model, img, max_len=4, guide="shapes-tiny"),
        "guide": "shapes-tiny",
    }
    r = client.post("/caption", json={"image": data_url(img), "max_length": 4, "guide": False})
    assert r.json()["guide"] is None
    assert r.json()["caption"] == caption_image(model, img, max_len=4, guide="none")
    files = {"image": ("r.png", img, "image/png")}
    r = client.post("/caption", data={"max_length": "4", "guide": "false"}, files=files)
    assert r.status_code == 200 and r.json()["guide"] is None, r.text


def test_a_task_request_past_its_time_limit_gets_504_and_the_server_goes_on(
    make_client: Callable[..., TestClient], task_models: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from duomo.serve.tasks import TaskService

    real = TaskService._run_caption
    slow = {"on": True}

    def run(self, items):  # noqa: ANN001, ANN202
        if slow["on"]:
            time.sleep(0.5)
        return real(self, items)

    monkeypatch.setattr(TaskService, "_run_caption", run)
    client = make_client(caption_model=task_models[1], task_timeout_s=0.1)
    body = {"image": data_url(png_bytes()), "max_length": 3}
    err = error_of(client.post("/caption", json=body), 504)
    assert err["code"] == "timeout" and "0.1 s" in err["message"] and err["type"] == "timeout_error"
    slow["on"] = False
    for _ in range(50):  # once the slow call is off the model thread, the queue serves again
        r = client.post("/caption", json=body)
        if r.status_code == 200:
            break
        assert r.status_code == 504, r.text
        time.sleep(0.1)
    assert r.status_code == 200, r.text


def test_an_unknown_caption_guide_fails_at_startup(
    pipeline: duomo.Pipeline, task_models: tuple[Path, Path]
) -> None:
    settings = ServeSettings(use_index=False, caption_model=task_models[1], caption_guide="no-such-clip")
    with pytest.raises(InputError, match="caption guide"):
        create_app(settings, pipeline=pipeline)


def test_a_wrong_model_folder_fails_at_startup(
    pipeline: duomo.Pipeline, task_models: tuple[Path, Path]
) -> None:
    vqa_dir, caption_dir = task_models
    with pytest.raises(CheckpointError, match="not a 'vqa' model"):
        create_app(ServeSettings(use_index=False, vqa_model=caption_dir), pipeline=pipeline)
    with pytest.raises(CheckpointError, match="no model folder"):
        create_app(ServeSettings(use_index=False, caption_model=vqa_dir / "missing"), pipeline=pipeline)


def test_cli_flags_reach_the_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import uvicorn

    import duomo.serve
    from duomo.cli import app

    seen: dict = {}

    class FakeApp:
        class state:  # noqa: N801 - mimics app.state
            class duomo:  # noqa: N801
                class model:  # noqa: N801
                    name = "fake"

    monkeypatch.setattr(
        duomo.serve, "create_app", lambda settings: seen.update(settings=settings) or FakeApp()
    )
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    args = ["serve", "--vqa-model", str(tmp_path / "v"), "--caption-model", str(tmp_path / "c")]
    args += ["--caption-guide", "none", "--task-timeout", "5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (seen["settings"].vqa_model, seen["settings"].caption_model) == (tmp_path / "v", tmp_path / "c")
    assert seen["settings"].caption_guide == "none" and seen["settings"].task_timeout_s == 5
    help_text = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"}).output
    assert "--vqa-model" in help_text and "--caption-model" in help_text
