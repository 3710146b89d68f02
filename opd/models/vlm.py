"""The tiny vision-language models (kind: tiny_vlm): build, SFT on the visual task, greedy evaluation, loading.

A tiny VLM is a LLaVA: a CLIP vision tower, a two-layer projector and a Llama text tower, the architecture
transformers loads with `LlavaForConditionalGeneration` (and `AutoModelForImageTextToText`) and vLLM supports,
scaled down so it trains on a CPU in a minute. It is saved with its processor (`LlavaProcessor`: the character
tokenizer with an `<image>` token, and a PIL-backed CLIP image processor sized to the task's images), so
`AutoProcessor.from_pretrained(dir)` gives every component the same ids and pixel values with no download.

How a caller feeds it: `processor(images=[PIL images], text=[prompt with one IMAGE_TOKEN per image])` returns
`input_ids` with each `<image>` expanded to `image_tokens()` copies of `image_token_id`, BOS first, and
`pixel_values` (images, 3, image_size, image_size) float32; the model's forward takes both (`pixel_values` only
while the image ids are in `input_ids`: the prefill). `model_inputs` does that from a Problem's PNG bytes.
"""

from __future__ import annotations

import io
import json
import random
import time
from pathlib import Path

import torch
from transformers import (
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from opd import tasks
from opd.config import Config, TinyVlmModel
from opd.config.task import vlm_build_task
from opd.models.loading import build_char_tokenizer, sft_optimizer
from opd.models.vision import Vision, attach_vision
from opd.models.vocab import set_never_sampled, set_real_vocab
from opd.runtime.progress import progress

VLM_FORMAT = 1  # bump when the tiny VLM's build recipe changes, so stale caches are rebuilt
HABIT = "="  # sft_suffix_noise's spurious trailing token, as the text models' (opd.models.builds.HABIT)
# CLIP's vision tower prepends a CLS feature; "default" feature selection drops it, so the processor counts it
# here and takes it off again: one image id per patch.
_CLS_FEATURES = 1
_FEATURES = "default"


def build_vlm_tokenizer():
    """The character tokenizer of the visual task's characters (tasks.VISUAL_ALPHABET) with IMAGE_TOKEN added as
    one special token (never split into characters, dropped by skip_special_tokens)."""
    tok = build_char_tokenizer(tasks.VISUAL_ALPHABET)
    tok.add_tokens([tasks.IMAGE_TOKEN], special_tokens=True)
    return tok


def build_processor(tokenizer, image_size: int, patch_size: int) -> LlavaProcessor:
    """The processor every component uses: images resized and cropped to image_size (a no-op for the visual task's
    own images), made RGB (grayscale PNGs repeat their channel), scaled to [-1, 1]; each IMAGE_TOKEN of the text
    expanded to (image_size / patch_size)^2 image ids. The PIL backend, so pixel values do not depend on whether
    torchvision is installed."""
    images = CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": image_size},
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_convert_rgb=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=_FEATURES,
        image_token=tasks.IMAGE_TOKEN,
        num_additional_image_tokens=_CLS_FEATURES,
    )


def image_tokens(image_size: int, patch_size: int) -> int:
    """Image ids per image in a prompt: one per patch."""
    return (image_size // patch_size) ** 2


def build_model(spec: TinyVlmModel, tokenizer, image_size: int) -> LlavaForConditionalGeneration:
    """A randomly initialised tiny LLaVA for `spec` (seeded by the caller)."""
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden_size,
        num_channels=3,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=image_tokens(image_size, spec.patch_size) + 64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(tasks.IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy=_FEATURES,
        tie_word_embeddings=False,
    )
    return LlavaForConditionalGeneration(config)


def decode_images(problem: tasks.Problem) -> list:
    """The problem's images as PIL images (decoded from their PNG/JPEG bytes)."""
    from PIL import Image

    out = []
    for data in problem.images:
        img = Image.open(io.BytesIO(data))
        img.load()
        out.append(img)
    return out


def model_inputs(processor, problems: list[tasks.Problem], padding_side: str = "right"):
    """The processor's batch for `problems`: input_ids (with BOS and expanded image ids) and attention_mask,
    padded on `padding_side`, and pixel_values of every image in order."""
    images = [img for p in problems for img in decode_images(p)]
    return processor(
        images=images or None,
        text=[p.prompt for p in problems],
        padding="longest",
        padding_side=padding_side,
        return_tensors="pt",
    )


def prompt_ids(processor, problem: tasks.Problem) -> list[int]:
    """The prompt's token ids as the model reads them: BOS, then the text with each IMAGE_TOKEN expanded to one
    image id per patch (what a trajectory's prompt ids should be, so the learner and teachers need no expansion)."""
    return model_inputs(processor, [problem])["input_ids"][0].tolist()


def pixel_values(processor, problem: tasks.Problem) -> torch.Tensor:
    """The problem's images as the vision tower takes them: (images, 3, image_size, image_size) float32."""
    return processor.image_processor(decode_images(problem), return_tensors="pt")["pixel_values"]


def _sft_batch(processor, problems: list[tasks.Problem], targets: list[str]):
    """(input_ids, attention_mask, labels, pixel_values): each prompt then its target and EOS, loss on the target."""
    enc = model_inputs(processor, problems)
    tok = processor.tokenizer
    lengths = enc["attention_mask"].sum(-1).tolist()
    answers = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in targets]
    width = max(n + len(a) for n, a in zip(lengths, answers, strict=True))
    ids = torch.full((len(problems), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, (n, a) in enumerate(zip(lengths, answers, strict=True)):
        ids[i, :n] = enc["input_ids"][i, :n]
        ids[i, n : n + len(a)] = torch.tensor(a)
        labels[i, n : n + len(a)] = torch.tensor(a)
    mask = torch.zeros_like(ids)
    for i, (n, a) in enumerate(zip(lengths, answers, strict=True)):
        mask[i, : n + len(a)] = 1
    return ids, mask, labels, enc["pixel_values"]


def sft(model, processor, spec: TinyVlmModel, task, bar) -> None:
    """Teacher-forced cross-entropy on the answer tokens of fresh training images (images through the processor,
    the vision tower trained too); `bar` advances per step."""
    stream = tasks.training_stream(task, seed=spec.seed + 1)
    opt, sched = sft_optimizer(model, spec.sft_lr, spec.sft_steps)
    noise = random.Random(spec.seed + 2)
    model.train()
    for _ in range(spec.sft_steps):
        problems = [next(stream) for _ in range(spec.sft_batch_size)]
        targets = [p.answer + (HABIT if noise.random() < spec.sft_suffix_noise else "") for p in problems]
        ids, mask, labels, pixels = _sft_batch(processor, problems, targets)
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.advance()


@torch.no_grad()
def greedy_answers(model, processor, problems: list[tasks.Problem], max_new_tokens: int) -> list[str]:
    """Each problem's greedy completion as text (special tokens dropped): prompts left-padded, images in."""
    enc = model_inputs(processor, problems, padding_side="left")
    tok = processor.tokenizer
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    width = enc["input_ids"].shape[1]
    return [tok.decode(row[width:], skip_special_tokens=True) for row in out.tolist()]


def accuracy(
    model, processor, problems, max_new_tokens: int, mode: str = "exact", batch: int = 100, bar=None
):
    """Greedy held-out accuracy (the share of problems whose completion verifies under `mode`)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(problems), batch):
        chunk = problems[i : i + batch]
        answers = greedy_answers(model, processor, chunk, max_new_tokens)
        correct += sum(tasks.verify(p.answer, a, mode) for p, a in zip(chunk, answers, strict=True))
        if bar is not None:
            bar.advance(len(chunk))
    model.train(was_training)
    return correct / len(problems) if problems else float("nan")


def recipe(role: str, spec: TinyVlmModel, cfg: Config) -> list:
    """Everything that shapes a built tiny VLM; its digest names the model in the cache."""
    task = vlm_build_task(cfg.task)  # a JSONL task's tiny VLMs are the visual_digits task's
    return [VLM_FORMAT, role, spec.recipe_fields(), task.model_dump(), cfg.sampling.max_new_tokens]


def build_into(tmp: Path, role: str, spec: TinyVlmModel, cfg: Config, log) -> None:
    """Build, SFT, evaluate and save a tiny VLM (model, processor and tokenizer, and `opd_asset.json` with its
    held-out accuracy and recipe) into `tmp`. The caller fixes threads and deterministic kernels."""
    task = vlm_build_task(cfg.task)
    tokenizer = build_vlm_tokenizer()
    processor = build_processor(tokenizer, task.image_size, spec.patch_size)
    torch.manual_seed(spec.seed)
    model = build_model(spec, tokenizer, task.image_size)
    t0 = time.time()
    with progress(f"building the {role} (VLM SFT)", spec.sft_steps, "steps", log) as bar:
        sft(model, processor, spec, task, bar)
    train_s = time.time() - t0
    problems = tasks.eval_set(task)
    with progress(f"evaluating the {role}", len(problems), "problems", log) as bar:
        acc = accuracy(model, processor, problems, cfg.sampling.max_new_tokens, "exact", bar=bar)
    params = sum(p.numel() for p in model.parameters())
    log(
        f"  built {role} VLM: {params} parameters, {spec.sft_steps} SFT steps in {train_s:.0f}s, held-out "
        f"accuracy {acc:.3f}"
    )
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    meta = {
        "eval_accuracy": acc,
        "spec": spec.recipe_fields(),
        "image_tokens": image_tokens(task.image_size, spec.patch_size),
    }
    (tmp / "opd_asset.json").write_text(json.dumps(meta))


def is_vlm_dir(path: str | Path) -> bool:
    """Whether a saved model directory holds a LLaVA (a tiny VLM) rather than a text-only causal LM."""
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "llava"


def load_vlm(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, processor) of a saved tiny VLM, offline; the model's real vocabulary set as for text models
    (opd.models.vocab), so distributions cover the tokenizer's ids only."""
    processor = AutoProcessor.from_pretrained(str(path))
    model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype).to(device)
    set_real_vocab(model, processor.tokenizer)
    set_never_sampled(model, [model.config.image_token_id])  # a response never holds an image slot
    attach_vision(model, Vision(processor, int(model.config.image_token_id)))
    return model, processor
