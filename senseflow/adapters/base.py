"""The teacher-adapter interface: everything the engine needs to know about one model family.

An adapter loads the family's components from a diffusers-layout folder, builds the three sharded
transformers (generator, fake score, frozen teacher), encodes prompts and images, and calls a network
in the family's conventions. Predictions are returned in the family's own parameterisation
(velocity or ε, float32); :attr:`schedule` converts them. The engine knows nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..config import Config
from ..distributed import DistInfo
from ..errors import ConfigError
from ..parallel import DTYPE, build_sharded, fsdp_units, mixed_precision_policy, read_diffusers_weights
from ..schedules import NoiseSchedule

logger = logging.getLogger(__name__)

Cond = dict[str, torch.Tensor]
"""Text conditioning of a batch: named tensors whose first dimension is the batch."""


def cat_cond(a: Cond, b: Cond) -> Cond:
    """Concatenate two conditionings along the batch (``[a; b]``)."""
    return {k: torch.cat([a[k], b[k]]) for k in a}


def expand_cond(c: Cond, batch: int) -> Cond:
    """Repeat a batch-1 conditioning ``batch`` times."""
    return {k: v.expand(batch, *v.shape[1:]) for k, v in c.items()}


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``model`` (which may hold meta tensors) or raise one clear error naming a few
    missing and unexpected keys: a checkpoint of another architecture is never loaded partially."""
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise ConfigError(
            f"{what} does not match the {type(model).__name__} architecture: {'; '.join(parts)}"
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:  # shape mismatches
        first = " ".join(str(err).split())[:300]
        raise ConfigError(f"{what} does not match the {type(model).__name__} architecture: {first}") from None


def resolve_teacher_dir(spec: str, required: Iterable[str], key: str = "paths.pretrained_model") -> Path:
    """Check that the teacher folder exists and holds every ``required`` file."""
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{key}: {spec} is not a directory (expected a teacher folder in diffusers layout)")
    missing = [r for r in required if not (root / r).exists()]
    if missing:
        raise ConfigError(
            f"{key}: {root} is not a complete teacher folder: missing {', '.join(missing[:4])}"
            + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        )
    return root


def load_component(
    cls, root: Path, subfolder: str, dtype: torch.dtype, random_init: bool, device
) -> nn.Module:
    """``from_pretrained`` a frozen component, or build it from its config with random weights."""
    path = root / subfolder
    try:
        if random_init:
            if hasattr(cls, "load_config"):  # diffusers
                with torch.device(device):
                    model = cls.from_config(cls.load_config(path))
            else:  # transformers
                with torch.device(device):
                    model = cls(cls.config_class.from_pretrained(path))
            model = nn.Module.to(model, dtype=dtype)
        else:
            model = cls.from_pretrained(path, torch_dtype=dtype).to(device)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"paths.pretrained_model: cannot load {subfolder}/ from {root}: {first}") from None
    return model.requires_grad_(False).eval()


def text_encoder_layers(enc: nn.Module) -> list[nn.Module]:
    """The transformer layers of a transformers text encoder: the first ``ModuleList`` named ``block``
    (T5) or ``layers`` (CLIP; under ``text_model`` or not, depending on the transformers version)."""
    for name, module in enc.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("block", "layers"):
            return list(module)
    raise ConfigError(f"model.shard_text_encoders: no layer list found in {type(enc).__name__}")


class TeacherAdapter:
    """Base class of the family adapters (see the module docstring).

    Subclasses set :attr:`schedule`, :attr:`transformer_cls`, :attr:`transformer_config`, the text
    encoders, and call :meth:`_load_vae`; they implement :meth:`blocks`, :meth:`forward`,
    :meth:`encode_text` and :meth:`latent_shape`, and load their tokenizers and text encoders through
    :meth:`_text_side`.
    """

    family: str = ""
    net_subfolder = "transformer"
    schedule: NoiseSchedule
    transformer_cls: type
    transformer_config: dict
    vae: nn.Module

    def __init__(self, cfg: Config, info: DistInfo):
        self.cfg = cfg
        self.info = info
        self.device = info.device
        self.compute_dtype = DTYPE[cfg.precision.compute]

    def _load(self, cls, subfolder: str, dtype: torch.dtype) -> nn.Module:
        return load_component(cls, self.root, subfolder, dtype, self.cfg.model.random_init, self.device)

    def _load_vae(self, cls) -> None:
        """The VAE, with its scaling and shift factors read from its config (spec §13.4)."""
        self.vae = self._load(cls, "vae", DTYPE[self.cfg.precision.vae])
        if self.cfg.model.vae_split_group_norm:
            from ..kernels import use_split_group_norm

            use_split_group_norm(self.vae)
        if self.cfg.model.vae_math_attention:
            from ..kernels import use_matmul_attention

            use_matmul_attention(self.vae)
        if self.cfg.model.gradient_checkpointing:
            self.vae.enable_gradient_checkpointing()  # the GAN term differentiates the decode
        if self.cfg.model.compile_vae:
            self.vae.encoder.compile()
            self.vae.decoder.compile()
        self.scaling_factor = self.vae.config.scaling_factor
        self.shift_factor = getattr(self.vae.config, "shift_factor", None) or 0.0
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def shard_text_encoders(self) -> None:
        """FSDP2-shard every text encoder per transformer layer, or per ``model.fsdp_blocks_per_unit``
        consecutive layers (``model.shard_text_encoders``; every layer runs in each encoding).

        Every rank must then encode prompts the same number of times (the engine encodes once per
        iteration on every rank) and call :meth:`reshard_text_encoders` afterwards."""
        from ..parallel import shard

        per_unit = self.cfg.model.fsdp_blocks_per_unit
        for enc in self.text_encoders:
            shard(enc, text_encoder_layers(enc), None, device=self.info.device, blocks_per_unit=per_unit)
        logger.info(
            "text encoders sharded over %d ranks (FSDP2 per %s)",
            self.info.world_size,
            "layer" if per_unit == 1 else f"{per_unit} layers",
        )

    def reshard_text_encoders(self) -> None:
        """Free the unsharded root parameters FSDP2 keeps after a forward (no-op when not sharded)."""
        from ..parallel import reshard

        reshard(*getattr(self, "text_encoders", []))

    # --- networks -----------------------------------------------------------------------------------

    def generator_config(self) -> dict:
        """Config of the generator and fake score (the teacher's unless the family changes it)."""
        return self.transformer_config

    def student_state(self, teacher_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The generator's initial weights from the teacher's (the teacher's unless the family changes it)."""
        return teacher_state

    def _teacher_state(self) -> dict[str, torch.Tensor] | None:
        """The full teacher network weights on rank 0 (None elsewhere)."""
        if not self.info.is_main:
            return None
        if self.cfg.model.random_init:
            # built directly on the device and in the teacher's dtype (a 12 B model is 48 GB in fp32)
            default = torch.get_default_dtype()
            torch.set_default_dtype(DTYPE[self.cfg.precision.teacher])
            try:
                with torch.device(self.device):
                    return self.transformer_cls.from_config(self.transformer_config).state_dict()
            finally:
                torch.set_default_dtype(default)
        try:
            return read_diffusers_weights(self.root / self.net_subfolder)
        except FileNotFoundError as err:
            raise ConfigError(f"paths.pretrained_model: {err}") from None

    def fake_extras(self) -> dict[str, nn.Module]:
        """Extra trainable submodules of the fake score only (DMD2's classifier head); none by default."""
        return {}

    def _build_net(self, config: dict, extras: dict[str, nn.Module] | None = None) -> nn.Module:
        net = self.transformer_cls.from_config(config)
        for name, module in (extras or {}).items():
            net.add_module(name, module)
        return net

    def build_networks(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """The sharded generator and fake score (trainable) and the frozen teacher (spec §12.5)."""
        p, m = self.cfg.precision, self.cfg.model
        sharded = m.sharded(self.info.world_size)
        if sharded and m.compile_mode is not None and m.compile_blocks:
            raise ConfigError(
                f"model.compile_mode: {m.compile_mode!r} is for unsharded nets (a single process, or "
                "model.fsdp=never); FSDP2 moves the blocks' weights at every pass, so set it to null or "
                "model.fsdp=never"
            )
        teacher_state = self._teacher_state()
        student_state = fake_state = None
        extras = self.fake_extras()
        if teacher_state is not None:  # rank 0
            student_state = self.student_state(teacher_state)
            fake_state = dict(student_state)
            for name, module in extras.items():  # randomly initialised on rank 0, broadcast like the rest
                fake_state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        trained_compute = p.compute if p.fsdp_mixed else p.master
        # a compiled block with a memory budget recomputes inside its compiled backward instead
        budget = m.activation_memory_budget if m.compile_blocks else None
        fake_key = "fake_activation_memory_budget"
        if m.fake_activation_memory_budget is None:
            fake_key = "activation_memory_budget"
        fake_budget = getattr(m, fake_key) if m.compile_blocks else None
        for name, key, value in (
            ("generator", "activation_memory_budget", budget),
            ("fake score", fake_key, fake_budget),
        ):
            if value is not None:
                logger.info(
                    "%s blocks: recomputation chosen by the compiler within an activation memory budget of "
                    "%g (model.%s), not checkpointed",
                    name,
                    value,
                    key,
                )
        nets = []
        for config, state, trainable, extra, net_budget in (
            (self.generator_config(), student_state, True, None, budget),
            (self.generator_config(), fake_state, True, extras, fake_budget),
            (self.transformer_config, teacher_state, False, None, None),
        ):
            nets.append(
                build_sharded(
                    lambda config=config, extra=extra: self._build_net(config, extra and self.fake_extras()),
                    state,
                    self.info,
                    blocks=self.blocks,
                    dtype=DTYPE[p.master if trainable else p.teacher],
                    mp_policy=mixed_precision_policy(trained_compute if trainable else p.teacher),
                    trainable=trainable,
                    gradient_checkpointing=trainable and m.gradient_checkpointing and net_budget is None,
                    compile_blocks=m.compile_blocks,
                    memory_budget=net_budget,
                    compile_mode=m.compile_mode if trainable else None,
                    blocks_per_unit=self.cfg.model.fsdp_blocks_per_unit,
                    unit_starts=self.unit_starts,
                    fsdp=sharded,
                )
            )
        if not sharded and self.info.world_size > 1:
            logger.info(
                "generator, fake score and teacher replicated on each of %d ranks, gradients averaged "
                "(model.fsdp=never)",
                self.info.world_size,
            )
        elif not sharded:
            logger.info("single process: generator, fake score and teacher unsharded (model.fsdp=auto)")
        elif self.cfg.model.fsdp_blocks_per_unit > 1:
            logger.info(
                "FSDP2 units of up to %d blocks: %d units for the %d blocks of the generator",
                self.cfg.model.fsdp_blocks_per_unit,
                len(fsdp_units(nets[0])) - 1,
                len(self.blocks(nets[0])),
            )
        generator, fake, teacher = nets
        return generator, fake, teacher.eval()

    def load_generator(self, state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
        """An unsharded generator in eval mode on the adapter's device, loaded strictly (inference)."""
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = self.transformer_cls.from_config(self.generator_config())
        load_state_dict_strict(model, state_dict, "the generator checkpoint")
        return nn.Module.to(model, device=self.device, dtype=dtype).eval().requires_grad_(False)

    def blocks(self, net: nn.Module) -> list[nn.Module]:
        """The repeated blocks of a transformer in forward order (FSDP2-sharded alone or in groups of
        consecutive blocks, compiled one by one)."""
        raise NotImplementedError

    def unit_starts(self, net: nn.Module) -> list[nn.Module]:
        """Blocks that begin a new FSDP2 unit when ``model.fsdp_blocks_per_unit`` groups blocks. FSDP2
        expects the blocks of a unit to run forward together, so a forward that runs only the first blocks
        (SDXL's classifier bottleneck) must end at a unit boundary. None by default (every forward runs
        every block)."""
        return []

    def forward(self, net: nn.Module, x: torch.Tensor, level: torch.Tensor, cond: Cond) -> torch.Tensor:
        """One network call at per-sample ``level`` (B,); returns the prediction in float32."""
        raise NotImplementedError

    def guided(
        self,
        net: nn.Module,
        x: torch.Tensor,
        level: torch.Tensor,
        cond: Cond,
        uncond: Cond,
        scale: torch.Tensor,
    ) -> torch.Tensor:
        """Classifier-free guidance ``ŷ_u + s·(ŷ_c − ŷ_u)`` on one doubled batch ``[uncond; cond]``.

        ``scale`` is per sample (B,). Guidance-distilled teachers (FLUX) override this.
        """
        both = self.forward(net, torch.cat([x, x]), torch.cat([level, level]), cat_cond(uncond, cond))
        pred_u, pred_c = both.chunk(2)
        s = scale.reshape(-1, *([1] * (x.dim() - 1))).to(pred_c.dtype)
        return pred_u + s * (pred_c - pred_u)

    # --- conditioning and latents -------------------------------------------------------------------

    def _text_side(self, tokenizers: list[tuple[type, str]], encoders: list[tuple[type, str]]) -> None:
        """Load the tokenizers and text encoders (``(class, subfolder)`` each; encoders in
        ``precision.text_encoders``), or none of them when ``paths.text_embeddings`` names precomputed
        embeddings (:mod:`senseflow.data.text_cache`), which are then read instead."""
        from ..data.text_cache import open_text_cache

        self.text_cache = open_text_cache(self.cfg)
        self.tokenizers, self.text_encoders = [], []
        if self.text_cache is None:
            dtype = DTYPE[self.cfg.precision.text_encoders]
            self.tokenizers = [cls.from_pretrained(self.root / sub) for cls, sub in tokenizers]
            self.text_encoders = [self._load(cls, sub, dtype) for cls, sub in encoders]

    def encode_text(self, prompts: list[str]) -> Cond:
        """The text encoders' outputs for a batch of captions (no gradient): what
        :mod:`senseflow.data.text_cache` stores."""
        raise NotImplementedError

    def complete_cond(self, text: Cond, batch: int) -> Cond:
        """Add the conditioning that does not come from the text (SDXL's micro-conditioning)."""
        return text

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Teacher conditioning of a batch of captions: encoded, or read from ``paths.text_embeddings``."""
        if self.text_cache is not None:
            text = self.text_cache.lookup(prompts, self.device)
        else:
            text = self.encode_text(prompts)
        return self.complete_cond(text, len(prompts))

    def empty_cond(self, batch: int) -> Cond:
        """The unconditional branch (the empty prompt), encoded once and cached."""
        if not hasattr(self, "_empty"):
            self._empty = self.encode_prompts([""])
        return expand_cond(self._empty, batch)

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        """Shape of one latent for a square image of ``resolution`` pixels."""
        raise NotImplementedError

    def _check_resolution(self, resolution: int, multiple: int) -> int:
        if resolution % multiple:
            raise ConfigError(
                f"train.resolution: {resolution} is not a multiple of {multiple} for this teacher"
            )
        return resolution // self.vae_scale

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) to training latents: a posterior *sample*, shifted and scaled."""
        dist = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        z = dist.sample(generator=generator)
        return ((z - self.shift_factor) * self.scaling_factor).float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images, nominally in [-1, 1] and not clamped; differentiable."""
        z = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float()
