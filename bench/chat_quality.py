"""Quality of a chat model on the shapes world, and what tuning did to its language model.

    python bench/chat_quality.py --model runs/shapes-chat/model --images 200 \
        --json bench/results/chat_quality.json

1. Held-out VQA: the questions BEiT-3's VQA is scored on (every question of `--images` held-out scenes, whose
   colour-shape pairs never occur in training), answered greedily; right when the normalised answer equals
   the expected one. Per question kind as for BEiT-3.
2. Descriptions: "Describe the picture." on the same images; how often the reply names the main object's
   colour and shape.
3. General ability kept: the plain-text questions in bench/data/plain_questions.txt, answered greedily by the
   base language model and by the tuned one (its LoRA adapters on, no image); the share of identical answers
   (first 48 tokens) and of identical first sentences.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

import duomo  # noqa: E402
from duomo.api.chat import ChatPipeline  # noqa: E402
from duomo.data.shapes import ShapesDataset  # noqa: E402
from duomo.tasks.beit3.vqa import question_type  # noqa: E402
from duomo.tasks.lm.decode import DecodeSettings  # noqa: E402


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-chat")
    ap.add_argument("--base", default="smollm2", help="the base language model for the general-ability check")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--questions", default=str(Path(__file__).parent / "data" / "plain_questions.txt"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    bot = duomo.load(args.model)
    assert isinstance(bot, ChatPipeline)
    data = ShapesDataset("heldout", size=args.images)
    short = DecodeSettings(max_tokens=12)
    right: dict[str, list[int]] = {}
    described = {"colour": 0, "shape": 0, "both": 0}
    started = time.perf_counter()
    examples = []
    for i in range(len(data)):
        sample = data[i]
        for question, expected in sample["qa"]:
            asked = question[:1].upper() + question[1:]
            got = bot.ask(sample["image"], asked, **vars(short))
            ok = int(normalise(got) == normalise(expected))
            right.setdefault(question_type(question), []).append(ok)
            if len(examples) < 12:
                examples.append({"question": question, "expected": expected, "answer": got})
        text = normalise(bot.ask(sample["image"], "Describe the picture.", max_tokens=40))
        main_object = sample["objects"][0]
        has_colour, has_shape = main_object["colour"] in text, main_object["shape"] in text
        described["colour"] += has_colour
        described["shape"] += has_shape
        described["both"] += has_colour and has_shape
    vqa_seconds = time.perf_counter() - started
    every = [x for xs in right.values() for x in xs]
    vqa = {"accuracy": sum(every) / len(every), "questions": len(every)}
    vqa |= {f"accuracy_{k}": sum(v) / len(v) for k, v in sorted(right.items())}
    describe = {k: v / len(data) for k, v in described.items()}

    base = duomo.load(args.base)
    tuned = ChatPipeline(bot.lm, bot.tokenizer, bot.device, "tuned LM")  # the LM with its adapters, no system
    questions = [q for q in Path(args.questions).read_text().splitlines() if q.strip()]
    same, same_first, pairs = 0, 0, []
    for q in questions:
        messages = [{"role": "user", "content": q}]
        a = base.chat(messages, settings=DecodeSettings(max_tokens=48)).text.strip()
        b = tuned.chat(messages, settings=DecodeSettings(max_tokens=48)).text.strip()
        same += a == b
        same_first += first_sentence(a) == first_sentence(b)
        pairs.append({"question": q, "base": a, "tuned": b})
    general = {"questions": len(questions), "identical": same / len(questions),
               "identical_first_sentence": same_first / len(questions)}  # fmt: skip
    result = {"model": args.model, "heldout_vqa": vqa, "describe": describe, "general": general,
              "vqa_seconds": round(vqa_seconds, 1), "examples": examples,
              "plain_answers": pairs[:10]}  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k not in ("plain_answers",)}, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": machine(), **result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
