"""FLUX.1-dev (guidance-distilled rectified-flow transformer) adapter (spec §10).

* Latents ``(B, 16, H, W)`` are packed into 2×2 patches, ``(B, H/2·W/2, 64)`` tokens in row-major order
  with feature index ``channel·4 + dy·2 + dx``, and unpacked again after the network.
* Image ids ``(0, row, col)`` over the patch grid, text ids all zero.
* Conditioning: CLIP-L pooled output (B, 768) and the T5-XXL last hidden state (B, 512, 4096).
* The teacher keeps its guidance embedder and is driven with ``guidance = g`` (no CFG pass); the
  student and fake score have no guidance embedder (built from the teacher minus those weights, or from
  ``paths.flux_wo_guidance_embed``) and are never given a guidance value.
* The transformer receives ``σ`` (it multiplies by 1000 internally).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..parallel import read_diffusers_weights
from ..schedules import FlowMatchingSchedule
from .base import Cond, TeacherAdapter, resolve_teacher_dir

logger = logging.getLogger(__name__)

REQUIRED = (
    "transformer/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "tokenizer",
    "tokenizer_2",
    "scheduler/scheduler_config.json",
)
GUIDANCE_PREFIX = "time_text_embed.guidance_embedder."


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2·W/2, 4C): 2×2 patches, row-major, feature ``c·4 + dy·2 + dx``."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent of ``height`` x ``width``."""
    b, _, d = x.shape
    x = x.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device=None) -> torch.Tensor:
    """(H/2·W/2, 3) position ids ``(0, row, col)`` of the packed latent tokens."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] = torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


class FluxAdapter(TeacherAdapter):
    """FLUX.1-dev teacher, guidance-free student and fake score."""

    family = "flux"

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        self.root = resolve_teacher_dir(cfg.paths.pretrained_model, REQUIRED)
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(self.root, subfolder="scheduler")
        # dynamic shifting: the training table is unshifted (spec §2.2)
        self.schedule = FlowMatchingSchedule(
            shift=sched.config.shift,
            use_dynamic_shifting=sched.config.use_dynamic_shifting,
            num_train_timesteps=sched.config.num_train_timesteps,
        )
        self.transformer_cls = FluxTransformer2DModel
        self.transformer_config = FluxTransformer2DModel.load_config(self.root / "transformer")
        if not self.transformer_config.get("guidance_embeds"):
            raise ConfigError(
                f"paths.pretrained_model: {self.root}/transformer has guidance_embeds false; the teacher must be "
                "FLUX.1-dev with its guidance embedder"
            )
        self._student_dir = self._wo_guidance_dir(cfg.paths.flux_wo_guidance_embed)
        self._text_side(
            [(CLIPTokenizer, "tokenizer"), (T5TokenizerFast, "tokenizer_2")],
            [(CLIPTextModel, "text_encoder"), (T5EncoderModel, "text_encoder_2")],
        )
        self._load_vae(AutoencoderKL)
        self._ids: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _wo_guidance_dir(spec: str) -> Path | None:
        """``paths.flux_wo_guidance_embed``: a transformer folder (or its parent) with guidance_embeds false."""
        if not spec:
            return None
        path = Path(spec).expanduser()
        path = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"paths.flux_wo_guidance_embed: {spec} holds no transformer/config.json or config.json"
            )
        if json.loads((path / "config.json").read_text()).get("guidance_embeds", False):
            raise ConfigError(
                f"paths.flux_wo_guidance_embed: {path}/config.json must set guidance_embeds false"
            )
        return path

    # --- networks -----------------------------------------------------------------------------------

    def generator_config(self) -> dict:
        """FLUX.1-dev's config without the guidance embedding (or the user's guidance-free folder)."""
        if self._student_dir is not None:
            return self.transformer_cls.load_config(self._student_dir)
        return {**self.transformer_config, "guidance_embeds": False}

    def student_state(self, teacher_state):
        """Every teacher weight except the guidance embedder; a user folder's own weights if it has any."""
        if self._student_dir is not None:
            try:
                teacher_state = read_diffusers_weights(self._student_dir)
            except FileNotFoundError:
                pass  # a config-only folder (the original's symlink recipe without weights): use the teacher's
        return {k: v for k, v in teacher_state.items() if not k.startswith(GUIDANCE_PREFIX)}

    def blocks(self, net):
        return [*net.transformer_blocks, *net.single_transformer_blocks]

    def _position_ids(self, height: int, width: int, text_len: int):
        key = (height, width, text_len)
        if key not in self._ids:
            self._ids[key] = (
                image_ids(height, width, self.device),
                torch.zeros(text_len, 3, device=self.device),
            )
        return self._ids[key]

    def forward(self, net: nn.Module, x, level, cond: Cond, guidance: torch.Tensor | None = None):
        _, _, h, w = x.shape
        img_ids, txt_ids = self._position_ids(h, w, cond["prompt_embeds"].shape[1])
        out = net(
            hidden_states=pack_latents(x),
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled"],
            timestep=level.float(),
            guidance=guidance,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        return unpack_latents(out.float(), h, w)

    def guided(self, net, x, level, cond, uncond, scale):
        """Guidance-distilled teacher: one pass with the guidance embedding ``g = scale`` (no CFG)."""
        return self.forward(net, x, level, cond, guidance=scale.float())

    # --- conditioning and latents -------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Cond:
        tok_clip, tok_t5 = self.tokenizers
        enc_clip, enc_t5 = self.text_encoders
        ids = tok_clip(
            prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        pooled = enc_clip(ids.to(self.device), output_hidden_states=False).pooler_output
        ids = tok_t5(
            prompts,
            padding="max_length",
            max_length=self.cfg.model.t5_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return {"prompt_embeds": enc_t5(ids.to(self.device))[0], "pooled": pooled}

    def latent_shape(self, resolution):
        side = self._check_resolution(resolution, self.vae_scale * 2)
        return (self.vae.config.latent_channels, side, side)
