"""A small text-to-image benchmark that is trained and distilled end to end (issue 9).

``python -m senseflow.toy [--out DIR] [--preset {ci,cpu,gpu}]`` runs every stage and writes a report:

1. ``data``: procedural captioned scenes of one to three coloured shapes on a 3x3 grid (the renderer of
   :mod:`senseflow.data.tiny`, drawn at 2x and box-filtered to 64 px), a training split, a fixed
   evaluation prompt set with known attributes, an independent real set of other prompts (a Frechet reference point) and the
   PNG + ``dataset.json`` the distillation engine reads.
2. ``backbones``: the discriminator's DINOv2 (patch 8 for 64-pixel images), pre-trained here by masked
   image modelling on the training images (:mod:`senseflow.toy.vfm`), and a tiny random CLIP text
   tower; both frozen in distillation (the GAN's heads are the only trained part, as in the real recipe).
3. ``vae``: a small ``AutoencoderKL`` (x4 down-sampling to 16x16x8 latents) trained here as an
   autoencoder on the training split; its scaling and shift factors are measured on the data.
4. ``teacher``: a ``stable-diffusion-3`` diffusers folder (CLIP-L, CLIP-G and T5 text encoders that are
   random but fixed, the VAE above, the shifted flow-matching scheduler, an MMDiT transformer sized by
   the preset) whose transformer is trained here with rectified flow, logit-normal noise levels and 10 %
   caption dropout, so that it supports classifier-free guidance (on CUDA with a fused AdamW, and with
   its blocks compiled where the preset says ``teacher_compile``, as ``gpu`` does).
5. ``featnet`` / ``classifiers``: the evaluation networks, trained here on real images: a CNN whose
   bottleneck is the feature space of the Frechet distance, and a per-cell classifier (colour, shape,
   size or empty) for attribute accuracy in the spirit of T2I-CompBench's colour/shape/spatial columns.
6. ``distill/<variant>``: vanilla DMD, DMD+IDA, DMD+IDA+ISG and the full SenseFlow recipe, each through
   :class:`senseflow.engine.Engine` with ``configs/SD35/sd35_senseflow.yaml`` as the base config.
7. ``eval/<method>``: metrics of the teacher (many steps, and 4 Euler steps) and of every student at each
   saved checkpoint; image grids.
8. ``report``: ``report.md``, ``report.json``, ``metrics_plot.png`` and the grids.

Every stage writes ``<stage dir>/.done.json`` atomically when it finishes; a rerun skips finished stages.

``backbones``, ``featnet`` and ``classifiers`` need only the data: on CUDA they run in one spawned child
process (log lines tagged ``[side]``, in ``toy.log`` too) while the parent trains the VAE and the teacher,
and distillation starts when both are done (``run(parallel_stages=...)``; on a CPU they run in the order
above, as the processes would only share its cores). The report's wall-clock time counts stages that ran
side by side once. A stop signal (SIGTERM, SIGUSR1) before distillation stops both processes at once with
exit code 128 + its number; during distillation the variants stop with a checkpoint. The same command
then finishes what is left.
"""
