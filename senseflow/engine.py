"""The one distillation engine: generator / fake-score / discriminator steps (SenseFlow Alg. 1, spec §1.2).

Per iteration ``k`` (starting at 1):

1. control-flow draws shared by all ranks: generator step ``k % P == 0`` (TTUR), backward simulation
   or noised real latents, the number of simulated steps;
2. the generator input at an anchor (spec §3);
3. on generator steps: ISG (Eq. 12), DM (spec §4) and the adversarial term, one backward, clip, step,
   then IDA (Eq. 9); otherwise one generator forward without gradient;
4. every iteration: the fake-score step on the detached sample (spec §5) and the discriminator step.

Everything family-specific lives in the adapter; everything numeric in ``schedules`` and ``losses``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .adapters import build_adapter
from .adapters.base import cat_cond
from .checkpoint import CheckpointManager
from .config import Config, resolve_paths, to_dict
from .data import build_dataset
from .data.json_dataset import InfiniteLoader
from .discriminator import VFMDiscriminator
from .distributed import DistInfo, GradReducer, all_reduce_max_int, broadcast_tensors_
from .errors import ConfigError, SenseFlowError
from .kernels import cast_matmul_weights_
from .losses.decoupled import decoupled_dmd_loss
from .losses.dm import distribution_matching_loss
from .losses.fake_score import fake_score_loss
from .losses.gan import dmd2_classifier_loss, dmd2_generator_loss, hinge_d_fake, hinge_d_real, hinge_g
from .losses.ida import implicit_distribution_alignment_
from .losses.isg import intra_segment_guidance_loss, sdxl_legacy_isg_loss
from .metrics import MetricsSink, image_grid
from .offload import FlatStateParking, ModuleParking, StateOffload
from .optim import adamw8bit
from .parallel import DTYPE, full_state_dict, keep_gathered, local_tensor, reshard, reshard_all, shard
from .profiling import PhaseTimer
from .sampling import sample_x0
from .schedules import sample_table_index
from .stop import StopNow, StopRequest, TrainingStopped

logger = logging.getLogger(__name__)


class RandomStreams:
    """The run's random streams (spec §12.6; fixes B12).

    * ``control`` (CPU, same seed on every rank): decisions that change which collectives run —
      generator step, backward simulation and its step count — so sharded models never diverge.
    * ``noise`` (on the device, seed + 1 + rank): every tensor draw (noise, timesteps, anchors, guidance
      scales, ISG points, VAE posterior, augmentation), so ranks see different samples. With
      ``compat.shared_noise_across_ranks`` all ranks use the same seed, as in the original.
    * Python's and NumPy's global generators are seeded too (per rank), for library code.
    """

    def __init__(self, seed: int, rank: int, device: torch.device, shared_noise: bool):
        self.control = torch.Generator().manual_seed(seed)
        self.noise = torch.Generator(device=device).manual_seed(seed + 1 + (0 if shared_noise else rank))
        random.seed(seed + rank)
        np.random.seed((seed + rank) % 2**32)

    def state_dict(self) -> dict[str, Any]:
        """States of all streams (tensors and plain Python objects only)."""
        return {
            "control": self.control.get_state(),
            "noise": self.noise.get_state(),
            "python": random.getstate(),
            "numpy": _numpy_state_to_torch(np.random.get_state()),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore the streams saved by :meth:`state_dict`."""
        self.control.set_state(sd["control"])
        self.noise.set_state(sd["noise"])
        random.setstate(_tuplify(sd["python"]))
        name, key, pos, has_gauss, gauss = sd["numpy"]
        np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))


def _numpy_state_to_torch(state):
    """NumPy's legacy RNG state with its key array as a tensor (loadable with ``weights_only=True``)."""
    name, key, pos, has_gauss, gauss = state
    return (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss)


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list | tuple) else x


def warmup_constant(lr_start: float, lr_max: float, warm_up: int):
    """LR multiplier (relative to ``lr_max``) of the warm-up-then-constant schedule (spec §12.2)."""

    def factor(n: int) -> float:
        lr = lr_start + (lr_max - lr_start) * n / warm_up if n < warm_up else lr_max
        return lr / lr_max if lr_max > 0 else 0.0

    return factor


@dataclass
class Adversarial:
    """Per-iteration discriminator conditioning shared by the generator, real and fake passes."""

    text: torch.Tensor  # (B, c_dim) CLIP text embeddings
    ref: list[torch.Tensor]  # DINOv2 taps of the reference images
    weight: torch.Tensor  # (B,) time weight of each sample's anchor


@dataclass
class Trainee:
    """A trained network with its optimiser and LR schedule."""

    net: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    params: list[nn.Parameter] = field(default_factory=list)
    stepped: bool = False
    """Whether the optimiser has stepped in this process (its first step may compile, see ``_opt_step``)."""
    offload: StateOffload | None = None
    """Moves the optimiser states to host memory between steps (``optimizer.offload_generator_state``,
    ``optimizer.offload_fake_state``)."""
    reducer: GradReducer | None = None
    """Averages the gradients of a net replicated on several ranks during its step's backward (FSDP2
    averages those of sharded nets itself)."""

    @property
    def replicated(self) -> bool:
        return self.reducer is not None


class Engine:
    """Builds everything for a run and trains it (see the module docstring)."""

    def __init__(self, cfg: Config, info: DistInfo, save_dir: str | Path):
        resolve_paths(cfg)  # no-op when the entry point already did it
        self.cfg = cfg
        self.info = info
        self.device = info.device
        self.save_dir = Path(save_dir)
        self.d = cfg.distill
        self.rng = RandomStreams(cfg.train.seed, info.rank, info.device, cfg.compat.shared_noise_across_ranks)
        self.compute_dtype = DTYPE[cfg.precision.compute]
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = cfg.precision.tf32
            torch.backends.cudnn.allow_tf32 = cfg.precision.tf32
            if not cfg.model.cudnn_attention:
                torch.backends.cuda.enable_cudnn_sdp(False)  # see model.cudnn_attention
            torch.backends.cudnn.benchmark = cfg.model.cudnn_benchmark

        self._build_data()
        self.adapter = build_adapter(cfg, info)
        if self.adapter.text_cache is not None:  # paths.text_embeddings: every prompt must be there
            self.adapter.text_cache.require(self.dataset.all_prompts())
        self.schedule = self.adapter.schedule
        self.latent_shape = self.adapter.latent_shape(cfg.train.resolution)
        t0 = time.time()
        torch.manual_seed(cfg.train.seed)  # randomly initialised parts (DMD2 head, D heads) are reproducible
        generator, fake, self._teacher = self.adapter.build_networks()
        logger.info("built generator, fake score and teacher in %.1fs", time.time() - t0)
        sharded = cfg.model.sharded(info.world_size)
        self.G = self._trainee(generator, sharded=sharded)
        self.F = self._trainee(fake, sharded=sharded)
        pin, chunks = self.device.type == "cuda", cfg.optimizer.offload_step_chunks
        if cfg.optimizer.offload_generator_state:
            self.G.offload = StateOffload(self.G.opt, pin, "generator", chunks)
        if cfg.optimizer.offload_fake_state == "between_steps":
            self.F.offload = StateOffload(self.F.opt, pin, "fake score", chunks)
        # optimizer.offload_fake_state=generator_step: F's states are away during G's losses and step only
        self.park_fake = None
        if cfg.optimizer.offload_fake_state == "generator_step":
            side = torch.cuda.Stream(self.device) if pin and cfg.optimizer.offload_overlap else None
            self.park_fake = FlatStateParking(self.F.opt, pin, "fake score", stream=side)
        self.disc, self.D = self._build_discriminator()
        # compile modes that may replay CUDA graphs (model.compile_mode, discriminator.compile_mode)
        self.compile_modes = (cfg.model.compile_blocks and cfg.model.compile_mode is not None) or (
            self.disc is not None
            and cfg.discriminator.compile_heads
            and cfg.discriminator.compile_mode is not None
        )
        self.gathered_G = False  # model.keep_generator_gathered: nothing to keep gathered when unsharded
        if cfg.model.keep_generator_gathered and cfg.model.sharded(self.info.world_size):
            self.gathered_G = keep_gathered(self.G.net)
            if not self.gathered_G:
                logger.warning(
                    "model.keep_generator_gathered: this torch's FSDP2 cannot keep units gathered; ignored"
                )
        self.park_teacher = None  # model.offload_teacher: in host memory outside generator iterations
        if cfg.model.offload_teacher:
            side = torch.cuda.Stream(self.device) if pin else None
            self.park_teacher = ModuleParking(self._teacher, pin, "teacher", side)
            self.park_teacher.park()

        grid = torch.tensor(self.d.anchors, dtype=torch.long)
        self.anchor_grid = grid.to(self.device)
        # levels the generator is conditioned on, and levels used for noising and x0 recovery: the same
        # except under compat.flux_bf16_sigma (N1), where the latter are rounded to bf16
        self.anchor_cond_levels = self.schedule.grid_to_level(self.anchor_grid, self.d.timestep_grid)
        self.anchor_levels = self.anchor_cond_levels
        if self.d.timestep_grid == "t1000" and cfg.compat.flux_bf16_sigma:
            self.anchor_levels = self.anchor_cond_levels.to(torch.bfloat16).float()
        self.gan_weights = self._gan_time_weights()
        self.ckpt = CheckpointManager(
            self.save_dir, info, cfg.checkpoint.keep_last, cfg.checkpoint.keep_last_exports
        )
        self.timer = PhaseTimer(self.device)  # enabled by the benchmark
        self.metrics = MetricsSink(
            self.save_dir, info.is_main, self.device, cfg.log.tensorboard, cfg.log.wandb, to_dict(cfg)
        )
        self.iteration = 0
        self.counters = {"skipped_images": 0, "nonfinite_gen": 0, "nonfinite_fake": 0, "nonfinite_disc": 0}
        self.nonfinite_pending: dict[str, torch.Tensor] = {}
        """Skipped steps of fused optimisers, counted on the device until the next log or checkpoint."""

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher, on the device (brought back first if ``model.offload_teacher`` parked it)."""
        if self.park_teacher is not None:
            self.park_teacher.ensure()
        return self._teacher

    # --- construction -------------------------------------------------------------------------------

    def _build_data(self) -> None:
        cfg = self.cfg
        spec = cfg.paths.dataset
        path = Path(spec)
        self.dataset = build_dataset(cfg)
        self.loader = InfiniteLoader(
            self.dataset,
            cfg.train.batch_size,
            self.info.rank,
            self.info.world_size,
            seed=cfg.train.seed,
            num_workers=cfg.data.num_workers,
            shuffle=cfg.data.shuffle,
        )
        logger.info(
            "dataset %s: %d samples, %d batches per epoch per rank",
            path,
            len(self.dataset),
            self.loader.batches_per_epoch,
        )

    def _build_discriminator(self) -> tuple[VFMDiscriminator | None, Trainee | None]:
        """The VFM discriminator: frozen DINOv2 + CLIP, trainable heads replicated on every rank, or
        sharded with FSDP2 under ``model.shard_discriminator`` (each head, then all heads as the root).

        The heads start from rank 0's random initialisation either way. Sharded heads compute in fp32
        (no mixed-precision policy; the engine's autocast applies as for replicated heads), and FSDP2
        reduce-scatters and averages their gradients, so the disc step does not all-reduce them.
        """
        cfg = self.cfg
        self.shard_disc = False
        if cfg.distill.gan.weight <= 0:
            return None, None
        dc = cfg.discriminator
        if (
            cfg.model.shard_discriminator
            and self.info.world_size > 1
            and dc.compile_heads
            and dc.compile_mode is not None
        ):
            raise ConfigError(
                f"discriminator.compile_mode: {dc.compile_mode!r} is for unsharded heads; FSDP2 moves their "
                "weights at every pass, so set it to null or model.shard_discriminator=false"
            )
        disc = VFMDiscriminator(
            cfg.discriminator,
            cfg.paths.dino,
            cfg.paths.clip,
            random_init=cfg.model.random_init,
        ).to(self.device)
        if self.compute_dtype != torch.float32:  # the backbone runs under autocast only (spec §12.4)
            cast_matmul_weights_(disc.backbone.model, self.compute_dtype)
        broadcast_tensors_(list(disc.heads.state_dict().values()))
        heads = disc.heads
        if cfg.model.shard_discriminator and self.info.world_size > 1:
            shard(heads, heads, None, device=self.device)
            self.shard_disc = True
            logger.info(
                "discriminator heads sharded over %d ranks (FSDP2 per head): %.2f of %.2f M parameters "
                "on this rank",
                self.info.world_size,
                sum(local_tensor(p).numel() for p in heads.parameters()) / 1e6,
                sum(p.numel() for p in heads.parameters()) / 1e6,
            )
        return disc, self._trainee(heads, list(disc.trainable_parameters()), sharded=self.shard_disc)

    def _gan_time_weights(self) -> torch.Tensor:
        """Per-anchor weight ``w`` of the adversarial terms (spec §8.7), noisiest anchor first."""
        kind = self.d.gan.time_weight
        if self.d.timestep_grid == "ascending_index" and self.cfg.compat.sd35_gan_weight_legacy:
            # B13: the descending table indexed with the ascending-table anchor index, squared
            desc = self.schedule.table_level(self.anchor_grid.clamp(max=999), "descending")
            return desc.float() ** 2
        alpha, _ = self.schedule.alpha_sigma(self.anchor_levels)
        return {"signal_squared": alpha**2, "signal": alpha, "none": torch.ones_like(alpha)}[kind]

    def _optimizer(self, params: list[nn.Parameter]) -> tuple[torch.optim.Optimizer, Any]:
        o, s = self.cfg.optimizer, self.cfg.lr_scheduler
        kwargs = {"lr": s.lr_max, "betas": tuple(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
        if o.name == "adamw8bit":
            opt = adamw8bit(params, kwargs)
        else:
            opt = torch.optim.AdamW(params, fused=self.device.type == "cuda", **kwargs)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_constant(s.lr_start, s.lr_max, s.warm_up_steps))
        return opt, sched

    def _trainee(self, net: nn.Module, params: list[nn.Parameter] | None = None, *, sharded: bool) -> Trainee:
        """``net`` with its optimiser; unless FSDP2 ``sharded`` it, its gradients are averaged over several
        ranks by a :class:`GradReducer` (``model.fsdp=never``, replicated discriminator heads)."""
        params = params if params is not None else [p for p in net.parameters() if p.requires_grad]
        opt, sched = self._optimizer(params)
        replicated = self.info.world_size > 1 and not sharded
        return Trainee(net, opt, sched, params, reducer=GradReducer(params) if replicated else None)

    # --- small helpers ------------------------------------------------------------------------------

    def _amp(self, enabled: bool = True):
        """bf16 autocast region (spec §12.4); a no-op in fp32."""
        on = enabled and self.compute_dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=on)

    def _randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.rng.noise, device=self.device)

    def _uniform(self, lo_hi: list[float], n: int) -> torch.Tensor:
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(n, generator=self.rng.noise, device=self.device)

    def _sample_levels(self, ts, n: int) -> torch.Tensor:
        idx = sample_table_index(n, ts.dist, ts.min_index, ts.max_index, self.rng.noise, self.device)
        return self.schedule.table_level(idx, ts.table)

    @staticmethod
    def _backward(t: Trainee, loss: torch.Tensor, *, last: bool) -> None:
        """``loss.backward()`` into ``t``'s gradients; ``last``: the step's last backward, whose gradients
        are final (a replicated net's are then averaged over the ranks as they come)."""
        if t.reducer is not None:
            t.reducer.begin()
            if last:
                t.reducer.arm()
        loss.backward()

    def _step(self, t: Trainee, losses: list[torch.Tensor], name: str) -> torch.Tensor:
        """Backward of each loss, global-norm clip, step unless the gradient is non-finite (spec §12.3,
        N7), zero. The gradients of a replicated net are first averaged over the ranks."""
        for i, loss in enumerate(losses):
            self._backward(t, loss, last=i == len(losses) - 1)
        if t is self.G and self.gathered_G:
            reshard_all(t.net)  # no unit may keep gathered copies of the weights the step is about to change
        if t.reducer is not None:
            t.reducer.finish()
        norm = torch.nn.utils.clip_grad_norm_(t.params, self.cfg.train.grad_clip)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        if t is self.F and self.park_fake is not None:
            self.park_fake.ready()  # optimizer.offload_overlap: the states' copy back has arrived
        nonfinite = ~torch.isfinite(norm)
        if t.opt.defaults.get("fused"):
            # the fused kernel skips the whole update (and its step count) where found_inf is 1: no host
            # synchronisation per step; the skipped steps are counted at the next log (_count_nonfinite)
            t.opt.found_inf = nonfinite.float()
            self._opt_step_offloaded(t, name)
            self.nonfinite_pending[name] = self.nonfinite_pending.get(name, 0) + nonfinite.int()
        elif not nonfinite:  # waits for the device
            self._opt_step_offloaded(t, name)
        else:
            self.counters[f"nonfinite_{name}"] += 1
            logger.warning(
                "non-finite %s gradient norm at iteration %d: step skipped", name, self.iteration + 1
            )
        t.opt.zero_grad(set_to_none=True)
        return norm.detach()

    def _opt_step_offloaded(self, t: Trainee, name: str) -> None:
        if t.offload is not None:
            t.offload.step(lambda: self._opt_step(t, name))
        else:
            self._opt_step(t, name)

    def _count_nonfinite(self) -> None:
        """Add the skipped steps counted on the device (fused optimisers) to ``counters``, with a warning."""
        for name, n in self.nonfinite_pending.items():
            n = int(n)
            if n:
                self.counters[f"nonfinite_{name}"] += n
                logger.warning(
                    "%d non-finite %s gradient norm(s) up to iteration %d: those steps were skipped",
                    n,
                    name,
                    self.iteration,
                )
        self.nonfinite_pending.clear()

    def _opt_step(self, t: Trainee, name: str) -> None:
        """``t.opt.step()``; the first 8-bit AdamW step is announced and timed, because torchao compiles
        its update once per distinct parameter shape there (minutes at full size, silent otherwise)."""
        if t.stepped or self.cfg.optimizer.name != "adamw8bit":
            t.opt.step()
            t.stepped = True
            return
        shapes = {tuple(local_tensor(p).shape) for p in t.params}
        logger.info(
            "first %s optimiser step: torchao compiles its 8-bit AdamW update for each of %d parameter "
            "shapes (once per process; can take minutes at full size)",
            name,
            len(shapes),
        )
        start = time.time()
        try:
            t.opt.step()
        except Exception as e:  # torch.compile of torchao's update: errors depend on torch/torchao versions
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            master = self.cfg.precision.master
            hint = (
                "set precision.master=fp32 (8-bit states with fp32 weights) or optimizer.name=adamw"
                if master != "fp32"
                else "set optimizer.name=adamw"
            )
            raise SenseFlowError(
                f"optimizer.name=adamw8bit: torchao {importlib.metadata.version('torchao')} could not compile its 8-bit AdamW "
                f"update for {master} weights with torch {torch.__version__} ({type(e).__name__}: {first}); "
                f"{hint}"
            ) from e
        t.stepped = True
        logger.info("first %s optimiser step done in %.1fs", name, time.time() - start)

    def _gen_pred(self, x: torch.Tensor, level: torch.Tensor, cond, grad: bool) -> torch.Tensor:
        """Generator prediction; no-grad passes may run in fp32 (compat N5)."""
        if grad:
            with self._amp():
                return self.adapter.forward(self.G.net, x, level, cond)
        with torch.no_grad(), self._amp(not self.cfg.compat.generator_fp32_when_no_grad):
            return self.adapter.forward(self.G.net, x, level, cond)

    def _teacher_x0_fn(self, cond, uncond, scale):
        def fn(x_t, level):
            with self._amp():
                pred = self.adapter.guided(self.teacher, x_t, level, cond, uncond, scale)
            return self.schedule.x0_from_pred(x_t, pred, level)

        return fn

    def _x0_fn(self, net, cond):
        """Clean estimate of ``net`` (the fake score, or the teacher without guidance)."""

        def fn(x_t, level):
            with self._amp():
                pred = self.adapter.forward(net, x_t, level, cond)
            return self.schedule.x0_from_pred(x_t, pred, level)

        return fn

    def _teacher_pair_x0_fn(self, cond, uncond):
        """The teacher's conditional and unconditional clean estimates from one doubled batch."""

        def fn(x_t, level):
            with self._amp():
                both = self.adapter.forward(
                    self.teacher, torch.cat([x_t, x_t]), torch.cat([level, level]), cat_cond(uncond, cond)
                )
            pred_u, pred_c = both.chunk(2)
            return self.schedule.x0_from_pred(x_t, pred_c, level), self.schedule.x0_from_pred(
                x_t, pred_u, level
            )

        return fn

    def ca_levels(self, anchor_idx: torch.Tensor, cond_level: torch.Tensor) -> torch.Tensor:
        """Noise levels of the decoupled CA term (spec §17.1 steps 2-3): a descending-table index drawn
        uniformly between the generator's own position (+ ``ca_min_offset``) and ``ca_max_index``.

        The generator's position is its true σ (B4 fixed); ``compat.decoupled_legacy_ca_index`` reads the
        anchor's grid value as a timestep instead, as the fork did."""
        dc = self.d.decoupled
        tau = self.schedule.timesteps_for_model(self.schedule.sigmas_desc.to(self.device))
        if self.cfg.compat.decoupled_legacy_ca_index:
            target = self.anchor_grid[anchor_idx].float()
        else:
            target = self.schedule.timesteps_for_model(cond_level)
        j_gen = (tau[None, :] - target[:, None]).abs().argmin(dim=1)
        start = (j_gen + dc.ca_min_offset).clamp(max=dc.ca_max_index)
        u = torch.rand(anchor_idx.shape, generator=self.rng.noise, device=self.device)
        j_ca = start + (u * (dc.ca_max_index - start + 1)).floor().long()
        return self.schedule.table_level(j_ca.clamp(max=dc.ca_max_index), "descending")

    # --- generator input (spec §3) ------------------------------------------------------------------

    def _anchor_input(self, x_hat: torch.Tensor, anchor_idx: torch.Tensor) -> torch.Tensor:
        """Noise ``x_hat`` to each sample's anchor; the noisiest anchor is pure noise (spec §3.2 step 4:
        exact for flow matching at σ = 1, enforced for DDPM's t = 999 where √ᾱ is not 0)."""
        noise = self._randn(x_hat.shape)
        x = self.schedule.add_noise(x_hat, noise, self.anchor_levels[anchor_idx])
        first = (anchor_idx == 0).reshape(-1, *([1] * (x.dim() - 1)))
        return torch.where(first, noise, x)

    def generator_input(self, x0_real: torch.Tensor | None, cond, backsim_steps: int | None, batch: int):
        """Return ``(x_in, anchor_idx)``: backward simulation for ``backsim_steps`` anchors (spec §3.2), or
        real latents noised at a per-sample random anchor when ``backsim_steps`` is None (spec §3.3)."""
        n = batch
        if backsim_steps is not None:
            # the generator's own few-step x0 sampler over the first `backsim_steps` anchors, from pure
            # noise (for zero steps the final x̂ is that noise itself, spec §3.2 step 4)
            x_hat = self._randn((n, *self.latent_shape))
            if backsim_steps:
                x_hat = sample_x0(
                    lambda x, level: self._gen_pred(x, level, cond, grad=False),
                    x_hat,
                    self.anchor_levels[:backsim_steps],
                    self.schedule,
                    self._randn,
                )
            anchor_idx = torch.full((n,), backsim_steps, device=self.device, dtype=torch.long)
        else:
            x_hat = x0_real
            anchor_idx = torch.randint(
                0, len(self.d.anchors), (n,), generator=self.rng.noise, device=self.device
            )
        return self._anchor_input(x_hat, anchor_idx), anchor_idx

    def isg_levels(self, anchor_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample intermediate and end levels of each sample's segment (spec §7.1 steps 1-2)."""
        grid_prev_all = torch.cat([self.anchor_grid[1:], self.anchor_grid.new_zeros(1)])
        grid_now, grid_prev = self.anchor_grid[anchor_idx], grid_prev_all[anchor_idx]
        lo, hi = grid_prev + self.d.isg.margin, grid_now - self.d.isg.margin
        u = torch.rand(anchor_idx.shape, generator=self.rng.noise, device=self.device)
        grid_mid = lo + (u * (hi - lo + 1)).floor().long().clamp(max=(hi - lo))
        kind = self.d.timestep_grid
        level_mid = self.schedule.grid_to_level(grid_mid, kind)
        level_prev = self.schedule.grid_to_level(grid_prev, kind)
        if kind == "ascending_index" and not self.cfg.compat.sd35_isg_last_sigma_legacy:
            is_last = anchor_idx == len(self.d.anchors) - 1
            level_prev = torch.where(
                is_last, torch.full_like(level_prev, self.schedule.clean_level), level_prev
            )
        return level_mid, level_prev

    # --- one iteration ------------------------------------------------------------------------------

    def _real_inputs(self, batch: dict[str, Any], backsim: bool):
        """Real latents (when needed) and real images (when the discriminator needs them) of a batch.

        JSON data carries images, which are VAE-encoded; DMD2's LMDB carries latents, which are decoded
        for the discriminator (spec §9.3)."""
        need_latent = not backsim or self.d.classifier.enabled
        with torch.no_grad():
            if "latent" in batch:
                x0_real = batch["latent"].to(self.device, non_blocking=True)
                images = self.adapter.decode_latents(x0_real) if self.disc is not None else None
            else:
                images = batch["image"].to(self.device, non_blocking=True)
                x0_real = self.adapter.encode_images(images, self.rng.noise) if need_latent else None
        return x0_real, images

    def run_iteration(self, k: int, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Train one loop iteration ``k`` on ``batch``; returns its metrics (device tensors)."""
        d = self.d
        gen_step = k % d.generator_period == 0
        if self.compile_modes:
            # a new CUDA-graph step (reduce-overhead and max-autotune replay CUDA graphs; a no-op otherwise):
            # the previous iteration's graph outputs are dead
            torch.compiler.cudagraph_mark_step_begin()
        backsim = torch.rand(1, generator=self.rng.control).item() < d.backsim_prob
        steps = int(torch.randint(0, len(d.anchors), (1,), generator=self.rng.control)) if backsim else None
        prompts = list(batch["prompt"])
        n = len(prompts)
        save = bool(self.cfg.train.image_interval) and k % self.cfg.train.image_interval == 0
        if self.park_teacher is not None and (gen_step or save):
            self.park_teacher.unpark()  # on a side stream: overlaps the phases before the teacher's first use
        with torch.no_grad(), self.timer.phase("text_encode"):
            cond = self.adapter.encode_prompts(prompts)
            uncond = self.adapter.empty_cond(n)
            self.adapter.reshard_text_encoders()
        with self.timer.phase("vae_encode"):
            x0_real, images = self._real_inputs(batch, backsim)
        with self.timer.phase("backward_simulation"):
            x_in, anchor_idx = self.generator_input(x0_real, cond, steps, n)
        level, cond_level = self.anchor_levels[anchor_idx], self.anchor_cond_levels[anchor_idx]
        metrics: dict[str, torch.Tensor] = {"gen/backsim": torch.tensor(float(backsim))}
        with self.timer.phase("disc_conditioning"):
            adv = self.adversarial_inputs(prompts, images, anchor_idx) if self.disc is not None else None

        image_gen = None
        if gen_step:
            x0_gen, image_gen, m = self.generator_step(x_in, level, cond_level, anchor_idx, cond, uncond, adv)
            metrics.update(m)
            if self.park_teacher is not None and not save:
                self.park_teacher.park()  # before the fake step, whose peak it would otherwise raise
        else:
            with self.timer.phase("gen_forward"):
                pred = self._gen_pred(x_in, cond_level, cond, grad=False)
                x0_gen = self.schedule.x0_from_pred(x_in, pred, level)
        if self.gathered_G:  # model.keep_generator_gathered: the generator's passes are over
            reshard_all(self.G.net)
        if gen_step or self.cfg.compat.lr_schedule_per_iteration:
            with warnings.catch_warnings():  # stepping the schedule without an optimiser step is intended
                warnings.filterwarnings(
                    "ignore", message="Detected call of `lr_scheduler.step", category=UserWarning
                )
                self.G.sched.step()
        with self.timer.phase("fake_step"):
            metrics.update(self.fake_step(x0_gen.detach(), cond, x0_real))
        if adv is not None:
            if image_gen is None:
                with torch.no_grad(), self.timer.phase("vae_decode"):
                    image_gen = self.adapter.decode_latents(x0_gen)
            with self.timer.phase("disc_step"):
                metrics.update(self.disc_step(image_gen, images, adv))
        metrics["lr"] = torch.tensor(self.F.sched.get_last_lr()[0])
        if save:
            real = images if images is not None else self.adapter.decode_latents(x0_real)
            self.save_images(k, x_in, level, x0_gen, cond, uncond, real)
        if self.park_teacher is not None:
            self.park_teacher.park()
        return metrics

    def classifier_logits(self, x0: torch.Tensor, cond) -> torch.Tensor:
        """DMD2's "diffusion GAN" classifier (spec §9.6): noise ``x0`` at a fresh ``t ~ U{0..T−1}``, run
        the fake UNet's encoder (bf16 autocast) and the head (fp32). Gradient flows to ``x0``."""
        n = x0.shape[0]
        t = torch.randint(
            0, self.d.classifier.max_timestep, (n,), generator=self.rng.noise, device=self.device
        )
        x_t = self.schedule.add_noise(x0, self._randn(x0.shape), t.float())
        with self._amp():
            feats = self.adapter.bottleneck(self.F.net, x_t, t.float(), cond)
        return self.F.net.cls_head(feats)

    def generator_step(
        self, x_in, level, cond_level, anchor_idx, cond, uncond, adv
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """ISG + DM + adversarial loss, one backward and step of ``G``, then IDA (spec §1.2 steps 4-7).

        ``level`` noised ``x_in`` and recovers x0; ``cond_level`` conditions the generator (they differ only
        under ``compat.flux_bf16_sigma``). Returns the detached sample, its decoded image (None without
        discriminator) and metrics.
        """
        if self.park_fake is None:
            return self._generator_step(x_in, level, cond_level, anchor_idx, cond, uncond, adv)
        with self.timer.phase("fake_state_offload"):
            self.park_fake.offload()  # overlapped (optimizer.offload_overlap): freed before the backward
        try:
            return self._generator_step(x_in, level, cond_level, anchor_idx, cond, uncond, adv)
        finally:
            with self.timer.phase("fake_state_offload"):
                self.park_fake.load()  # overlapped: awaited before the fake score's optimiser step

    def _generator_step(self, x_in, level, cond_level, anchor_idx, cond, uncond, adv):
        """:meth:`generator_step` with the fake score's states wherever they are."""
        d, phase = self.d, self.timer.phase
        with phase("gen_forward"):
            pred = self._gen_pred(x_in, cond_level, cond, grad=True)
            x0 = self.schedule.x0_from_pred(x_in, pred, level)
        metrics: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=self.device)
        if d.isg.weight > 0:
            with phase("isg"):
                isg, m = self._isg_term(x_in, pred, cond_level, anchor_idx, cond, uncond)
            loss = loss + d.isg.weight * isg
            metrics.update(m)
        with phase("dm"):
            dm, m = self._dm_term(x0, cond_level, anchor_idx, cond, uncond)
        loss = loss + dm
        metrics.update(m)
        if d.classifier.gen_weight > 0:
            # DMD2 generator term; the fake UNet's and head's gradients from it are discarded below
            with phase("classifier"):
                cls = d.classifier.gen_weight * dmd2_generator_loss(self.classifier_logits(x0, cond))
            loss = loss + cls
            metrics["loss/cls_gen"] = cls.detach()
        image = None
        if adv is not None:
            with phase("gan_generator"):
                gan, image = self._gan_term(x0, adv)
            loss = loss + gan
            metrics["loss/gan"] = gan.detach()
        metrics["loss/gen"] = loss.detach()
        if self.park_fake is not None:
            with phase("fake_state_offload"):
                self.park_fake.release()
        with phase("gen_backward_step"):
            metrics["grad_norm/gen"] = self._step(self.G, [loss], "gen")
        if self.disc is not None and not self.cfg.compat.d_grad_leak:
            self.disc.heads.requires_grad_(True)
            # Nothing to drop when the heads were frozen. Sharded heads: FSDP2 carries requires_grad over
            # to the gathered parameters at each unshard in the torch versions checked; should one not,
            # a gradient that reached them is dropped here.
            self.D.opt.zero_grad(set_to_none=True)
        self.F.opt.zero_grad(set_to_none=True)
        if d.ida.enabled:
            with phase("ida"):
                implicit_distribution_alignment_(self.F.net, self.G.net, d.ida.lam)
        return x0.detach(), image, metrics

    def _isg_term(self, x_in, pred, cond_level, anchor_idx, cond, uncond):
        """ISG loss of the generator's prediction ``pred`` at ``x_in`` (spec §7)."""
        d = self.d
        level_mid, level_prev = self.isg_levels(anchor_idx)
        scale = self._uniform(d.isg.guidance, x_in.shape[0])

        def teacher_pred(x, lv):
            with self._amp():
                return self.adapter.guided(self.teacher, x, lv, cond, uncond, scale)

        # called under no_grad inside the loss; bf16 autocast as the original (spec §7.1)
        gen_pred = lambda x, lv: self._gen_pred(x, lv, cond, grad=True)  # noqa: E731
        args = (x_in, pred, cond_level, level_mid, level_prev, teacher_pred, gen_pred)
        if self.cfg.compat.sdxl_isg_legacy and d.timestep_grid == "ddpm":
            return sdxl_legacy_isg_loss(
                *args, self.schedule.x0_from_pred, self.schedule.add_noise, c=d.isg.huber_c
            )
        return intra_segment_guidance_loss(
            *args, step_fn=self.schedule.step, kind=d.isg.loss, c=d.isg.huber_c
        )

    def _dm_term(self, x0, cond_level, anchor_idx, cond, uncond):
        """Distribution-matching loss (spec §4), or the decoupled variant (spec §17)."""
        d, n = self.d, x0.shape[0]
        if d.decoupled.enabled:
            return decoupled_dmd_loss(
                x0,
                self._sample_levels(d.dm.timesteps, n),
                self.ca_levels(anchor_idx, cond_level),
                self._randn(x0.shape),
                self._randn(x0.shape),
                self._uniform(d.dm.guidance, n),
                self.schedule.add_noise,
                teacher_x0_fn=self._teacher_pair_x0_fn(cond, uncond),
                teacher_cond_x0_fn=self._x0_fn(self.teacher, cond),
                fake_x0_fn=self._x0_fn(self.F.net, cond),
                legacy_sign=self.cfg.compat.decoupled_legacy_sign,
                eps=d.decoupled.eps,
            )
        return distribution_matching_loss(
            x0,
            self._randn(x0.shape),
            self._sample_levels(d.dm.timesteps, n),
            self.schedule.add_noise,
            real_x0_fn=self._teacher_x0_fn(cond, uncond, self._uniform(d.dm.guidance, n)),
            fake_x0_fn=self._x0_fn(self.F.net, cond),
            normalizer_eps=d.dm.normalizer_eps,
        )

    def _gan_term(self, x0, adv) -> tuple[torch.Tensor, torch.Tensor]:
        """Time-weighted hinge loss of the generator through the differentiable VAE decode (spec §8.7);
        returns it and the detached decoded image (reused by the discriminator step)."""
        image = self.adapter.decode_latents(x0)  # differentiable decode (checkpointed VAE)
        if not self.cfg.compat.d_grad_leak:
            # B1 fixed: the heads get no gradient from this loss. Sharded heads too: between passes their
            # registered parameters are the sharded ones (each head is a non-root FSDP2 unit, resharded
            # after forward and backward), whose requires_grad FSDP2 copies onto the all-gathered
            # parameters at every unshard. With the leak, FSDP2 reduce-scatters this gradient into the
            # sharded gradients, where the D step's accumulates, as replicated heads' local gradients do.
            self.disc.heads.requires_grad_(False)
        with self._amp():
            logits = self.disc(image, adv.text, adv.ref, generator=self.rng.noise)
        return self.d.gan.weight * (adv.weight * hinge_g(logits)).mean(), image.detach()

    def fake_step(self, x0_gen: torch.Tensor, cond, x0_real: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Denoising step of the fake score on detached generator samples (spec §5), plus DMD2's
        classifier terms on generated and real latents when the recipe has them (spec §9.6)."""
        n = x0_gen.shape[0]

        def pred_fn(x, lv):
            with self._amp():
                return self.adapter.forward(self.F.net, x, lv, cond)

        loss, metrics = fake_score_loss(
            x0_gen,
            self._randn(x0_gen.shape),
            self._sample_levels(self.d.fake.timesteps, n),
            self.schedule.add_noise,
            pred_fn,
            self.schedule.pred_target,
        )
        if self.d.classifier.fake_weight > 0:
            cls = self.d.classifier.fake_weight * dmd2_classifier_loss(
                self.classifier_logits(x0_gen, cond), self.classifier_logits(x0_real, cond)
            )
            loss = loss + cls
            metrics["loss/cls_fake"] = cls.detach()
        metrics["grad_norm/fake"] = self._step(self.F, [loss], "fake")
        self.F.sched.step()
        return metrics

    def adversarial_inputs(self, prompts: list[str], images: torch.Tensor, anchor_idx: torch.Tensor):
        """CLIP text, reference-image features (once per iteration, spec §8.9) and time weights."""
        with torch.no_grad():
            ref = images
            if not self.cfg.compat.reference_is_real_input:
                # B15 corrected (minimal form suggested by the spec): augment the reference
                # independently, so "input equals reference" is no longer a shortcut for D
                ref = self.disc.augmented(images, self.rng.noise)
            with self._amp():
                ref_feats = self.disc.reference_features(ref)
            return Adversarial(self.disc.encode_text(prompts), ref_feats, self.gan_weights[anchor_idx])

    def disc_step(self, image_fake: torch.Tensor, image_real: torch.Tensor, adv) -> dict[str, torch.Tensor]:
        """Hinge step of the heads: real pass, then fake pass, time-weighted (spec §8.7). The frozen DINOv2
        runs once over both batches (no gradient reaches it here); the heads see each pass on its own."""
        with self._amp():
            feats_real, feats_fake = self.disc.paired_features(
                image_real, image_fake.detach(), self.rng.noise
            )
            logits_real = self.disc.logits(feats_real, adv.text, adv.ref)
        loss_real = (adv.weight * hinge_d_real(logits_real)).mean()
        self._backward(self.D, loss_real, last=False)
        with self._amp():
            logits_fake = self.disc.logits(feats_fake, adv.text, adv.ref)
        loss_fake = (adv.weight * hinge_d_fake(logits_fake)).mean()
        norm = self._step(self.D, [loss_fake], "disc")
        self.D.sched.step()
        return {
            "loss/disc_real": loss_real.detach(),
            "loss/disc_fake": loss_fake.detach(),
            "disc/logits_real": logits_real.detach().float().mean(),
            "disc/logits_fake": logits_fake.detach().float().mean(),
            "grad_norm/disc": norm,
        }

    # --- images -------------------------------------------------------------------------------------

    @torch.no_grad()
    def save_images(self, k, x_in, level, x0_gen, cond, uncond, images: torch.Tensor) -> None:
        """Strip of generator output, teacher x0, fake x0 (at the generator's input) and real images.

        Every rank runs the forwards (they are collectives under FSDP); rank 0 writes the PNG.
        """
        n = x_in.shape[0]
        scale = torch.full((n,), sum(self.d.dm.guidance) / 2, device=self.device)
        x0_teacher = self._teacher_x0_fn(cond, uncond, scale)(x_in, level)
        x0_fake = self._x0_fn(self.F.net, cond)(x_in, level)
        rows = [self.adapter.decode_latents(z) for z in (x0_gen, x0_teacher, x0_fake)]
        if self.info.is_main:
            out = self.save_dir / "images"
            out.mkdir(exist_ok=True)
            grid = image_grid([*rows, images.float()], ["generator", "teacher x0", "fake x0", "real"])
            grid.save(out / f"iter_{k:07d}.png")
            self.metrics.image("images/strip", out / f"iter_{k:07d}.png", k)

    # --- checkpointing ------------------------------------------------------------------------------

    def _dcp_state(self) -> dict[str, Any]:
        """Sharded states of every trained net and optimiser (torch.distributed.checkpoint).

        Sharded discriminator heads need no reshard: their root owns no parameters, and each head, a
        non-root FSDP2 unit, reshards after every forward."""
        reshard(self.G.net, self.F.net)
        state = {}
        for name, t in self._trainees().items():
            if t.offload is not None:
                t.offload.load()  # the caller offloads again (save_checkpoint, resume)
            state[name] = get_model_state_dict(t.net)
            state[f"opt_{name}"] = get_optimizer_state_dict(t.net, t.opt)
        return state

    def _trainees(self) -> dict[str, Trainee]:
        return {"generator": self.G, "fake": self.F, **({"disc": self.D} if self.D is not None else {})}

    def _common_state(self) -> dict[str, Any]:
        """State identical on every rank (written once by rank 0)."""
        self._count_nonfinite()
        return {
            "iteration": self.iteration,
            "loader": self.loader.state_dict(),
            "schedulers": {name: t.sched.state_dict() for name, t in self._trainees().items()},
            "counters": dict(self.counters),
        }

    def save_checkpoint(self) -> None:
        """Collective: write the full training state and the exported generator."""
        export = full_state_dict(self.G.net) if self.cfg.checkpoint.export_generator else None
        self.ckpt.save(
            self.iteration,
            self._dcp_state(),
            common=self._common_state(),
            per_rank={"rng": self.rng.state_dict()},
            meta={"recipe": self.cfg.recipe, "time": time.time()},
            export=export if self.info.is_main else None,
        )
        self._offload_states()

    def resume(self) -> bool:
        """Load the newest complete training state, if any; returns whether it resumed."""
        path = self.ckpt.latest() if self.cfg.checkpoint.enabled else None
        if path is None:
            return False
        state = self._dcp_state()
        common, per_rank, meta = self.ckpt.load(path, state)
        for name, t in self._trainees().items():
            set_model_state_dict(t.net, state[name])
            set_optimizer_state_dict(t.net, t.opt, state[f"opt_{name}"])
            t.sched.load_state_dict(common["schedulers"][name])
        self.iteration = int(common["iteration"])
        self.counters.update(common["counters"])
        if per_rank is not None:
            self.rng.load_state_dict(per_rank["rng"])
            self.loader.load_state_dict(common["loader"])
        else:
            # resumed on a different world size: fresh streams derived from the step, next epoch
            self.rng = RandomStreams(
                self.cfg.train.seed + self.iteration,
                self.info.rank,
                self.device,
                self.cfg.compat.shared_noise_across_ranks,
            )
            self.loader.load_state_dict({"epoch": common["loader"]["epoch"] + 1, "batches": 0})
        self._offload_states()
        logger.info("resumed from %s at iteration %d", path, self.iteration)
        return True

    def _agreed_stop(self, stop: StopRequest, k: int) -> int:
        """The stop signal's number once every rank knows of it, else 0: checked after each iteration in
        one process, at each ``train.log_interval`` under several (all ranks must stop at the same
        iteration to write one checkpoint)."""
        if self.info.world_size == 1:
            return stop.signum or 0
        if k % self.cfg.train.log_interval:
            return 0
        return all_reduce_max_int(stop.signum or 0, self.device)

    def _stop(self, signum: int, saved: bool) -> None:
        """Write a checkpoint (unless this iteration already did) and raise :class:`TrainingStopped`."""
        k = self.iteration
        if not self.cfg.checkpoint.enabled:
            raise TrainingStopped(
                f"stopped by signal {signum} at iteration {k}; checkpoint.enabled=false, nothing saved",
                signum,
            )
        if not saved:
            self.save_checkpoint()
        raise TrainingStopped(
            f"stopped by signal {signum} at iteration {k} of {self.cfg.train.iter_num} after writing its "
            f"checkpoint in {self.save_dir / 'checkpoints'}: run the same command again to resume",
            signum,
        )

    def _stopped_unsaved(self, signum: int) -> TrainingStopped:
        """The error of a stop while the state in memory is the one on disk (nothing new to save)."""
        k = self.iteration
        return TrainingStopped(
            f"stopped by signal {signum} in iteration {k + 1} of {self.cfg.train.iter_num}, with nothing new "
            + (
                "to save (no iteration done yet): run the same command again to start"
                if k == 0
                else f"to save (the checkpoint of iteration {k} holds this state): run the same command "
                "again to resume"
            ),
            signum,
        )

    def _offload_states(self) -> None:
        for t in self._trainees().values():
            if t.offload is not None:
                t.offload.offload()

    # --- the loop -----------------------------------------------------------------------------------

    def train(self) -> None:
        """Resume if possible, then iterate to ``train.iter_num`` with logging and checkpoints; on a stop
        signal (:mod:`senseflow.stop`) checkpoint and raise :class:`TrainingStopped`."""
        cfg = self.cfg
        self.resume()
        with contextlib.ExitStack() as stack:
            stack.callback(self.metrics.close)
            trace = bar = None
            if cfg.log.trace_data:
                path = self.save_dir / f"data_trace_rank{self.info.rank}.jsonl"
                trace = stack.enter_context(path.open("a"))
            if self.info.is_main and cfg.log.progress_bar:
                from tqdm import tqdm

                bar = tqdm(
                    total=cfg.train.iter_num, initial=self.iteration, desc=cfg.recipe, dynamic_ncols=True
                )
                stack.callback(bar.close)
            stop = stack.enter_context(StopRequest())
            t_last, k_logged = time.time(), self.iteration
            on_disk = self.iteration  # the iteration whose state is the newest on disk (or the start's)
            loader = iter(self.loader)
            while self.iteration < cfg.train.iter_num:
                k = self.iteration + 1
                try:
                    if self.iteration == on_disk:
                        # nothing new to save: a signal stops at once (e.g. in the first compilation)
                        if stop.requested:  # caught before training (by an enclosing StopRequest)
                            raise self._stopped_unsaved(stop.signum)
                        stop.immediate = True
                    batch = next(loader)
                    self.counters["skipped_images"] += int(batch["skipped"].sum())
                    if trace is not None:
                        trace.write(json.dumps({"iter": k, "keys": list(batch["key"])}) + "\n")
                    metrics = self.run_iteration(k, batch)
                    stop.immediate = False  # iteration k is not on disk yet
                except StopNow as now:
                    raise self._stopped_unsaved(now.signum) from None
                self.iteration = k
                self.metrics.add(metrics)
                signum = self._agreed_stop(stop, k)
                last = k == cfg.train.iter_num
                if k % cfg.train.log_interval == 0 or last or signum:
                    self._count_nonfinite()
                    now = time.time()
                    record = self.metrics.flush(
                        k, {"sec_per_iter": (now - t_last) / (k - k_logged), **self.counters}
                    )
                    t_last, k_logged = now, k
                    if bar is not None:
                        bar.set_postfix(
                            {key: f"{record[key]:.4g}" for key in ("loss/fake", "loss/dm") if key in record}
                        )
                if bar is not None:
                    bar.update(1)
                saved = cfg.checkpoint.enabled and (k % cfg.train.save_interval == 0 or last)
                if saved:
                    self.save_checkpoint()
                    on_disk = k
                if signum and not last:
                    self._stop(signum, saved)
        logger.info("training finished at iteration %d (%s)", self.iteration, self.save_dir)
