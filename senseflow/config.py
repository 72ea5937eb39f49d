"""Typed configuration: nested dataclasses, YAML loading with ``base:`` inheritance, dotted overrides.

Every number of the method is a named field here; the defaults are the SenseFlow SD3.5 Medium recipe
(R1 in the spec) and the YAML files in ``configs/`` state every recipe's values explicitly. Unknown
keys are rejected naming the file and the key; cross-field mistakes raise :class:`ConfigError` naming
the key to change; the resolved config is written into the run directory.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .discriminator.config import DiscriminatorConfig
from .errors import ConfigError


@dataclass
class PathsConfig:
    """Local paths to weights and data (``tiny:<name>`` selects a built-in tiny asset)."""

    pretrained_model: str = ""
    """Teacher directory in diffusers layout (e.g. stable-diffusion-3.5-medium)."""
    dataset: str = ""
    """JSON dataset file with equally long lists ``keys``, ``image_paths``, ``prompts``."""
    dino: str = ""
    """DINOv2 ViT-L/14 directory in the transformers layout (facebook/dinov2-large); discriminator backbone."""
    clip: str = ""
    """OpenAI CLIP ViT-L/14 weights file loadable by open_clip; discriminator text conditioning."""
    flux_wo_guidance_embed: str = ""
    """FLUX only, optional: a transformer folder with guidance_embeds false for the student (the original's
    recipe); empty builds it from the teacher by dropping the guidance embedder."""
    text_embeddings: str = ""
    """Optional: an LMDB folder of the dataset's prompt embeddings, built beforehand with
    ``python -m senseflow.data.text_cache CONFIG`` (``senseflow/data/text_cache.py``). Set, the run reads
    them and never loads the teacher's text encoders (SD3.5 and FLUX: 10.4 GiB of bf16 weights per GPU
    unsharded, and their forward in every iteration: 44 ms per iteration on 1 x H200, 163 ms on 2 x H200
    with ``model.shard_text_encoders``); empty, prompts are encoded in every iteration."""


@dataclass
class ModelConfig:
    """Which teacher family and how its components are built."""

    family: str = "sd3"
    """Teacher adapter: ``sd3`` (SD3.5 Medium/Large), ``flux`` (FLUX.1-dev) or ``sdxl`` (SDXL base 1.0)."""
    random_init: bool = False
    """Build components from their config.json with random weights instead of loading weights (benchmarks)."""
    t5_max_length: int = 77
    """T5 token length of the prompt encoding (SD3.5: 77, spec §11; FLUX: 512, spec §10)."""
    shard_text_encoders: bool = False
    """Shard the frozen text encoders over the ranks with FSDP2 (per layer) instead of keeping a full copy
    on every GPU: T5-XXL in bf16 (SD3.5, FLUX) is 9.1 GiB per GPU replicated, 9.1/N sharded, at the cost of
    all-gathering its layers at every prompt encoding: on 2 x H200 (SD3.5 Medium, with 8-bit AdamW) prompt
    encoding went from 43 to 168 ms per iteration, and the memory saved matched the prediction
    (``benchmarks/NOTES.md``). Same outputs. No effect in a single process."""
    vae_split_group_norm: bool = True
    """The VAE's GroupNorm layers compute their statistics with torch's split reductions on fp32 CUDA
    inputs (``senseflow/kernels.py``) instead of torch's GroupNorm kernel, which runs one thread block per
    (image, group) and is slow on a batch of one 1024-px image. The same fp32 arithmetic, up to the
    summation order. Measured on an H200 (``tools/gn_bench.py``): forward 3.7 → 1.7 ms at 128 x 1024²,
    forward + backward 5.4 → 6.3 ms; SD3.5 Medium's no-gradient decode 114 → 88 ms, encode 79 → 39 ms."""
    vae_math_attention: bool = False
    """The VAE's mid-block attention (16,384 tokens at 1024 px) runs on torch's math backend of
    ``scaled_dot_product_attention``, matrix products in TF32 (``precision.tf32``), instead of the fp32
    memory-efficient kernel the original enabled, which uses no tensor cores (13.5 ms per pass on an H200).
    The attention matrix is materialised: 1 GiB per 1024-px image, also saved during the differentiated
    decode's backward. TF32 rounding, as the VAE's convolutions. Measured on one H200 (SD3.5 VAE, fp32,
    ``tools/vae_probe.py``): encode 54.5 -> 43.3 ms, decode 85.6 -> 74.2 ms, decode and backward 298 ->
    241 ms, the same peaks; with ``model.compile_vae`` see there. On in the SD3.5 configs."""
    compile_vae: bool = False
    """``torch.compile`` the VAE's encoder and decoder (default mode; about a minute of compilation in the
    first iterations). The compiler fuses the GroupNorm, SiLU and residual operators around each
    convolution: at one 1024-px image the eager VAE spends about half its GPU time in such element-wise
    kernels. The differentiated decode keeps its checkpointing. Same arithmetic up to fused-kernel
    rounding. Measured on one H200 (SD3.5 VAE, fp32, with ``model.vae_math_attention``,
    ``tools/vae_probe.py``): encode 43.3 -> 23.5 ms, decode 74.2 -> 41.7 ms, decode and backward 241 ->
    140 ms, the differentiated decode's peak 15.7 -> 13.2 GiB. On in the SD3.5 configs (not the tiny
    CPU ones)."""
    keep_generator_gathered: bool = False
    """Keep the generator's all-gathered compute-dtype weights from its first forward of an iteration until
    the end of its passes (before the fake-score step), instead of freeing each block after every pass:
    the later passes (backward-simulation steps, the generator's forward, ISG's second forward, the
    backward's recomputation) skip FSDP2's all-gather and its per-parameter casts, which the host issues
    more slowly than the GPU runs them (``benchmarks/NOTES.md``). Costs 2 bytes per generator parameter
    (bf16) on every GPU in those phases (SD3.5 Medium: 4.2 GiB). Same results. Measured (SD3.5 Medium,
    1 x H200, with the lean single-GPU options): 1.15 against 1.20 s/it, within the run-to-run spread."""
    offload_teacher: bool = False
    """Keep the frozen teacher's weights (bf16; SD3.5 Medium 4.2 GiB, divided by the number of GPUs) in
    pinned host memory except in generator iterations (one in ``distill.generator_period``) and image-strip
    iterations, the only ones that run it. They are copied back at the start of such an iteration, on a
    side CUDA stream that overlaps the phases before the teacher's first forward, and freed at its end;
    the host copy is taken once (the teacher never changes). Same results. Measured (SD3.5 Medium, 1 x
    H200, with precomputed prompt embeddings): peak 55.4 GiB instead of 59.6, in the fake-score step."""
    shard_discriminator: bool = False
    """Shard the VFM discriminator's trainable heads over the ranks with FSDP2 (per head, fp32) instead of
    replicating them on every GPU: their fp32 weights, gradients and AdamW states take 16 bytes per
    parameter (11.5 GiB for the 0.77 B parameters of the full-size heads), of which sharding saves
    (1 − 1/N)·16 bytes per parameter on each of N GPUs. The gradient all-reduce becomes a reduce-scatter,
    but each head's weights are all-gathered in every discriminator forward and backward (three passes
    per generator iteration, two otherwise): about 3-4x the bytes of the all-reduce it replaces. Same
    losses and updates; the frozen DINOv2 and CLIP stay replicated. The memory and time effect is
    predicted, not yet measured on GPUs. No effect in a single process."""
    gradient_checkpointing: bool = True
    """Activation checkpointing of the trained transformers' blocks and of the VAE decoder."""
    compile_mode: str | None = None
    """``torch.compile`` mode of the generator's and fake score's compiled blocks (``model.compile_blocks``),
    e.g. ``reduce-overhead``: each block's graphs are replayed as CUDA graphs, one launch instead of hundreds
    of kernels issued by the host, which sets the pace of a 1024-px iteration at one image per GPU. The
    engine marks each iteration as a new CUDA-graph step. Measured on one H200 (SD3.5 Medium, the 1-GPU
    command of the README): fake-score step 174-255 ms (budget alone) -> 145 ms, 0.70 and 0.75 s/it at 55.7 GiB (56.7
    without); on an H200 the tiny recipe logs the losses of a run without it (``tests/test_compile.py``).
    Unsharded nets only (a single process, or ``model.fsdp=never``, not measured on several GPUs): FSDP2
    moves the weights at every pass, so sharded nets refuse it. The teacher's blocks keep the default mode
    (``model.offload_teacher`` moves its weights). ``null``: torch's default mode. Memory: a graph's replay
    allocates nothing, so ``torch.cuda.max_memory_allocated`` leaves out what the graphs' private pools hold;
    the 1-GPU command with CUDA graphs reported 54.8 GiB allocated and 70.8 reserved, and ran out of memory
    under a 58 GiB cap (``python -m senseflow.bench --memory-cap 58``), where it runs without them."""
    activation_memory_budget: float | None = None
    """With ``model.compile_blocks``: the trained transformers' blocks are not wrapped in
    ``torch.utils.checkpoint``; instead the compiler chooses what each block's backward recomputes, keeping
    the activations the block saves within this fraction of what it saves with no recomputation
    (``torch._functorch.config.activation_memory_budget``, set while the blocks are compiled: 1.0 saves
    all, 0 recomputes all it can). The recomputation then runs inside the block's compiled backward, with no
    checkpoint hooks on the host, and cheap operators are recomputed rather than matrix products. Measured
    on one H200 (full-size SD3.5 Medium transformer, one 1024-px image, fp32 weights under bf16 autocast,
    ``tools/ckpt_probe.py``): a forward and backward took 188 ms with the blocks checkpointed, 172 ms with
    no recomputation (+3.3 GiB, host-bound), 135 ms with a budget of 0.3, at the checkpointed peak; on a
    slower host 205-250 ms checkpointed, 159 / 174 / 166 ms at budgets 0.3 / 0.1 / 0.5. In the SD3.5 configs.
    The generator's saved activations during the GAN term rose by 0.7 GiB (1-GPU bench peak 56.7 GiB).
    ``null`` (or ``compile_blocks=false``): ``model.gradient_checkpointing`` checkpoints the blocks.
    Same arithmetic up to fused-kernel rounding. The VAE decoder stays under ``gradient_checkpointing``.
    cuDNN's attention is saved for the backward, not recomputed (torch's partitioner recomputed it: a
    full-size SD3.5 Medium pass on an H200 119.5 -> 108.8 ms of GPU time at the same peak; the 1-GPU bench's
    fake-score step 146 -> 138 ms).
    Modules of one class compiled under different budgets get graphs of their own."""
    fake_activation_memory_budget: float | None = None
    """The fake score's own activation memory budget (see ``model.activation_memory_budget``); ``null``: the
    same as the generator's. The fake score is differentiated only in its own step, where the 1-GPU peak
    is lower than in the generator's GAN term (SD3.5 Medium, 1 x H200: 46.0 against 54.8 GiB), so it can
    save more (1.0: all, no recomputation; +3.3 GiB at 1024 px) while the generator keeps recomputing.
    Measured there with CUDA graphs (``model.compile_mode=reduce-overhead``): 1.0 took the fake-score step
    from 138 to 124 ms and the run from 0.530 to 0.519 s/it, with 87.3 GiB reserved instead of 70.8 (the
    saved activations and separate graphs; not analysed further). Not in the configs."""
    cudnn_attention: bool = True
    """Leave cuDNN's fused attention among the backends torch may pick for ``scaled_dot_product_attention``
    in training (torch's default). The FLUX recipe sets it false: on H200 with torch 2.11 (CUDA 13.0) the
    cuDNN backward hit an illegal memory access in FLUX.1-dev's joint attention at 1024 px (24 heads of
    dim 128, 4,608 tokens); flash attention, used instead, ran it. The SD3.5 and SDXL recipes ran with
    it. Inference keeps torch's default choice."""
    compile_blocks: bool = False
    """``torch.compile`` every transformer block of the generator, fake score and teacher (the FSDP2 units;
    FSDP2's hooks stay outside the compiled code). The blocks of one model share their compiled graphs:
    a few per block kind, gradient mode and batch size, compiled in the first iterations (minutes at
    full size). Eager blocks dispatch thousands of small operators per pass, so at one 1024-px image per
    GPU the host, not the GPU, sets the pace (``python -m senseflow.bench --profile``). Same arithmetic
    up to fused-kernel rounding. On in the SD3.5 and FLUX configs (measured on 2 x H200, with
    ``discriminator.compile_heads``: SD3.5 Medium 1.38 -> 1.03 s/it, SD3.5 Large 2.59 s/it, FLUX 3.74 ->
    3.30 s/it, same peaks); off for SDXL (not measured) and the tiny CPU configs."""
    fsdp_blocks_per_unit: int = 1
    """Consecutive transformer blocks that form one FSDP2 unit of the generator, fake score and teacher (and
    of the text encoders' layers under ``model.shard_text_encoders``). A unit's parameters are all-gathered
    in one collective before its first block runs and freed after its last, and its gradients are
    reduce-scattered in one collective: FSDP2's work per unit (collectives, their buffers and stream
    synchronisation, the hooks' bookkeeping) is paid once per unit instead of once per block, while its
    work per parameter (copies into and out of the collectives' buffers, casts to the compute dtype,
    swapping the registered parameters) stays. Measured on a CPU (gloo, one process, 24 tiny SD3 blocks,
    forward and backward; the copies run on the host there): FSDP2 added 42 ms to 43 ms of fp32 compute with
    one block per unit and 34 ms with 8 (about a quarter of its host time is per unit); with the bf16
    policy there was no gain (143, 138, 149, 180 ms at 1, 2, 4, 8 blocks per unit). On 2 x H200 (SD3.5
    Medium, compiled, all memory options; ``benchmarks/NOTES.md``) 2 blocks per unit gave no speed gain
    (non-generator iterations 1.00 against 0.97 s) at the same 46.4 GiB peak; it is meant for slower
    interconnects (several nodes), where fewer, larger collectives pay. The cost is memory: a unit of n
    blocks holds the unsharded parameters (in backward also the unsharded gradients) of n blocks at once,
    about n times the per-block working set, and twice that while the next unit is prefetched. Blocks with
    a precision of their own (DMD2's classifier head) stay units of their own, SDXL's up blocks start a
    new unit, and the last unit may be shorter. Same losses and updates up to the summation order of some
    gradients; parameter names, state dicts and checkpoints unchanged. 1 is one unit per block (the
    previous behaviour); the discriminator heads stay one unit each."""
    fsdp: str = "auto"
    """FSDP2 for the generator, fake score and teacher: ``auto`` shards them under several processes and
    not in a single one, where there is nothing to shard; ``always`` shards them in a single process too
    (the behaviour before this option); ``never`` replicates them on every rank instead (data parallel, as
    DDP does): each rank holds the whole nets, their gradients and optimiser states, as a single GPU does,
    and the gradients are averaged over the ranks while the backward runs, in 64 MiB buckets whose
    buffers the gradients are views of (``senseflow.distributed.GradReducer``; reduced in fp32), so every
    rank takes the same step. It needs the 1-GPU memory on every GPU, for the 1-GPU speed
    per rank (no work per block and pass), the way to scale throughput with the GPU count when the nets and
    their states fit on one GPU. Unsharded, they are plain modules: fp32 master weights whose
    matrix products run in the compute dtype under the engine's autocast (as in the original), the root
    casting its inputs to the compute dtype as FSDP2's does. This removes FSDP2's work per block and pass
    (hooks, the all-gather into a buffer, a cast per parameter, the gradients' copy out), which the host
    issues more slowly than one GPU runs a batch of one. Measured (SD3.5 Medium, 1 x H200, the lean
    single-GPU options, ``benchmarks/NOTES.md``): 0.87 and 0.96 s/it against 1.03 and 1.24 with FSDP2,
    the same 56 GiB peak.
    Results differ from the sharded run by rounding only (parameters autocast leaves in fp32, e.g. norm
    weights, are not rounded to bf16); checkpoints load either way."""
    cudnn_benchmark: bool = False
    """Let cuDNN time its convolution algorithms on the first call of each shape and keep the fastest
    (``torch.backends.cudnn.benchmark``). Training shapes are fixed (one resolution, one batch size), so
    only the first iteration pays; the VAE and the discriminator heads are convolutions. Off: cuDNN's
    heuristics choose, as in the original."""

    def sharded(self, world_size: int) -> bool:
        """Whether the generator, fake score and teacher are FSDP2 modules (``fsdp``)."""
        return self.fsdp == "always" or (self.fsdp == "auto" and world_size > 1)


@dataclass
class TimestepSampling:
    """A distribution over indices of the 1000-entry training table (spec §4, §5)."""

    dist: str = "uniform"
    """``uniform`` on ``{min_index..max_index}`` or ``logit_normal`` (``floor(1000·sigmoid(z))``, clamped)."""
    table: str = "ascending"
    """``ascending`` (Σ↑, index i ↦ S_k((i+1)/1000)) or ``descending`` (Σ↓, the scheduler's own order)."""
    min_index: int = 0
    """Smallest index (inclusive)."""
    max_index: int = 999
    """Largest index (inclusive)."""


@dataclass
class DMConfig:
    """Distribution-matching loss (spec §4)."""

    timesteps: TimestepSampling = field(
        default_factory=lambda: TimestepSampling("uniform", "ascending", 20, 980)
    )
    """Noise level of the DM loss: SD3.5 U{20..980} on the ascending table."""
    guidance: list[float] = field(default_factory=lambda: [2.0, 8.0])
    """Teacher CFG scale range ``[lo, hi]`` of the DM loss, drawn uniformly per sample (R1: U(2, 8)). A
    property of the teacher: too much guidance makes the students overshoot the data (oversaturated, more
    varied than it); on the toy benchmark's small teacher U(2, 8) ended at 1.80x the teacher's FD, 2 at 1.13x
    (README, toy benchmark)."""
    normalizer_eps: float = 0.0
    """Added to the per-sample normaliser ``mean|x − x̂_real|`` (0 in the original, spec N4)."""


@dataclass
class FakeConfig:
    """Fake-score (denoising) loss (spec §5)."""

    timesteps: TimestepSampling = field(
        default_factory=lambda: TimestepSampling("logit_normal", "descending", 0, 999)
    )
    """Noise level of the fake-score loss: logit-normal index into the shifted descending table."""


@dataclass
class IDAConfig:
    """Implicit distribution alignment (Eq. 9, spec §6)."""

    enabled: bool = True
    """Blend the fake score towards the generator after each generator step."""
    lam: float = 0.98
    """λ in ``φ ← λ·φ + (1 − λ)·θ`` (R1 0.98, R2 0.97)."""


@dataclass
class ISGConfig:
    """Intra-segment guidance (Eq. 12, spec §7)."""

    weight: float = 0.5
    """λ_ISG in the generator loss (R1 0.5, R2 1.0); 0 disables ISG."""
    guidance: list[float] = field(default_factory=lambda: [2.0, 4.0])
    """Teacher CFG scale range of the ISG teacher step (R1 U(2, 4); R2 [5, 5])."""
    margin: int = 50
    """Distance, in grid units, of the intermediate point from both segment ends (SD3.5: 50 indices)."""
    loss: str = "pseudo_huber"
    """``pseudo_huber`` (released code) or ``l2`` (the paper's Eq. 12)."""
    huber_c: float = 0.001
    """Pseudo-Huber constant c."""


@dataclass
class GANConfig:
    """Adversarial term with the VFM discriminator (spec §8.7)."""

    weight: float = 0.1
    """λ_adv of the generator's hinge loss (R1/R2 0.1); 0 disables the discriminator entirely."""
    time_weight: str = "signal_squared"
    """Per-sample weight by generator anchor: ``signal_squared`` (α², the paper's (1 − σ)²), ``signal`` (α), ``none``."""


@dataclass
class ClassifierConfig:
    """DMD2's GAN classifier on the fake score's bottleneck (recipe R5 only; spec §9.6)."""

    gen_weight: float = 0.0
    """Weight of the generator's ``softplus(−D(x̂_G))`` term (R5 0.005); 0 with fake_weight 0 disables it."""
    fake_weight: float = 0.0
    """Weight of the classifier terms added to the fake-score loss (R5 0.01)."""
    max_timestep: int = 1000
    """The classifier's inputs are noised at ``t ~ U{0..max_timestep−1}`` ("diffusion GAN")."""

    @property
    def enabled(self) -> bool:
        """Whether the fake score carries the classifier head."""
        return self.gen_weight > 0 or self.fake_weight > 0


@dataclass
class DecoupledConfig:
    """Decoupled DMD (the fork's recipe R6, spec §17): replaces the DM term by separately normalised
    distribution-matching and CFG-augmentation terms."""

    enabled: bool = False
    """Use the decoupled generator loss instead of the DM loss."""
    ca_min_offset: int = 5
    """The CA term's noise index is at least this many descending-table steps below the generator's."""
    ca_max_index: int = 980
    """Largest descending-table index of the CA term's noise level."""
    eps: float = 1e-8
    """Added to each term's per-sample normaliser."""


@dataclass
class DistillConfig:
    """The SenseFlow/DMD algorithm (spec §1-§8)."""

    generator_period: int = 10
    """P: the generator is updated when ``iteration % P == 0`` (TTUR; R1 10, R2 5)."""
    backsim_prob: float = 0.5
    """Probability of building the generator input by backward simulation instead of noising real latents."""
    timestep_grid: str = "ascending_index"
    """Integer grid of anchors and ISG margins: ``ascending_index`` (SD3.5), ``t1000`` (FLUX), ``ddpm`` (SDXL)."""
    anchors: list[int] = field(default_factory=lambda: [999, 749, 499, 249])
    """Generator anchors on ``timestep_grid``, noisiest first (SD3.5: σ = 1.0, 0.9, 0.75, 0.5)."""
    dm: DMConfig = field(default_factory=DMConfig)
    """Distribution-matching loss."""
    fake: FakeConfig = field(default_factory=FakeConfig)
    """Fake-score loss."""
    ida: IDAConfig = field(default_factory=IDAConfig)
    """Implicit distribution alignment."""
    isg: ISGConfig = field(default_factory=ISGConfig)
    """Intra-segment guidance."""
    gan: GANConfig = field(default_factory=GANConfig)
    """Adversarial (VFM discriminator) term."""
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    """DMD2 classifier head (SDXL DMD2 baseline)."""
    decoupled: DecoupledConfig = field(default_factory=DecoupledConfig)
    """Decoupled-DMD variant (the DM term's CFG scale range is ``dm.guidance``)."""


@dataclass
class OptimizerConfig:
    """AdamW settings shared by the generator, fake score and discriminator heads (spec §12.1)."""

    name: str = "adamw"
    """``adamw`` (torch) or ``adamw8bit`` (torchao's 8-bit AdamW; R2 and R3 use 8-bit states)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam β₁, β₂."""
    eps: float = 1e-8
    """Adam ε."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    offload_generator_state: bool = False
    """Keep the generator's AdamW states in pinned host memory between its steps (it steps once per
    ``distill.generator_period`` iterations) and copy them to the GPU just for the step
    (``senseflow/offload.py``). Saves 8 bytes per generator parameter divided by the number of GPUs
    (SD3.5 Medium: 8.3 GiB per GPU on 2 GPUs, 16.7 GiB on 1) outside generator steps, for two host-device
    copies per generator step. Measured (SD3.5 Medium, ``benchmarks/NOTES.md``): 86.2 instead of 91.4 GiB
    on 1 x H200; 46.4 GiB per GPU on 2 x H200 with the other memory options. Same updates. Needs
    ``optimizer.name=adamw``."""
    offload_fake_state: str = "none"
    """Where the fake score's AdamW states (8 bytes per parameter divided by the number of GPUs; SD3.5 Medium:
    8.3 GiB per GPU on 2 GPUs) go to pinned host memory (``senseflow/offload.py``). ``none``: they stay on
    the GPU. ``generator_step``: only while the generator computes its losses, backward and step (one
    iteration in ``distill.generator_period``), which is where the peak of SD3.5 Medium lies on 2 x H200
    (``python -m senseflow.bench`` names the phase): two copies per generator iteration. ``between_steps``:
    everywhere except the fake score's own step, as ``offload_generator_state`` does for the generator
    (stepped in ``offload_step_chunks`` parts); two copies every iteration. Measured (SD3.5 Medium, compiled,
    with ``offload_generator_state``; on 2 GPUs also the sharded text encoders and discriminator; peak
    allocated per GPU): 2 x H200 ``none`` 46.4 GiB at 1.07 s/it, ``generator_step`` 40.3 GiB at 1.11 s/it
    (the peak moves to the discriminator step), ``between_steps`` 38.0 GiB at 1.67 s/it; 1 x H200
    ``generator_step`` 70.1 GiB at 1.19 s/it, ``between_steps`` 57.9 GiB at 1.65 s/it. The copies run at
    about 28 GB/s. Same updates. Needs ``optimizer.name=adamw``."""
    offload_overlap: bool = False
    """With ``offload_fake_state=generator_step`` on GPUs: its two copies (one buffer each way) run on a side
    CUDA stream, overlapped with compute, instead of in line (about 0.66 s per generator iteration for SD3.5
    Medium on 1 x H200). The states start for the host when the generator's step begins and their GPU memory
    is freed only before its backward, so they are on the GPU during the generator's forward passes (ISG,
    DM, GAN term): those phases' peak grows by their size. They start back after the generator's step, and
    the fake score's optimiser step waits for them. Same updates. No effect on the CPU. Measured (SD3.5
    Medium, 1 x H200, precomputed prompt embeddings, teacher parked): 1.03 and 1.24 s/it in two runs (the
    second with a slow stretch of other iterations) against 1.14 in line, peak 56.1 GiB in the generator's
    GAN term against 54.8. An earlier version that copied the ~1,800 state tensors one by one on the side
    stream was slower than in line (``benchmarks/NOTES.md``)."""
    offload_step_chunks: int = 8
    """With ``offload_generator_state`` or ``offload_fake_state=between_steps``: the net steps its
    parameters in this many consecutive parts of about equal size. Each part's AdamW states move as one
    buffer; the next part is copied in while the current one steps and the previous one is copied out (on
    a GPU: two side streams, so both directions of PCIe are used at once). At most two parts' states are
    on the GPU with the gradients (2/chunks of 8 bytes per parameter and GPU): the gradients and all the
    states are never on the GPU together. Same updates as one step; 1 loads all states at once."""


@dataclass
class LRSchedulerConfig:
    """Warm-up then constant (spec §12.2): ``lr(n) = lr_start + (lr_max − lr_start)·n/warm_up_steps``."""

    warm_up_steps: int = 500
    """Scheduler steps of linear warm-up."""
    lr_start: float = 1e-6
    """Learning rate at step 0."""
    lr_max: float = 1e-6
    """Learning rate after warm-up."""


@dataclass
class PrecisionConfig:
    """Dtypes (spec §12.4)."""

    master: str = "fp32"
    """Storage dtype of the trained nets' weights (fp32 master weights; the original FLUX recipe kept bf16, N3)."""
    compute: str = "bf16"
    """Forward/backward compute dtype of the trained transformers (``bf16`` or ``fp32``)."""
    teacher: str = "bf16"
    """Weight dtype of the frozen teacher."""
    text_encoders: str = "bf16"
    """Weight dtype of the teacher's text encoders (the original used fp32)."""
    vae: str = "fp32"
    """Weight dtype of the VAE."""
    tf32: bool = True
    """TF32 tensor-core arithmetic for fp32 matrix products and cuDNN convolutions on CUDA, as the original
    (spec §12.4): the VAE, CLIP's text tower, fp32 forwards of the trained nets. False: full fp32 matrix
    products (torch's default) and convolutions."""
    fsdp_mixed: bool = True
    """FSDP2 all-gathers trained weights in the compute dtype (fast); false keeps fp32 weights under
    autocast as the original did (required by ``compat.generator_fp32_when_no_grad``). Measured on 2 x H200
    (SD3.5 Medium, compiled, memory options): false 1.59 against 1.44 s/it, same peak. Unsharded nets
    (``model.fsdp``) always keep fp32 weights under autocast."""


@dataclass
class TrainConfig:
    """Loop length, batch, seeds and intervals."""

    iter_num: int = 30000
    """Total loop iterations (fake-score steps); the generator steps every ``generator_period``."""
    batch_size: int = 1
    """Images per GPU."""
    resolution: int = 1024
    """Training image resolution (square)."""
    seed: int = 71801
    """Seed of all random streams (control flow shared by ranks, noise per rank)."""
    grad_clip: float = 1.0
    """Global L2 gradient-norm clip of the generator, fake score and discriminator heads."""
    save_interval: int = 3000
    """Write a checkpoint every this many iterations (and at the end)."""
    log_interval: int = 10
    """Write averaged metrics every this many iterations."""
    image_interval: int = 500
    """Write an image strip (generator, teacher x0, fake x0, real) every this many iterations; 0 = never."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cuda`` or ``cpu``."""


@dataclass
class DataConfig:
    """Data loading."""

    format: str = "json"
    """``json`` (images + captions, encoded by the VAE on the fly) or ``lmdb`` (DMD2's latent LMDB, SDXL)."""
    num_workers: int = 4
    """DataLoader worker processes per rank."""
    on_error: str = "skip"
    """Corrupt image during training: ``skip`` (warn, count, take the next entry) or ``raise``."""
    check_paths: bool = True
    """Verify at start-up that every image path exists."""
    shuffle: bool = True
    """Shuffle each epoch (with the run seed and the epoch number)."""


@dataclass
class CheckpointConfig:
    """Checkpoint writing and rotation."""

    enabled: bool = True
    """Write checkpoints and resume from them (false only for throw-away benchmark runs)."""
    keep_last: int = 2
    """Full training states to keep (older ones are deleted)."""
    keep_last_exports: int = 0
    """``ckpt_model_{iter}.pth`` generator files to keep; 0 keeps all."""
    export_generator: bool = True
    """Write ``ckpt_model_{iter}.pth`` (``{"model": state_dict}``) next to each training state."""


@dataclass
class WandbConfig:
    """Weights & Biases logging of the metrics and image strips (off unless enabled)."""

    enabled: bool = False
    """Log to W&B from rank 0 (needs the wandb package)."""
    project: str = "senseflow"
    """W&B project."""
    entity: str = ""
    """W&B entity (team or user); empty uses the default."""
    name: str = ""
    """Run name; empty uses the run directory's name."""
    mode: str = "online"
    """``online``, ``offline`` or ``disabled``."""


@dataclass
class LogConfig:
    """Metrics and images."""

    progress_bar: bool = True
    """Show a progress bar on rank 0."""
    tensorboard: bool = False
    """Also write TensorBoard scalars (needs the tensorboard package)."""
    trace_data: bool = False
    """Write the dataset keys each rank consumes to ``data_trace_rank{r}.jsonl`` (debugging/tests)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases."""


@dataclass
class CompatConfig:
    """Switches restoring behaviours of the original implementation (spec Appendix B)."""

    d_grad_leak: bool = False
    """B1: the D step also applies the generator's adversarial gradient on generator steps."""
    sd35_gan_weight_legacy: bool = True
    """B13: SD3.5 GAN time weight ``(Σ↓[a])²`` (descending table at the ascending anchor index)."""
    sd35_isg_last_sigma_legacy: bool = True
    """N2: the last ISG segment ends at ``Σ↑[0] = 0.002994`` instead of 0 (ascending_index grid only)."""
    shared_noise_across_ranks: bool = False
    """B12: every rank draws identical noise."""
    lr_schedule_per_iteration: bool = True
    """Advance the generator's LR schedule every iteration (original), not only on generator steps."""
    no_image_resize: bool = False
    """B8: use dataset images as they are (they must already be ``resolution`` square)."""
    reference_is_real_input: bool = True
    """B15: the discriminator's reference is exactly the real image paired with the caption; false
    augments the reference independently (DiffAugment), the minimal fix the spec suggests."""
    sdxl_isg_legacy: bool = False
    """B2: SDXL ISG as implemented originally, a regression of x̂_G onto the CFG teacher's one-step x̂₀."""
    decoupled_legacy_sign: bool = False
    """B3: the decoupled terms' fork sign (descends away from the conditional teacher and the CFG direction)."""
    decoupled_legacy_ca_index: bool = False
    """B4: locate the CA range from the anchor's grid value read as a timestep, not from the generator's σ."""
    flux_bf16_sigma: bool = True
    """N1 (t1000 grid only): noise and recover x0 at the bf16-rounded anchor σ while conditioning the trained
    forward on the fp32 σ, as the original FLUX recipe did."""
    generator_fp32_when_no_grad: bool = False
    """N5: run the generator in fp32 without autocast on non-generator iterations and in backward simulation."""


@dataclass
class Config:
    """A complete run configuration."""

    recipe: str = "sd35_medium_senseflow"
    """Name of the recipe, for logs and output folders."""
    paths: PathsConfig = field(default_factory=PathsConfig)
    """Local paths."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Teacher family and component construction."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """The algorithm."""
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    """VFM discriminator architecture."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimiser."""
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    """Learning-rate schedule (identical for all optimisers)."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Dtypes."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data loading."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging."""
    compat: CompatConfig = field(default_factory=CompatConfig)
    """Original-behaviour switches."""


DTYPES = ("bf16", "fp16", "fp32")
OFFLOAD_FAKE_MODES = ("none", "generator_step", "between_steps")


# ---------------------------------------------------------------------------------------------------
# Loading


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _check_value(value: Any, tp: Any, where: str) -> Any:
    """Validate/convert ``value`` against the annotation ``tp``; ``where`` names the key for errors."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(value, inner[0], where)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_value(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            # YAML reads 1e-6 (no dot) as a string; accept numeric strings
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict, where: str, source: str) -> Any:
    """Instantiate dataclass ``cls`` from a nested dict, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{where or 'top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(
                f"{source}: unknown key '{dotted}' (valid keys here: {', '.join(sorted(names))})"
            )
        tp = hints[key]
        if _is_dataclass_type(tp):
            kwargs[key] = _build(tp, value, dotted, source)
        else:
            kwargs[key] = _check_value(value, tp, f"{source}: {dotted}")
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML file, resolving ``base: other.yaml`` (relative to the file) recursively."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    return _merge(_read_yaml((path.parent / base).resolve(), (*seen, path)), data)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.iter_num=10)")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config, apply dotted ``key=value`` overrides, validate and return a :class:`Config`."""
    path = Path(path).resolve()
    data = _read_yaml(path)
    for text in overrides:
        keys, value = _parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{k}' is not a section")
        node[keys[-1]] = value
    source = str(path) + (" (with command-line overrides)" if overrides else "")
    cfg = _build(Config, data, "", source)
    validate(cfg, source)
    return cfg


def validate(cfg: Config, source: str = "config") -> None:
    """Cross-field checks; each error names the key to change."""

    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{source}: {key}: {msg}")

    if cfg.model.family not in ("sd3", "flux", "sdxl"):
        fail("model.family", f"unknown family {cfg.model.family!r} (supported: sd3, flux, sdxl)")
    if cfg.model.fsdp not in ("auto", "always", "never"):
        fail("model.fsdp", "must be auto, always or never")
    if cfg.model.fsdp_blocks_per_unit < 1:
        fail("model.fsdp_blocks_per_unit", "must be >= 1")
    for key in ("activation_memory_budget", "fake_activation_memory_budget"):
        budget = getattr(cfg.model, key)
        if budget is not None and not 0 <= budget <= 1:
            fail(f"model.{key}", f"is {budget}; must be between 0 and 1, or null")
    if not cfg.paths.pretrained_model:
        fail("paths.pretrained_model", "is empty; set it to the teacher folder (diffusers layout)")
    if cfg.paths.pretrained_model.strip().startswith("arch:") and not cfg.model.random_init:
        fail("model.random_init", "must be true with an arch: teacher (it holds configs, no weights)")
    if not cfg.paths.dataset:
        fail("paths.dataset", "is empty; set it to the JSON dataset file")
    d = cfg.distill
    if d.generator_period < 1:
        fail("distill.generator_period", "must be >= 1")
    if not 0.0 <= d.backsim_prob <= 1.0:
        fail("distill.backsim_prob", "must be in [0, 1]")
    if d.timestep_grid not in ("ascending_index", "t1000", "ddpm"):
        fail("distill.timestep_grid", "must be ascending_index, t1000 or ddpm")
    if len(d.anchors) < 1 or any(a <= b for a, b in zip(d.anchors, d.anchors[1:])):
        fail("distill.anchors", f"must be strictly decreasing (noisiest first), got {d.anchors}")
    for key, ts in (("distill.dm.timesteps", d.dm.timesteps), ("distill.fake.timesteps", d.fake.timesteps)):
        if ts.dist not in ("uniform", "logit_normal"):
            fail(f"{key}.dist", "must be uniform or logit_normal")
        if ts.table not in ("ascending", "descending"):
            fail(f"{key}.table", "must be ascending or descending")
        if not 0 <= ts.min_index <= ts.max_index <= 999:
            fail(key, f"need 0 <= min_index <= max_index <= 999, got {ts.min_index}..{ts.max_index}")
    for key, rng in (("distill.dm.guidance", d.dm.guidance), ("distill.isg.guidance", d.isg.guidance)):
        if len(rng) != 2 or rng[0] > rng[1]:
            fail(key, f"must be [lo, hi] with lo <= hi, got {rng}")
    if not 0.0 <= d.ida.lam <= 1.0:
        fail("distill.ida.lam", "must be in [0, 1]")
    if d.isg.loss not in ("pseudo_huber", "l2"):
        fail("distill.isg.loss", "must be pseudo_huber or l2")
    if d.isg.weight > 0:
        gaps = [a - b for a, b in zip(d.anchors, [*d.anchors[1:], 0])]
        if min(gaps) <= 2 * d.isg.margin:
            fail(
                "distill.isg.margin",
                f"{d.isg.margin} leaves no intermediate point in a segment of {min(gaps)}",
            )
    if d.classifier.enabled and cfg.model.family != "sdxl":
        fail(
            "distill.classifier",
            "the DMD2 classifier is implemented for the SDXL UNet only (model.family=sdxl)",
        )
    if d.classifier.enabled and d.ida.enabled:
        fail(
            "distill.ida.enabled", "must be false with the DMD2 classifier (the fake score has an extra head)"
        )
    if d.decoupled.enabled and cfg.model.family == "flux":
        fail(
            "distill.decoupled.enabled",
            "needs a teacher with classifier-free guidance (sd3 or sdxl), not flux",
        )
    if not 0 <= d.decoupled.ca_max_index <= 999:
        fail("distill.decoupled.ca_max_index", "must be in 0..999")
    if cfg.log.wandb.mode not in ("online", "offline", "disabled"):
        fail("log.wandb.mode", "must be online, offline or disabled")
    if cfg.data.format not in ("json", "lmdb"):
        fail("data.format", "must be json or lmdb")
    if d.gan.time_weight not in ("signal_squared", "signal", "none"):
        fail("distill.gan.time_weight", "must be signal_squared, signal or none")
    cfg.discriminator.validate()
    if d.gan.weight > 0:
        for key in ("dino", "clip"):
            if not getattr(cfg.paths, key):
                fail(f"paths.{key}", "is empty but the GAN term is on; set it or set distill.gan.weight=0")
    for key in ("master", "compute", "teacher", "text_encoders", "vae"):
        if getattr(cfg.precision, key) not in DTYPES:
            fail(f"precision.{key}", f"must be one of {', '.join(DTYPES)}")
    if cfg.optimizer.name not in ("adamw", "adamw8bit"):
        fail("optimizer.name", "must be adamw or adamw8bit")
    if cfg.optimizer.offload_step_chunks < 1:
        fail("optimizer.offload_step_chunks", "must be >= 1")
    if cfg.optimizer.offload_fake_state not in OFFLOAD_FAKE_MODES:
        fail("optimizer.offload_fake_state", f"must be one of {', '.join(OFFLOAD_FAKE_MODES)}")
    if cfg.optimizer.offload_overlap and cfg.optimizer.offload_fake_state != "generator_step":
        fail("optimizer.offload_overlap", "applies to optimizer.offload_fake_state=generator_step only")
    for key in ("offload_generator_state", "offload_fake_state"):
        if getattr(cfg.optimizer, key) not in (False, "none") and cfg.optimizer.name != "adamw":
            fail(f"optimizer.{key}", "works with optimizer.name=adamw only (8-bit states are not moved)")
    if (
        cfg.compat.generator_fp32_when_no_grad
        and cfg.precision.fsdp_mixed
        and cfg.precision.compute != "fp32"
    ):
        fail(
            "precision.fsdp_mixed",
            "must be false with compat.generator_fp32_when_no_grad (fp32 weights needed)",
        )
    t = cfg.train
    for key in ("iter_num", "batch_size", "resolution", "save_interval", "log_interval"):
        if getattr(t, key) < 1:
            fail(f"train.{key}", "must be >= 1")
    if t.device not in ("auto", "cuda", "cpu"):
        fail("train.device", "must be auto, cuda or cpu")
    if cfg.data.on_error not in ("skip", "raise"):
        fail("data.on_error", "must be skip or raise")


def resolve_paths(cfg: Config) -> None:
    """Replace ``tiny:``/``arch:`` entries of ``cfg.paths`` by the folders they build (in place).

    Call before ``torch.distributed`` is initialised: library ``save_pretrained`` calls write only on
    rank 0 of a process group, and every process must be able to build a missing asset.
    """
    from .data.tiny import resolve_path

    for f in dataclasses.fields(cfg.paths):
        value = getattr(cfg.paths, f.name)
        if value:
            setattr(cfg.paths, f.name, str(resolve_path(value)))


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts (for YAML dumps and logs)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
