"""Random LoRAs and textual-inversion embeddings for a model on disk, made offline with peft and
saved the way diffusers' training scripts save them (`save_lora_weights`, safetensors).

A LoRA's B matrices are random, not zero (peft's init_lora_weights=False), so it changes what
the model does; the same model, seed and rank give the same file.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Layers the LoRAs change: attention projections, as diffusers' LoRA training scripts target.
DENOISER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def make_lora(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    rank: int = 4,
    text_encoders: bool = True,
    weight_name: str = "pytorch_lora_weights.safetensors",
) -> Path:
    """A LoRA for the diffusers pipeline in `model_dir` (its UNet or transformer, and its CLIP
    text encoders when `text_encoders`), saved as `out_dir/weight_name`."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(str(model_dir))
    torch.manual_seed(seed)
    layers = {}
    for name in pipe._lora_loadable_modules:
        network = getattr(pipe, name, None)
        if network is None:
            continue
        if name.startswith("text_encoder"):
            if not text_encoders or "CLIP" not in type(network).__name__:
                continue
            targets = CLIP_TARGETS
        else:
            targets = DENOISER_TARGETS
        network.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False))
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(network))
    out = Path(out_dir)
    type(pipe).save_lora_weights(str(out), weight_name=weight_name, **layers)
    return out / weight_name


def make_embedding(model_dir: str | Path, out_file: str | Path, token: str, *, vectors: int = 1, seed: int = 0) -> Path:
    """A textual-inversion embedding for the model's first text encoder, in diffusers' format
    (one tensor named by its token), `vectors` rows wide."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(Path(model_dir) / "text_encoder"))
    generator = torch.Generator("cpu").manual_seed(seed)
    embedding = torch.randn(vectors, config.hidden_size, generator=generator)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({token: embedding}, str(out))
    return out
