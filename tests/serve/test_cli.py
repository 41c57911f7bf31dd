"""`duomo serve` is registered on the CLI and turns its options into ServeSettings."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from duomo.cli import app


def test_serve_help_lists_the_options() -> None:
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    for option in (
        "--model",
        "--index",
        "--host",
        "--port",
        "--max-batch",
        "--max-wait-ms",
        "--max-queue",
        "--api-key",
    ):
        assert option in result.output


def test_serve_builds_settings_and_runs_uvicorn(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    import uvicorn

    import duomo.serve

    seen: dict = {}

    class FakeApp:
        class state:  # noqa: N801 - mimics app.state
            class duomo:  # noqa: N801
                class model:  # noqa: N801
                    name = "fake"

    def fake_create_app(settings):  # noqa: ANN001, ANN202
        seen["settings"] = settings
        return FakeApp()

    monkeypatch.setattr(duomo.serve, "create_app", fake_create_app)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(run=kw))
    monkeypatch.setenv("DUOMO_API_KEYS", "envkey, other")
    args = ["serve", "--model", "ViT-micro", "--index", str(tmp_path), "--port", "9123", "--max-batch", "8"]
    args += ["--max-wait-ms", "2", "--max-queue", "64", "--api-key", "clikey"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    s = seen["settings"]
    assert (s.model, s.index_dir, s.port, s.max_batch, s.max_wait_ms, s.max_queue) == (
        "ViT-micro",
        tmp_path,
        9123,
        8,
        2.0,
        64,
    )
    assert s.api_keys == ["clikey", "envkey", "other"] and s.max_inputs <= 64
    assert seen["run"]["host"] == "127.0.0.1" and seen["run"]["port"] == 9123
