"""CLIP text conditioning of the VFM discriminator (spec §8.5): open_clip text tower, frozen, fp32.

``paths.clip`` names either a weights file of a whole open_clip / OpenAI CLIP model
(``open_clip_pytorch_model.bin``, ``open_clip_model.safetensors``, OpenAI's TorchScript ``ViT-L-14.pt``)
or a directory holding one (the layout of open_clip models on the Hugging Face hub). When an
``open_clip_config.json`` lies next to the weights its ``model_cfg`` defines the architecture; otherwise
the open_clip registry entry ``model_name`` does. Only the text tower is built and loaded: the
visual tower is never instantiated, and its weights are skipped while reading.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

logger = logging.getLogger(__name__)

CONFIG_NAME = "open_clip_config.json"
_PREFERRED_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
)
_TEXT_PREFIXES = (
    "token_embedding.",
    "positional_embedding",
    "transformer.",
    "ln_final.",
    "text_projection",
    "cls_emb",
)


def resolve_clip_files(path: str | os.PathLike, random_init: bool = False) -> tuple[Path | None, Path | None]:
    """``paths.clip`` (file or directory) -> (weights file, ``open_clip_config.json`` or None).

    With ``random_init`` a directory holding only ``open_clip_config.json`` is accepted (no weights).
    """
    path = Path(path)
    if random_init and path.is_dir() and (path / CONFIG_NAME).is_file():
        return None, path / CONFIG_NAME
    if path.is_dir():
        found = [path / name for name in _PREFERRED_WEIGHTS if (path / name).is_file()]
        if not found:
            found = sorted(p for ext in ("*.safetensors", "*.bin", "*.pt", "*.pth") for p in path.glob(ext))
        if not found:
            raise ConfigError(f"paths.clip: no CLIP weights file (*.safetensors, *.bin, *.pt) in {path}")
        weights = found[0]
    elif path.is_file():
        weights = path
    else:
        raise ConfigError(
            f"paths.clip: {path} does not exist; point it to an open_clip/OpenAI CLIP ViT-L/14 weights file"
        )
    config = weights.parent / CONFIG_NAME
    return weights, config if config.is_file() else None


def _text_key(key: str) -> str | None:
    """Name of ``key`` inside the text tower, or None for keys of other parts (visual tower, logit scale)."""
    for prefix in ("module.", "text."):  # DDP wrapper; CustomTextCLIP layout
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key if key.startswith(_TEXT_PREFIXES) else None


def _is_torchscript(path: Path) -> bool:
    """True for a TorchScript zip archive (it holds a ``constants.pkl`` record)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in zf.namelist())


def load_text_state_dict(weights: Path) -> dict[str, torch.Tensor]:
    """Read only the text-tower tensors of a whole-CLIP weights file, renamed to ``TextTransformer`` keys."""
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt", device="cpu") as f:
            return {_text_key(k): f.get_tensor(k) for k in f.keys() if _text_key(k) is not None}
    if _is_torchscript(weights):  # OpenAI's original release is a TorchScript archive
        try:
            obj = torch.jit.load(str(weights), map_location="cpu").state_dict()
        except Exception as err:  # any failure means the file is unusable
            raise ConfigError(
                f"paths.clip: cannot read TorchScript archive {weights}: {err}".replace("\n", " ")
            ) from None
    else:
        obj = None
        errors = []
        for kwargs in ({"weights_only": True, "mmap": True}, {"weights_only": True}):
            try:
                obj = torch.load(weights, map_location="cpu", **kwargs)
                break
            except Exception as err:  # try the next reader, report all if none works
                errors.append(str(err).splitlines()[0] if str(err) else type(err).__name__)
        if obj is None:
            raise ConfigError(f"paths.clip: cannot read {weights}: {'; '.join(errors)}")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConfigError(f"paths.clip: {weights} does not hold a state dict (got {type(obj).__name__})")
    return {_text_key(k): v for k, v in obj.items() if isinstance(k, str) and _text_key(k) is not None}


def clip_model_config(config_file: Path | None, model_name: str) -> tuple[dict, bool | None]:
    """The open_clip ``model_cfg`` and its ``quick_gelu`` entry (None when the config does not say)."""
    if config_file is not None:
        data = json.loads(config_file.read_text())
        cfg = data.get("model_cfg", data)
        return cfg, cfg.get("quick_gelu", False)
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ConfigError(
            f"discriminator.clip_model: {model_name!r} is not an open_clip architecture and no {CONFIG_NAME} "
            "lies next to paths.clip"
        )
    return cfg, cfg.get("quick_gelu")


class ClipTextEncoder(nn.Module):
    """Frozen open_clip text tower: ``encode(prompts)`` -> (B, embed_dim) float32, L2-normalised.

    ``quick_gelu``: None takes it from ``open_clip_config.json`` (absent key: False, as open_clip does)
    or, without that file, from the registry config, defaulting to True because OpenAI's CLIP weights
    were trained with QuickGELU (open_clip itself forces it for ``pretrained="openai"``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        model_name: str = "ViT-L-14",
        quick_gelu: bool | None = None,
        context_length: int = 77,
        random_init: bool = False,
    ) -> None:
        super().__init__()
        from open_clip.model import CLIPTextCfg, _build_text_tower
        from open_clip.tokenizer import SimpleTokenizer

        weights, config_file = resolve_clip_files(path, random_init)
        model_cfg, cfg_quick_gelu = clip_model_config(config_file, model_name)
        if quick_gelu is None:
            quick_gelu = True if cfg_quick_gelu is None else bool(cfg_quick_gelu)
        text_cfg = CLIPTextCfg(**model_cfg["text_cfg"])
        if text_cfg.hf_model_name or text_cfg.hf_tokenizer_name:
            raise ConfigError(
                f"paths.clip: {weights} is a CLIP with a Hugging Face text tower; use OpenAI CLIP ViT-L/14"
            )
        self.tower = _build_text_tower(model_cfg["embed_dim"], text_cfg, quick_gelu=quick_gelu)
        try:
            if weights is not None:
                self.tower.load_state_dict(load_text_state_dict(weights), strict=True)
        except RuntimeError as err:
            msg = " ".join(str(err).split())[:400]
            raise ConfigError(
                f"paths.clip: {weights} does not match the open_clip text tower of "
                f"{config_file or model_name!s} (discriminator.clip_model): {msg}"
            ) from None
        self.tower.requires_grad_(False).eval()
        self.embed_dim = int(model_cfg["embed_dim"])
        self.context_length = min(context_length, text_cfg.context_length)
        self.tokenizer = SimpleTokenizer(context_length=self.context_length)
        logger.info(
            "CLIP text tower from %s (width %d, %d layers, embed %d, quick_gelu %s)",
            weights or f"{config_file} (random weights)",
            text_cfg.width,
            text_cfg.layers,
            self.embed_dim,
            quick_gelu,
        )

    def train(self, mode: bool = True) -> ClipTextEncoder:
        """Stay in eval mode whatever the parent asks (frozen, spec §8.5)."""
        return super().train(False)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(B,) prompts -> (B, context_length) token ids, truncated, ending with the end-of-text token."""
        return self.tokenizer(list(prompts), context_length=self.context_length)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(B,) prompts -> (B, embed_dim) float32 L2-normalised projected text embeddings, no gradient."""
        device = self.tower.positional_embedding.device
        tokens = self.tokenize(prompts).to(device)
        with torch.autocast(device_type=device.type, enabled=False):
            feats = self.tower(tokens)
        if isinstance(feats, tuple):
            feats = feats[0]
        return F.normalize(feats.float(), dim=-1)
