"""`duomo chat`: ask a chat model about an image (one question, or an interactive session), answers
streamed as they are decoded."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)


def chat_command(
    image: str = typer.Argument(None, help="An image file (omit, or '-', for text only)."),
    question: str = typer.Argument(None, help="The question; without it, an interactive session starts."),
    model: str = typer.Option(
        "shapes-chat", "--model", "-m", help="A chat folder, LLaVA directory, smollm2, .gguf."
    ),
    max_tokens: int = typer.Option(128, "--max-tokens", min=1, help="Most tokens in one answer."),
    temperature: float = typer.Option(
        0.0, "--temperature", "-t", min=0, help="0: greedy; higher: more varied."
    ),
    top_p: float = typer.Option(
        1.0, "--top-p", help="Sample from the smallest set of this much probability."
    ),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sample from the k most likely tokens (0: all)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages repeats."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop before this text (repeatable)."),
    seed: int = typer.Option(None, "--seed", help="Random seed when sampling."),
    device: str = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: a GPU if any)."),
) -> None:
    """Ask a chat model about an image: `duomo chat star.png "what colour is the star?"`."""
    from duomo.api import load
    from duomo.api.chat import ChatPipeline
    from duomo.data.conversations import IMAGE_PLACEHOLDER
    from duomo.data.images import load_image
    from duomo.errors import InputError
    from duomo.tasks.lm.decode import Completion, DecodeSettings

    settings = DecodeSettings(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, stop=tuple(stop or ()), seed=seed,
    )  # fmt: skip
    images = []
    if image not in (None, "-"):
        if not Path(image).is_file():
            raise InputError(f"no such image file: {image}")
        images = [load_image(image)]  # decoded now: a corrupt file fails before the model loads
    bot = load(model, device=device)
    if not isinstance(bot, ChatPipeline):
        raise InputError(f"{model!r} is not a chat model; use shapes-chat, smollm2, a .gguf or a chat folder")
    messages: list[dict[str, str]] = []

    def answer(text: str) -> None:
        first = not messages
        content = f"{IMAGE_PLACEHOLDER}\n{text}" if first and images else text
        messages.append({"role": "user", "content": content})
        reply = ""
        for item in bot.stream(messages, images, settings):
            if isinstance(item, Completion):
                reply = item.text
            else:
                sys.stdout.write(item)
                sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})

    if question is not None:
        answer(question)
        return
    console.print(f"chatting with {model}{' about ' + image if images else ''}; an empty line or Ctrl-D ends")
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            break
        if not text:
            break
        answer(text)


def register(app: typer.Typer) -> None:
    """Add `duomo chat` to the app."""
    app.command("chat")(chat_command)
