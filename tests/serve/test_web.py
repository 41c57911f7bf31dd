"""The web page end to end in headless Chromium (Playwright): text and image search, drag and drop, errors."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import duomo
from duomo.serve import ServeSettings, create_app
from tests.serve.helpers import live_server

CHROMIUM = os.environ.get("DUOMO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    ),
]


def save_artifact(page, tmp_path: Path, name: str) -> Path:  # noqa: ANN001
    """Screenshot into pytest's tmp dir, and a copy into $DUOMO_ARTIFACTS when set."""
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    target = os.environ.get("DUOMO_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / name)
    return shot


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """One headless Chromium for the module."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page_at(browser, image_index: tuple[Path, Path], pipeline: duomo.Pipeline) -> Iterator[tuple]:  # noqa: ANN001
    """(page, base_url) of a live server over the generated index; browser console errors fail the test."""
    index_dir, _ = image_index
    app = create_app(ServeSettings(index_dir=index_dir), pipeline=pipeline)
    with live_server(app) as url:
        # Playwright's wait_for_function evaluates strings, which the page's CSP forbids; the last test runs
        # with the CSP enforced.
        context = browser.new_context(viewport={"width": 1100, "height": 800}, bypass_csp=True)
        page = context.new_page()
        page.set_default_timeout(20_000)
        problems: list[str] = []
        page.on("pageerror", lambda err: problems.append(str(err)))
        page.on("requestfailed", lambda req: problems.append(f"request failed: {req.url}"))
        page.goto(url + "/")
        yield page, url
        context.close()
        assert not problems, problems


@contextlib.contextmanager
def csp_page(browser, url: str, timeout_ms: int = 20_000, **context_args: object) -> Iterator[object]:  # noqa: ANN001
    """A page at `url` with the page's CSP enforced (so only selectors and attribute reads in the test); page
    errors and CSP violations reported in the console fail the test."""
    context = browser.new_context(**context_args)
    page = context.new_page()
    page.set_default_timeout(timeout_ms)
    problems: list[str] = []
    page.on("pageerror", lambda err: problems.append(str(err)))
    page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
    try:
        page.goto(url + "/")
        yield page
    finally:
        context.close()
    assert not problems, problems


ALL_IMAGES_LOADED = (
    "[...document.querySelectorAll('[data-testid=result] img')].every(i => i.complete && i.naturalWidth > 0)"
)


def result_cards(page) -> list:  # noqa: ANN001
    return page.locator("[data-testid=result]").all()


def test_text_search_shows_a_grid_of_loaded_images(page_at: tuple, tmp_path: Path) -> None:
    page, _ = page_at
    page.wait_for_function("document.getElementById('server-info').textContent.includes('9 images indexed')")
    page.fill("[data-testid=query]", "a red circle")
    page.click("[data-testid=search-button]")
    page.wait_for_selector("[data-testid=result] img")
    page.select_option("#k", "12")
    cards = result_cards(page)
    assert len(cards) == 9  # k=12 default, 9 indexed images
    page.wait_for_function(ALL_IMAGES_LOADED)
    scores = [float(c.locator(".score").inner_text()) for c in cards]
    assert scores == sorted(scores, reverse=True)
    assert "results for" in page.inner_text("[data-testid=status]")
    save_artifact(page, tmp_path, "serve-text-search.png")


def test_upload_an_example_image(page_at: tuple, image_index: tuple[Path, Path], tmp_path: Path) -> None:
    page, _ = page_at
    _, root = image_index
    page.set_input_files("[data-testid=file-input]", str(root / "green_square.png"))
    page.wait_for_selector("[data-testid=result] img")
    first = result_cards(page)[0]
    assert first.locator(".name").inner_text() == "green_square.png"
    assert float(first.locator(".score").inner_text()) == pytest.approx(1.0, abs=1e-3)
    assert page.locator("#query-preview").is_visible()
    save_artifact(page, tmp_path, "serve-image-search.png")


def test_drag_and_drop_an_image(page_at: tuple, image_index: tuple[Path, Path]) -> None:
    page, _ = page_at
    _, root = image_index
    data = list((root / "yellow_circle.png").read_bytes())
    page.evaluate(
        """(bytes) => {
            const file = new File([new Uint8Array(bytes)], 'drop.png', { type: 'image/png' });
            const dt = new DataTransfer();
            dt.items.add(file);
            const zone = document.querySelector('[data-testid=dropzone]');
            const init = { dataTransfer: dt, bubbles: true, cancelable: true };
            zone.dispatchEvent(new DragEvent('dragover', init));
            zone.dispatchEvent(new DragEvent('drop', init));
        }""",
        data,
    )
    page.wait_for_selector("[data-testid=result]")
    assert result_cards(page)[0].locator(".name").inner_text() == "yellow_circle.png"


def test_errors_and_empty_states_are_shown(page_at: tuple, tmp_path: Path) -> None:
    page, _ = page_at
    status = page.locator("[data-testid=status]")
    page.click("[data-testid=search-button]")  # empty query
    assert "Type something" in status.inner_text()
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    page.set_input_files("[data-testid=file-input]", str(bad))
    page.wait_for_selector("[data-testid=status].error")
    assert "image" in status.inner_text()  # the server's own message, shown as is
    assert len(result_cards(page)) == 0
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    page.set_input_files("[data-testid=file-input]", str(text))
    page.wait_for_function(
        "document.querySelector('[data-testid=status]').textContent.includes('not an image')"
    )
    save_artifact(page, tmp_path, "serve-error.png")


def test_page_works_with_api_keys_under_its_csp(
    browser,
    image_index: tuple[Path, Path],
    pipeline: duomo.Pipeline,  # noqa: ANN001
) -> None:
    from playwright.sync_api import expect

    index_dir, _ = image_index
    app = create_app(ServeSettings(index_dir=index_dir, api_keys=["s3cret"]), pipeline=pipeline)
    with live_server(app) as url:
        context = browser.new_context()  # CSP enforced: only selectors and attribute reads below
        page = context.new_page()
        page.set_default_timeout(20_000)
        violations: list[str] = []
        page.on(
            "console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None
        )
        page.goto(url + "/")
        page.wait_for_selector("#auth:not([hidden])")
        page.fill("[data-testid=query]", "blue")
        page.click("[data-testid=search-button]")
        page.wait_for_selector("[data-testid=status].error")
        assert "API key" in page.inner_text("[data-testid=status]")
        page.fill("#api-key", "s3cret")
        page.dispatch_event("#api-key", "change")
        page.click("[data-testid=search-button]")
        page.wait_for_selector("[data-testid=result] img")
        imgs = page.locator("[data-testid=result] img").all()
        assert imgs
        for img in imgs:  # each image is fetched on its own, in any order: wait for every one
            expect(img).to_have_attribute("src", re.compile(r"^blob:"))
        context.close()
        assert not violations, violations


def test_ask_and_caption_an_image_under_the_csp(
    browser,  # noqa: ANN001
    pipeline: duomo.Pipeline,
    task_models: tuple[Path, Path],
    image_index: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    from duomo.io.beit3_tasks import load_task
    from duomo.tasks.beit3.caption import caption_image
    from duomo.tasks.beit3.vqa import answer

    vqa_dir, caption_dir = task_models
    image = image_index[1] / "red_circle.png"
    settings = ServeSettings(use_index=False, vqa_model=vqa_dir, caption_model=caption_dir)
    with live_server(create_app(settings, pipeline=pipeline)) as url, csp_page(browser, url) as page:
        page.wait_for_selector("[data-testid=tasks]:not([hidden])")
        result = page.locator("[data-testid=task-result]")
        page.click("[data-testid=ask-button]")
        page.wait_for_selector("[data-testid=task-result].error")
        assert "Choose an image" in result.inner_text()
        page.set_input_files("[data-testid=task-file]", str(image))
        page.fill("[data-testid=question]", "what color is the circle?")
        page.click("[data-testid=ask-button]")
        text, score = answer(load_task(vqa_dir, "vqa")[0], image, "what color is the circle?")
        expect(result).to_have_text(f"{text} ({score:.2f})")
        page.click("[data-testid=caption-button]")
        expect(result).to_have_text(caption_image(load_task(caption_dir, "caption")[0], image))
        save_artifact(page, tmp_path, "serve-ask-caption.png")


def test_task_panel_is_hidden_without_task_models(page_at: tuple) -> None:
    page, _ = page_at
    page.wait_for_selector("[data-testid=server-info]:not(:empty)")
    page.wait_for_function("!document.getElementById('server-info').textContent.includes('connecting')")
    assert not page.locator("[data-testid=tasks]").is_visible()


def test_the_page_in_chinese(
    browser, image_index: tuple[Path, Path], pipeline: duomo.Pipeline, tmp_path: Path
) -> None:  # noqa: ANN001
    """A zh-CN browser gets the interface in Chinese (CSP enforced) and searches with a Chinese query."""
    index_dir, _ = image_index
    app = create_app(ServeSettings(index_dir=index_dir), pipeline=pipeline)
    with live_server(app) as url:
        context = browser.new_context(locale="zh-CN", viewport={"width": 1100, "height": 800})
        page = context.new_page()
        page.set_default_timeout(20_000)
        problems: list[str] = []
        page.on("pageerror", lambda err: problems.append(str(err)))
        page.goto(url + "/")
        assert page.get_attribute("html", "lang") == "zh-CN"
        assert page.inner_text("[data-testid=search-button]") == "搜索"
        assert "例如" in page.get_attribute("[data-testid=query]", "placeholder")
        page.wait_for_selector("text=已索引 9 张图片")
        page.fill("[data-testid=query]", "一个红色的圆形")
        page.click("[data-testid=search-button]")
        page.wait_for_selector("[data-testid=result] img")
        assert "个结果" in page.inner_text("[data-testid=status]")
        assert len(result_cards(page)) == 9
        save_artifact(page, tmp_path, "serve-chinese.png")
        context.close()
        assert not problems, problems


def test_create_panel_makes_images_and_searches_with_one(
    browser,  # noqa: ANN001
    pipeline: duomo.Pipeline,
    image_index: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    """The shipped generator behind the page's create panel (CSP enforced): four images appear, and clicking
    one searches the index with it."""
    from playwright.sync_api import expect

    index_dir, _ = image_index
    settings = ServeSettings(index_dir=index_dir, generator="shapes-gen")
    viewport = {"width": 1100, "height": 900}
    with (
        live_server(create_app(settings, pipeline=pipeline)) as url,
        csp_page(browser, url, 30_000, viewport=viewport) as page,
    ):
        page.wait_for_selector("[data-testid=create]:not([hidden])")
        status = page.locator("[data-testid=create-status]")
        page.click("[data-testid=create-button]")
        expect(status).to_have_text("Type what to create.")
        page.fill("[data-testid=create-prompt]", "a purple star")
        page.click("[data-testid=create-button]")
        expect(status).to_have_text("4 created; click one to search with it")
        images = page.locator("[data-testid=created-image] img")
        expect(images).to_have_count(4)
        for i in range(4):  # decoded PNGs at the generator's size
            assert images.nth(i).evaluate("i => i.complete && i.naturalWidth") == 32
        first = images.first.get_attribute("alt")  # images land in the order they finish, not by seed
        assert first is not None and first.startswith("a purple star #")
        images.first.click()
        number = first.rsplit("#", 1)[1]
        expect(page.locator("[data-testid=status]")).to_contain_text(f"image created-{number}.png")
        assert page.locator("[data-testid=result]").count() > 0
        save_artifact(page, tmp_path, "serve-create.png")


def test_create_panel_is_hidden_without_a_generator(page_at: tuple) -> None:
    page, _ = page_at
    page.wait_for_function("!document.getElementById('server-info').textContent.includes('connecting')")
    assert not page.locator("[data-testid=create]").is_visible()


def test_chat_panel_streams_an_answer_about_an_image(
    browser,  # noqa: ANN001
    pipeline: duomo.Pipeline,
    tmp_path: Path,
) -> None:
    """A chat model behind the page's chat panel (CSP enforced): choose an image, ask, the streamed reply
    equals the library's answer; a follow-up keeps the conversation; "New chat" clears it."""
    import sys

    from playwright.sync_api import expect

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tasks" / "lm"))
    from chat_helpers import tiny_chat_dir

    from tests.serve.helpers import png_bytes

    chat_dir = tiny_chat_dir(tmp_path / "tiny-chat")
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes((200, 30, 30), 64))
    want = duomo.load(str(chat_dir)).chat(
        [{"role": "user", "content": "<image>\nwhat colour is it ?"}],
        [str(image)],
        duomo.tasks.lm.decode.DecodeSettings(max_tokens=128),
    )
    assert want.text  # the tiny model says something, so the comparison below means something
    settings = ServeSettings(use_index=False, chat=str(chat_dir))
    with live_server(create_app(settings, pipeline=pipeline)) as url, csp_page(browser, url, 30_000) as page:
        page.wait_for_selector("[data-testid=chat]:not([hidden])")
        page.set_input_files("[data-testid=chat-file]", str(image))
        page.fill("[data-testid=chat-input]", "what colour is it ?")
        page.click("[data-testid=chat-button]")
        reply = page.locator("[data-testid=chat-assistant].done")
        expect(reply).to_have_count(1)
        assert reply.inner_text() == want.text
        page.fill("[data-testid=chat-input]", "hi")
        page.click("[data-testid=chat-button]")
        expect(page.locator("[data-testid=chat-assistant].done")).to_have_count(2)
        expect(page.locator("[data-testid=chat-user]")).to_have_count(2)
        save_artifact(page, tmp_path, "serve-chat.png")
        page.click("[data-testid=chat-reset]")
        expect(page.locator("[data-testid=chat-user]")).to_have_count(0)
