"""Build randomly initialised SD 1.x, SDXL, Kolors, SD3 and Flux pipelines offline and save them with `save_pretrained`.

Configs mirror diffusers' own test components ("tiny") or scale them up for benchmarks ("medium"); latent
channel counts are always the real ones. Same family, size and seed give byte-identical safetensors.
Run as `baton dev tiny-models DIR` or `python -m services.devkit.tiny_models DIR`.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sentencepiece
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    KolorsPipeline,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer
from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, RMSNorm
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from services.common.errors import InvalidArgument
from services.devkit.tiny_tokenizers import CORPUS, clip_tokenizer, t5_tokenizer

SIZES = ("tiny", "medium")
T = TypeVar("T")

# Each family draws from its own seed range so that, say, sd1 and sdxl never share weights.
_SEED_BASE = {"sd1": 0, "sdxl": 1000, "sd3": 2000, "flux": 3000, "kolors": 4000}


@dataclass(frozen=True)
class ClipShape:
    hidden: int
    intermediate: int
    heads: int
    layers: int
    projection: int


@dataclass(frozen=True)
class T5Shape:
    d_model: int
    d_ff: int
    d_kv: int
    heads: int
    layers: int
    buckets: int


@dataclass(frozen=True)
class GlmShape:
    hidden: int
    ffn: int
    heads: int
    kv_channels: int
    layers: int
    # ChatGLM3 shares keys and values across groups of heads (multi-query attention).
    groups: int


@dataclass(frozen=True)
class VaeShape:
    # Two blocks downscale by 2 (exposing hard-coded 8s); four by 8, like real VAEs.
    channels: tuple[int, ...]
    layers_per_block: int
    sample_size: int


_CLIP = {"tiny": ClipShape(32, 37, 4, 2, 32), "medium": ClipShape(128, 512, 4, 4, 128)}
# Real SDXL's second encoder (OpenCLIP bigG) is the wider one, projecting at its own width.
_CLIP_WIDE = {"tiny": _CLIP["tiny"], "medium": ClipShape(256, 1024, 4, 4, 256)}
_GLM = {"tiny": GlmShape(32, 37, 4, 8, 2, 2), "medium": GlmShape(256, 512, 8, 32, 4, 2)}
_T5 = {"tiny": T5Shape(32, 37, 8, 4, 2, 8), "medium": T5Shape(256, 512, 32, 8, 4, 32)}
_VAE = {"tiny": VaeShape((32, 64), 1, 64), "medium": VaeShape((32, 64, 128, 128), 2, 512)}


def _seeded(seed: int, make: Callable[[], T]) -> T:
    """Build one component from its own seed, leaving the caller's RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise InvalidArgument(f"unknown size {size!r}; expected one of {', '.join(SIZES)}", field="size")


def _clip_config(tokenizer: CLIPTokenizer, shape: ClipShape) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        num_hidden_layers=shape.layers,
        projection_dim=shape.projection,
        hidden_act="gelu",
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_encoder(tokenizer: T5Tokenizer, size: str, seed: int) -> T5EncoderModel:
    shape = _T5[size]
    config = T5Config(
        d_model=shape.d_model,
        d_ff=shape.d_ff,
        d_kv=shape.d_kv,
        num_heads=shape.heads,
        num_layers=shape.layers,
        relative_attention_num_buckets=shape.buckets,
        feed_forward_proj="gated-gelu",
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _seeded(seed, lambda: T5EncoderModel(config))


def _vae(size: str, seed: int, latent_channels: int, **config: float | bool) -> AutoencoderKL:
    shape = _VAE[size]
    blocks = len(shape.channels)
    return _seeded(
        seed,
        lambda: AutoencoderKL(
            block_out_channels=shape.channels,
            layers_per_block=shape.layers_per_block,
            sample_size=shape.sample_size,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            latent_channels=latent_channels,
            **config,
        ),
    )


def _sd_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )


def _save(pipe, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_sd1(out_dir: Path, *, size: str = "tiny", seed: int = 0) -> Path:
    """A random StableDiffusionPipeline (4 latent channels, one CLIP text encoder) saved into out_dir."""
    _check_size(size)
    base = _SEED_BASE["sd1"] + seed
    tokenizer = clip_tokenizer()
    text_config = _clip_config(tokenizer, _CLIP[size])
    unet_config: dict[str, Any]
    if size == "tiny":
        unet_config = dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8,
        )
    else:
        unet_config = dict(
            block_out_channels=(128, 256, 512),
            layers_per_block=2,
            sample_size=64,
            down_block_types=("CrossAttnDownBlock2D",) * 3,
            up_block_types=("CrossAttnUpBlock2D",) * 3,
            attention_head_dim=8,
        )
    unet = _seeded(
        base,
        lambda: UNet2DConditionModel(
            **unet_config, in_channels=4, out_channels=4, cross_attention_dim=text_config.hidden_size
        ),
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(size, base + 1, latent_channels=4),
        text_encoder=_seeded(base + 2, lambda: CLIPTextModel(text_config)),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _save(pipe, out_dir)


def _sdxl_unet(size: str) -> dict[str, Any]:
    """The SDXL-shaped UNet's config (SDXL, Kolors) without its conditioning widths."""
    if size == "tiny":
        return dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            addition_time_embed_dim=8,
        )
    return dict(
        block_out_channels=(64, 128, 256),
        layers_per_block=2,
        sample_size=64,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 8),
        transformer_layers_per_block=(1, 2, 2),
        addition_time_embed_dim=32,
    )


def build_sdxl(out_dir: Path, *, size: str = "tiny", seed: int = 0) -> Path:
    """A random StableDiffusionXLPipeline (two CLIP encoders, text_time conditioning) saved into out_dir."""
    _check_size(size)
    base = _SEED_BASE["sdxl"] + seed
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    text_config, text_config_2 = _clip_config(tokenizer, _CLIP[size]), _clip_config(tokenizer_2, _CLIP_WIDE[size])
    unet_config = _sdxl_unet(size)
    # Six time ids (original size, crop, target size), each embedded, plus the pooled text embedding.
    add_embed_dim = 6 * unet_config["addition_time_embed_dim"] + text_config_2.projection_dim
    unet = _seeded(
        base,
        lambda: UNet2DConditionModel(
            **unet_config,
            in_channels=4,
            out_channels=4,
            use_linear_projection=True,
            addition_embed_type="text_time",
            projection_class_embeddings_input_dim=add_embed_dim,
            cross_attention_dim=text_config.hidden_size + text_config_2.hidden_size,
        ),
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(size, base + 1, latent_channels=4, scaling_factor=0.13025),
        text_encoder=_seeded(base + 2, lambda: CLIPTextModel(text_config)),
        text_encoder_2=_seeded(base + 3, lambda: CLIPTextModelWithProjection(text_config_2)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_sd_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return _save(pipe, out_dir)


def _chatglm_tokenizer(folder: Path, vocab: int = 300) -> ChatGLMTokenizer:
    """ChatGLM's tokenizer over a BPE sentencepiece model learnt from the prompt corpus, written to
    folder/tokenizer.model (the same bytes in every process: one thread, no sampling)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.strip().splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab,
        num_threads=1,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    # The tokenizer reads its model from a file, and save_pretrained copies that file: it is written
    # where the saved pipeline keeps it.
    path = folder / ChatGLMTokenizer.vocab_files_names["vocab_file"]
    path.write_bytes(model.getvalue())
    return ChatGLMTokenizer(vocab_file=str(path))


def _chatglm(tokenizer: ChatGLMTokenizer, size: str, seed: int) -> ChatGLMModel:
    shape = _GLM[size]
    config = ChatGLMConfig(
        num_layers=shape.layers,
        # The tokenizer numbers its special tokens ([gMASK], sop, ...) after the sentencepiece pieces.
        padded_vocab_size=tokenizer.vocab_size,
        hidden_size=shape.hidden,
        ffn_hidden_size=shape.ffn,
        kv_channels=shape.kv_channels,
        num_attention_heads=shape.heads,
        # Rotary positions for Kolors' 256-token prompts.
        seq_length=256,
        multi_query_attention=True,
        multi_query_group_num=shape.groups,
        add_qkv_bias=True,
        original_rope=True,
        use_cache=False,
    )

    def make() -> ChatGLMModel:
        model = ChatGLMModel(config, empty_init=False)
        # RMSNorm leaves its weight uninitialised (torch.empty): set it as a fresh norm would be.
        for module in model.modules():
            if isinstance(module, RMSNorm):
                torch.nn.init.ones_(module.weight)
        return model

    return _seeded(seed, make)


def build_kolors(out_dir: Path, *, size: str = "tiny", seed: int = 0) -> Path:
    """A random KolorsPipeline (ChatGLM text encoder, SDXL-shaped UNet, SDXL's VAE) saved into out_dir."""
    _check_size(size)
    base = _SEED_BASE["kolors"] + seed
    tokenizer = _chatglm_tokenizer(Path(out_dir) / "tokenizer")
    text_encoder = _chatglm(tokenizer, size, base + 2)
    glm_hidden = _GLM[size].hidden
    unet_config = {**_sdxl_unet(size), "cross_attention_dim": 64 if size == "tiny" else 384}
    # As real Kolors (4096 -> 2048, 5632 = 4096 + 6 * 256): the UNet projects ChatGLM's hidden states to its
    # cross-attention width, and conditions on six time ids plus the pooled (last-token) state.
    add_embed_dim = 6 * unet_config["addition_time_embed_dim"] + glm_hidden
    unet = _seeded(
        base,
        lambda: UNet2DConditionModel(
            **unet_config,
            in_channels=4,
            out_channels=4,
            use_linear_projection=True,
            addition_embed_type="text_time",
            projection_class_embeddings_input_dim=add_embed_dim,
            encoder_hid_dim_type="text_proj",
            encoder_hid_dim=glm_hidden,
        ),
    )
    # Kwai-Kolors' scheduler: SDXL's Euler with 1100 training steps and a higher beta_end.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1100,
        beta_start=0.00085,
        beta_end=0.014,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = KolorsPipeline(
        vae=_vae(size, base + 1, latent_channels=4, scaling_factor=0.13025),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=False,
    )
    return _save(pipe, out_dir)


def build_sd3(out_dir: Path, *, size: str = "tiny", seed: int = 0) -> Path:
    """A random StableDiffusion3Pipeline (MMDiT, two CLIP encoders and T5) saved into out_dir."""
    _check_size(size)
    base = _SEED_BASE["sd3"] + seed
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(pad_token="!"), t5_tokenizer()
    text_config, text_config_2 = _clip_config(tokenizer, _CLIP[size]), _clip_config(tokenizer_2, _CLIP[size])
    text_encoder_3 = _t5_encoder(tokenizer_3, size, base + 4)
    transformer_config: dict[str, Any]
    if size == "tiny":
        transformer_config = dict(sample_size=32, num_layers=1, attention_head_dim=8, num_attention_heads=4)
    else:
        transformer_config = dict(sample_size=64, num_layers=6, attention_head_dim=32, num_attention_heads=8)
    inner_dim = transformer_config["attention_head_dim"] * transformer_config["num_attention_heads"]
    transformer = _seeded(
        base,
        lambda: SD3Transformer2DModel(
            **transformer_config,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            caption_projection_dim=inner_dim,
            # The pipeline pads (or crops) the CLIP hidden states to T5's width and joins them.
            joint_attention_dim=text_encoder_3.config.d_model,
            pooled_projection_dim=2 * _CLIP[size].projection,
        ),
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(
            size,
            base + 1,
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5305,
        ),
        text_encoder=_seeded(base + 2, lambda: CLIPTextModelWithProjection(text_config)),
        tokenizer=tokenizer,
        text_encoder_2=_seeded(base + 3, lambda: CLIPTextModelWithProjection(text_config_2)),
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    return _save(pipe, out_dir)


def build_flux(out_dir: Path, *, size: str = "tiny", seed: int = 0) -> Path:
    """A random FluxPipeline (guidance-distilled MMDiT, CLIP and T5) saved into out_dir."""
    _check_size(size)
    base = _SEED_BASE["flux"] + seed
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    text_config = _clip_config(tokenizer, _CLIP[size])
    text_encoder_2 = _t5_encoder(tokenizer_2, size, base + 3)
    transformer_config: dict[str, Any]
    if size == "tiny":
        transformer_config = dict(
            num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 4, 8)
        )
    else:
        transformer_config = dict(
            num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=8, axes_dims_rope=(8, 12, 12)
        )
    transformer = _seeded(
        base,
        lambda: FluxTransformer2DModel(
            **transformer_config,
            # 2x2 patches of 16 latent channels.
            patch_size=1,
            in_channels=64,
            joint_attention_dim=text_encoder_2.config.d_model,
            # Flux conditions on CLIP's pooled output, which is hidden_size wide.
            pooled_projection_dim=text_config.hidden_size,
            guidance_embeds=True,
        ),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_vae(
            size,
            base + 1,
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.1159,
            scaling_factor=0.3611,
        ),
        text_encoder=_seeded(base + 2, lambda: CLIPTextModel(text_config)),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return _save(pipe, out_dir)


FAMILIES: dict[str, Callable[..., Path]] = {
    "sd1": build_sd1,
    "sdxl": build_sdxl,
    "sd3": build_sd3,
    "flux": build_flux,
    "kolors": build_kolors,
}


def build(family: str, out_dir: Path, *, size: str = "tiny", seed: int = 0) -> Path:
    """Build one family's random pipeline into out_dir and return out_dir."""
    if family not in FAMILIES:
        raise InvalidArgument(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}", field="family")
    return FAMILIES[family](Path(out_dir), size=size, seed=seed)
