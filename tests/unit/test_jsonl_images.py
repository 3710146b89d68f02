"""JSONL tasks with images: every way a row names an image, every refusal with its message, prompt identity, and
the visual_digits export read back as the built-in task (pure: tmp files only)."""

from __future__ import annotations

import base64
import importlib.util
import io
import itertools
import json
from pathlib import Path

import pytest
from PIL import Image

from opd import tasks
from opd.config import load_config
from opd.config.images import ImagesConfig
from opd.config.task import JsonlTask, VisualDigitsTask, vlm_build_task

REPO = Path(__file__).resolve().parents[2]
Q = tasks.IMAGE_TOKEN + "What number?"


def _png(size=(8, 8), level=0) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, level).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(level=128) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (level, 0, 0)).save(buf, format="JPEG")
    return buf.getvalue()


def _uri(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _load(tmp_path: Path, *rows, images: ImagesConfig | None = None, name="t.jsonl") -> list[tasks.Problem]:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return tasks.read_jsonl_problems(path, images)


def _refused(tmp_path: Path, *rows, images: ImagesConfig | None = None) -> str:
    with pytest.raises(ValueError) as err:
        _load(tmp_path, *rows, images=images)
    return str(err.value)


# ---------------------------------------------------------------------------------------- image sources
def test_paths_relative_to_the_jsonl_file_and_absolute_keep_the_bytes_as_given(tmp_path):
    (tmp_path / "img").mkdir()
    a, b = _png(level=10), _jpeg()
    (tmp_path / "img" / "a.png").write_bytes(a)
    (tmp_path / "b.jpg").write_bytes(b)
    (p,) = _load(
        tmp_path,
        {"prompt": "<image> and <image>?", "images": ["img/a.png", str(tmp_path / "b.jpg")], "answer": "2"},
    )
    assert p.images == (a, b)  # exactly the file bytes: not decoded, not re-encoded
    assert p.prompt == "<image> and <image>?" and p.answer == "2" and p.messages == ()
    assert "images" not in p.metadata


def test_data_uris_and_bare_base64_of_png_and_jpeg(tmp_path):
    png, jpg = _png(level=3), _jpeg(9)
    rows = [
        {"prompt": Q, "images": [_uri(png)]},
        {"prompt": Q, "images": [_uri(jpg, "image/jpeg")]},
        {"prompt": Q, "images": [base64.b64encode(png).decode()]},
        {"prompt": Q, "images": [base64.encodebytes(jpg).decode()]},  # wrapped at 76 characters
    ]
    assert [p.images for p in _load(tmp_path, *rows)] == [(png,), (jpg,), (png,), (jpg,)]


def test_chat_content_parts_become_text_with_a_placeholder_at_each_image(tmp_path):
    one, two, three = _png(level=1), _png(level=2), _jpeg(3)
    (tmp_path / "one.png").write_bytes(one)
    (tmp_path / "three.jpg").write_bytes(three)
    row = {
        "messages": [
            {"role": "system", "content": "Read digits."},
            {
                "role": "user",
                "content": [{"type": "image", "image": "one.png"}, {"type": "text", "text": "This?"}],
            },
            {"role": "assistant", "content": "1"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "And "},
                    {"type": "image_url", "image_url": {"url": _uri(two)}},
                    {"type": "text", "text": " vs "},
                    {"type": "image_url", "image_url": {"url": "three.jpg", "detail": "low"}},
                ],
            },
        ],
        "answer": "2",
    }
    (p,) = _load(tmp_path, row)
    assert p.messages == (
        ("system", "Read digits."),
        ("user", "<image>This?"),
        ("assistant", "1"),
        ("user", "And <image> vs <image>"),
    )
    assert p.prompt == "And <image> vs <image>"  # the last user turn, as for text chats
    assert p.images == (one, two, three)  # in order over the whole conversation


def test_string_contents_with_placeholders_take_the_images_list(tmp_path):
    a = _png(level=4)
    (tmp_path / "a.png").write_bytes(a)
    row = {"messages": [{"role": "user", "content": Q}], "images": ["a.png"], "answer": "0"}
    (p,) = _load(tmp_path, row)
    assert p.images == (a,) and p.messages == (("user", Q),)


def test_hf_style_image_parts_with_url_or_path(tmp_path):
    a = _png(level=5)
    (tmp_path / "a.png").write_bytes(a)
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image", "path": "a.png"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "url": _uri(a)}]}]},
    ]
    assert [p.images for p in _load(tmp_path, *rows)] == [(a,), (a,)]


# ------------------------------------------------------------------------------------------- refusals
def test_images_without_placeholders_are_refused_with_how_to_write_them(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    msg = _refused(tmp_path, {"prompt": "What number?", "images": ["a.png"]})
    assert f"{tmp_path / 't.jsonl'}:1" in msg
    assert "'prompt' holds '<image>' 0 time(s) but the row has 1 image(s)" in msg
    assert '"<image>What number?"' in msg  # the shape to write


def test_a_placeholder_without_an_image_is_refused(tmp_path):
    msg = _refused(tmp_path, {"prompt": "ok"}, {"messages": [{"role": "user", "content": "see <image>"}]})
    assert ":2:" in msg and "'messages' holds '<image>' 1 time(s) but the row has no images" in msg
    assert "add the images" in msg


def test_urls_are_refused_nothing_is_downloaded(tmp_path):
    for row in (
        {"prompt": Q, "images": ["https://example.com/a.png"]},
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}
            ]
        },
    ):
        msg = _refused(tmp_path, row)
        assert "is a URL; nothing is downloaded at run time" in msg and "data:image/png;base64" in msg
    assert "messages[0].content[0].image_url.url ('http://x/a.png')" in msg and msg.count("t.jsonl:") == 1


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("missing.png", "images[0] ('missing.png') does not exist: looked for"),
        ("sub", "images[0] ('sub') is a directory"),
        ("notes.txt", "is not a PNG or JPEG image (starts with b'hello wo'"),
        ("cut.png", "image does not decode"),
        ("big.png", "image of 300x300 = 90000 pixels exceeds the limit of 10000 (images.max_pixels)"),
        (_uri(b"GIF89a....", "image/gif"), "declares image/gif; only PNG and JPEG images are taken"),
        (_uri(_jpeg(), "image/png"), "declares image/png but its bytes are jpeg"),
        ("data:image/png,rawbytes", "is not base64-encoded"),
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("iVBORw0KGgo" + "A" * 300 + "!", "does not exist"),  # broken base64 is no image
        (7, "images[0] must be a non-empty string (got int)"),
    ],
)
def test_each_bad_image_is_refused_naming_the_line_the_image_and_why(tmp_path, image, expected):
    (tmp_path / "sub").mkdir()
    (tmp_path / "notes.txt").write_bytes(b"hello world")
    (tmp_path / "cut.png").write_bytes(_png((64, 64), 200)[:40])
    (tmp_path / "big.png").write_bytes(_png((300, 300)))
    msg = _refused(
        tmp_path, {"prompt": "x"}, {"prompt": Q, "images": [image]}, images=ImagesConfig(max_pixels=10_000)
    )
    assert f"{tmp_path / 't.jsonl'}:2: " in msg and expected in msg


def test_more_images_than_max_per_prompt_are_refused_before_reading(tmp_path):
    row = {"prompt": Q * 3, "images": ["a.png", "b.png", "c.png"]}  # none exists: counted first
    msg = _refused(tmp_path, row, images=ImagesConfig(max_per_prompt=2))
    assert "the row has 3 images, more than images.max_per_prompt (2)" in msg


def test_malformed_parts_and_rows_are_refused(tmp_path):
    img = {"type": "image", "image": _uri(_png())}
    cases = [
        ([{"type": "text", "text": "a <image> b"}], "messages[0].content[0].text holds '<image>'"),
        ([{"type": "audio", "audio": "x.wav"}], "messages[0].content[0] must be one of"),
        ([{"type": "image", "image": "a.png", "url": "b.png"}], "messages[0].content[0] must be one of"),
        (
            [{"type": "image_url", "image_url": {"href": "a.png"}}],
            'messages[0].content[0].image_url must be {"url": <image>}',
        ),
        ([], "messages[0].content must be a string or a non-empty list of content parts"),
    ]
    for content, expected in cases:
        msg = _refused(tmp_path, {"messages": [{"role": "user", "content": content}]})
        assert expected in msg, msg
    both = {"messages": [{"role": "user", "content": [img]}], "images": [_uri(_png())]}
    assert "images given both in 'images' and as content parts" in _refused(tmp_path, both)
    assert "'images' must be a list" in _refused(tmp_path, {"prompt": Q, "images": "a.png"})


def test_task_problems_names_the_config_field_of_the_file_with_a_bad_image(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "fine"}) + "\n")
    (tmp_path / "eval.jsonl").write_text(
        json.dumps({"prompt": Q, "images": ["gone.png"], "answer": "1"}) + "\n"
    )
    task = JsonlTask(train_path=tmp_path / "train.jsonl", eval_path=tmp_path / "eval.jsonl")
    ((field, msg),) = tasks.task_problems(task)
    assert field == "task.eval_path" and "eval.jsonl:1: images[0] ('gone.png') does not exist" in msg
    # the images section's limits reach the loader through the streams and the held-out set too
    (tmp_path / "eval.jsonl").write_text(
        json.dumps({"prompt": Q, "images": [_uri(_png((50, 50)))], "answer": "1"})
    )
    assert tasks.eval_set(task)[0].images
    with pytest.raises(ValueError, match="exceeds the limit of 100"):
        tasks.eval_set(task, ImagesConfig(max_pixels=100))
    train = JsonlTask(train_path=tmp_path / "eval.jsonl")
    with pytest.raises(ValueError, match="exceeds the limit of 100"):
        next(tasks.training_stream(train, 0, ImagesConfig(max_pixels=100)))


# ------------------------------------------------------------------------------------------- identity
def test_prompt_ids_cover_the_images(tmp_path):
    a, b = _uri(_png(level=1)), _uri(_png(level=2))
    rows = [
        {"prompt": Q, "images": [a]},
        {"prompt": Q, "images": [b]},
        {"id": "q", "prompt": Q, "images": [a]},
        {"id": "q", "prompt": Q, "images": [b]},
        {
            "id": "q",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": a}, {"type": "text", "text": "What number?"}],
                }
            ],
        },
        {"id": "plain", "prompt": "What number?"},
        {"prompt": "What number?"},
    ]
    p = _load(tmp_path, *rows)
    key_a = tasks.images_key([tasks.ImageBlob.of(p[0].images[0])])
    assert p[0].prompt_id == f"t.jsonl:1#img:{key_a}" and p[1].prompt_id.startswith("t.jsonl:2#img:")
    assert p[2].prompt_id == f"q#img:{key_a}" and p[3].prompt_id != p[2].prompt_id  # same id, other image
    assert p[4].prompt_id == p[2].prompt_id  # the same id, text and image written as a chat part
    assert [p[5].prompt_id, p[6].prompt_id] == ["plain", "t.jsonl:7"]  # text rows as before
    # the order of the images is part of it
    two = _load(tmp_path, {"prompt": Q * 2, "images": [a, b]}, {"prompt": Q * 2, "images": [b, a]})
    assert two[0].prompt_id.split("#")[1] != two[1].prompt_id.split("#")[1]


def test_an_id_too_long_for_the_image_suffix_is_refused(tmp_path):
    msg = _refused(tmp_path, {"id": "x" * 4090, "prompt": Q, "images": [_uri(_png())]})
    assert (
        "'id' must be 1 to 4075 printable characters" in msg and "'#img:' and 16 hex digits appended" in msg
    )


# ------------------------------------------------------------------------------------ the export script
def _export_module():
    spec = importlib.util.spec_from_file_location(
        "make_visual_jsonl", REPO / "scripts" / "make_visual_jsonl.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_export_loads_as_the_built_in_visual_task(tmp_path):
    task = VisualDigitsTask(eval_size=9)
    _export_module().export(tmp_path, train_size=10, seed=3, task=task)
    train = tasks.read_jsonl_problems(tmp_path / "train.jsonl")
    built_in = list(itertools.islice(tasks.visual_digits_stream(task, 3), 10))
    for got, want in (
        (train, built_in),
        (tasks.read_jsonl_problems(tmp_path / "eval.jsonl"), tasks.visual_digits_eval_set(task)),
    ):
        assert [(p.prompt, p.images, p.answer) for p in got] == [(p.prompt, p.images, p.answer) for p in want]
        assert [p.prompt_id.split("#img:")[0] for p in got] == [p.prompt_id for p in want]
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert {("messages" in r, json.dumps(r).count("data:image/png")) for r in rows} == {
        (False, 0),
        (True, 0),
        (True, 1),
    }
    assert all(len(p.images[0]) > 50 for p in train) and len(list((tmp_path / "images").iterdir())) >= 7
    # the shipped config points at what the export writes, and its tiny VLMs are the visual_digits task's
    cfg = load_config(
        REPO / "configs" / "tiny_vlm_jsonl.yaml",
        [f"task.train_path={tmp_path / 'train.jsonl'}", f"task.eval_path={tmp_path / 'eval.jsonl'}"],
    )
    assert tasks.task_problems(cfg.task, cfg.images) == []
    assert vlm_build_task(cfg.task) == VisualDigitsTask()


def test_tiny_vlms_take_a_jsonl_task_but_no_other_text_task(tmp_path):
    vlm = {"student": {"kind": "tiny_vlm"}, "teacher": {"kind": "tiny_vlm"}}
    from opd.config import Config

    cfg = Config.model_validate({"task": {"kind": "jsonl", "train_path": "x.jsonl"}, **vlm})
    assert vlm_build_task(cfg.task) == VisualDigitsTask()
    with pytest.raises(
        ValueError, match="tiny_vlm models are built for task.kind: visual_digits \\(or a jsonl task"
    ):
        Config.model_validate({"task": {"kind": "capitals"}, **vlm})
    with pytest.raises(ValueError, match="does not divide the visual_digits task's image_size 32"):
        Config.model_validate(
            {
                "task": {"kind": "jsonl", "train_path": "x.jsonl"},
                "student": {"kind": "tiny_vlm", "patch_size": 5},
                "teacher": {"kind": "tiny_vlm"},
            }
        )


def test_with_the_tiny_vlms_alphabet_text_they_cannot_write_is_refused(tmp_path):
    img = _uri(_png())
    (tmp_path / "ok.jsonl").write_text(json.dumps({"prompt": Q, "images": [img], "answer": "7"}) + "\n")
    ok = JsonlTask(train_path=tmp_path / "ok.jsonl")
    assert tasks.task_problems(ok, alphabet=tasks.VISUAL_ALPHABET) == []
    for row, expected in (
        (
            {"prompt": tasks.IMAGE_TOKEN + "Which digit?", "images": [img]},
            "has characters 'cdgi' the tiny models",
        ),
        ({"prompt": Q, "images": [img], "answer": "seven"}, "characters 'sv'"),
        (
            {
                "messages": [{"role": "system", "content": "Read."}, {"role": "user", "content": Q}],
                "images": [img],
            },
            "is a conversation of 2 turns, and the tiny models have no chat template",
        ),
    ):
        (tmp_path / "bad.jsonl").write_text(json.dumps(row) + "\n")
        bad = JsonlTask(train_path=tmp_path / "bad.jsonl")
        assert tasks.task_problems(bad) == []  # any text goes for other models
        ((field, msg),) = tasks.task_problems(bad, alphabet=tasks.VISUAL_ALPHABET)
        assert field == "task.train_path" and expected in msg, msg
