"""Write the built-in visual_digits task as JSONL files with PNG images, for a JSONL task (offline, no download).

    python scripts/make_visual_jsonl.py OUT_DIR [--train-size 2000] [--seed 0]

writes OUT_DIR/train.jsonl (training images, from the task's training stream), OUT_DIR/eval.jsonl (its held-out
set, each with its answer) and the PNG files under OUT_DIR/images/ (named by their sha256, each written once),
referenced by paths relative to the JSONL files. The rows take the three forms a JSONL task reads, in turn:

    {"id": ..., "prompt": "<image>What number?", "images": ["images/<sha>.png"], "answer": "7"}
    {"id": ..., "messages": [{"role": "user", "content": [{"type": "image", "image": "images/<sha>.png"},
                                                          {"type": "text", "text": "What number?"}]}], "answer": ...}
    {"id": ..., "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ...}},
                                                          {"type": "text", "text": "What number?"}]}], ...}

the last with the image's path, or (every fourth row) the PNG inline as a data:image/png;base64,... URI.

Each loads as the built-in problem: the same prompt text, the same PNG bytes and answer (configs/tiny_vlm_jsonl.yaml
distils them with the tiny VLMs, which are built on the default visual_digits task, the one written here).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
from pathlib import Path

from opd import tasks
from opd.config.task import VisualDigitsTask

IMAGES_DIR = "images"
FORMS = ("prompt", "image_part", "image_url_part", "data_uri")  # the row forms, used in turn


def _row(problem: tasks.Problem, form: str, image_path: str) -> dict:
    """One JSONL row of a built-in problem in `form`; the question is the text after the image placeholder."""
    question = problem.prompt.removeprefix(tasks.IMAGE_TOKEN)
    if form == "prompt":
        body: dict = {"prompt": problem.prompt, "images": [image_path]}
    else:
        if form == "image_part":
            image = {"type": "image", "image": image_path}
        elif form == "image_url_part":
            image = {"type": "image_url", "image_url": {"url": image_path}}
        else:  # the image inline, as OpenAI-style data sets carry it
            inline = "data:image/png;base64," + base64.b64encode(problem.images[0]).decode()
            image = {"type": "image_url", "image_url": {"url": inline}}
        content = [image, {"type": "text", "text": question}]
        body = {"messages": [{"role": "user", "content": content}]}
    return {"id": problem.prompt_id, **body, "answer": problem.answer}


def _write(path: Path, problems: list[tasks.Problem], out_dir: Path) -> None:
    """`problems` as rows of `path`, their images under out_dir/images/ (a file per distinct image)."""
    lines = []
    for form, problem in zip(itertools.cycle(FORMS), problems):
        (data,) = problem.images  # one image per visual_digits prompt
        name = f"{IMAGES_DIR}/{hashlib.sha256(data).hexdigest()[:24]}.png"
        image = out_dir / name
        if form != "data_uri" and not image.exists():
            image.write_bytes(data)
        lines.append(json.dumps(_row(problem, form, name)))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def export(out_dir: Path, train_size: int, seed: int, task: VisualDigitsTask | None = None) -> None:
    """Write train.jsonl (the first `train_size` problems of the training stream of `seed`), eval.jsonl (the
    held-out set) and their images into `out_dir`."""
    task = task or VisualDigitsTask()
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    train = list(itertools.islice(tasks.visual_digits_stream(task, seed), train_size))
    _write(out_dir / "train.jsonl", train, out_dir)
    _write(out_dir / "eval.jsonl", tasks.visual_digits_eval_set(task), out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="where train.jsonl, eval.jsonl and images/ are written")
    parser.add_argument("--train-size", type=int, default=2000, help="training rows (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training stream (default 0)")
    args = parser.parse_args(argv)
    if args.train_size < 1:
        parser.error("--train-size must be at least 1")
    export(args.out_dir, args.train_size, args.seed)
    print(f"wrote {args.out_dir}/train.jsonl, eval.jsonl and {IMAGES_DIR}/")


if __name__ == "__main__":
    main()
