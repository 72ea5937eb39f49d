"""``python -m senseflow.bench_inference``: few-step generation latency at full size, ours next to stock
diffusers.

Builds a recipe's full-size networks with random weights (``arch:`` teachers, no download), then times
the same generation two ways with the same modules:

* **ours**: :func:`senseflow.inference.generate` (prompt encoding, the x0 sampler at the recipe's
  trained levels, VAE decode), what the ``scripts_*`` inference scripts run;
* **diffusers**: the stock ``StableDiffusion3Pipeline`` / ``FluxPipeline`` built from the same
  transformer, text encoders and VAE (both sides decode in the networks' dtype, bf16 on CUDA) with ``num_inference_steps`` = the same step count, no
  classifier-free guidance, ``output_type="pt"`` (tensors: no PIL conversion on either side).

Each entry is the median of ``--repeats`` timed calls after ``--warmup`` untimed ones (CUDA synchronised
around each call), with the peak allocated memory of the calls. Latency depends on the network sizes only,
so random weights measure it exactly; the images are noise.

    python -m senseflow.bench_inference --recipe sd35_medium --batch-sizes 1 4 --out result.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .bench import RECIPES
from .errors import SenseFlowError
from .output import emit

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SUPPORTED = ("sd35_medium", "sd35_large", "flux")
GIB = 2**30


def _time_calls(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> dict:
    """Median seconds of ``repeats`` calls after ``warmup`` calls, and their peak allocated memory."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")
    return {"median_s": statistics.median(times), "times_s": times, "peak_gib": peak}


def _stock_pipeline(name: str, adapter, generator):
    """The stock diffusers pipeline of the family around our modules (same weights, same VAE)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(adapter.root / "scheduler")
    tok, enc = adapter.tokenizers, adapter.text_encoders
    if name == "flux":
        from diffusers import FluxPipeline

        return FluxPipeline(
            scheduler=scheduler,
            vae=adapter.vae,
            text_encoder=enc[0],
            tokenizer=tok[0],
            text_encoder_2=enc[1],
            tokenizer_2=tok[1],
            transformer=generator,
        )
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=generator,
        scheduler=scheduler,
        vae=adapter.vae,
        text_encoder=enc[0],
        tokenizer=tok[0],
        text_encoder_2=enc[1],
        tokenizer_2=tok[1],
        text_encoder_3=enc[2],
        tokenizer_3=tok[2],
    )


def benchmark(args: argparse.Namespace) -> dict:
    """Time ours and the stock pipeline for every batch size; returns the result dict."""
    from .inference import build_inference, generate
    from .sampling import inference_levels

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    recipe = RECIPES[args.recipe]
    teacher = args.teacher or recipe.arch
    # the VAE in the networks' dtype: the stock pipelines decode the transformer's latents as they are
    overrides = [f"precision.vae={'bf16' if dtype == torch.bfloat16 else 'fp32'}"]
    if teacher.startswith("arch:"):
        overrides.append("model.random_init=true")
    t0 = time.time()
    cfg, adapter = build_inference(REPO / recipe.config, teacher, device, dtype, overrides)
    with torch.device(device):
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            generator = adapter.transformer_cls.from_config(adapter.generator_config()).eval()
        finally:
            torch.set_default_dtype(default)
    generator.requires_grad_(False)
    logger.info(
        "built %s (%s, %.2f B generator parameters) in %.1fs",
        args.recipe,
        teacher,
        sum(p.numel() for p in generator.parameters()) / 1e9,
        time.time() - t0,
    )
    size = args.resolution or int(adapter.generator_config().get("sample_size", 128)) * adapter.vae_scale
    levels = inference_levels(cfg, adapter.schedule, args.num_steps)
    pipe = _stock_pipeline(args.recipe, adapter, generator)
    pipe.set_progress_bar_config(disable=True)
    stock_kwargs = {"max_sequence_length": cfg.model.t5_max_length}
    if args.recipe != "flux":
        stock_kwargs["guidance_scale"] = 0.0  # SD3: no CFG at scale <= 1
    rows = []
    for batch in args.batch_sizes:
        prompts = ["a photo of a cat sitting on a red chair"] * batch

        def ours(prompts=prompts):
            return generate(adapter, generator, prompts, range(len(prompts)), 0, levels, "x0", size, size)

        def stock(prompts=prompts):
            return pipe(
                prompt=prompts,
                num_inference_steps=args.num_steps,
                height=size,
                width=size,
                output_type="pt",
                generator=torch.Generator(device).manual_seed(0),
                **stock_kwargs,
            ).images

        for impl, fn in (("ours", ours), ("diffusers", stock)):
            r = _time_calls(fn, args.warmup, args.repeats, device)
            r.update(impl=impl, batch=batch, images_per_s=batch / r["median_s"])
            logger.info(
                "%s batch %d: %.3f s (%.2f img/s), peak %.1f GiB",
                impl,
                batch,
                r["median_s"],
                r["images_per_s"],
                r["peak_gib"],
            )
            rows.append(r)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "schema": "senseflow.bench_inference/1",
        "recipe": args.recipe,
        "teacher": teacher,
        "device": gpu,
        "dtype": str(dtype).removeprefix("torch."),
        "resolution": size,
        "num_steps": args.num_steps,
        "levels": [round(float(v), 6) for v in levels],
        "warmup": args.warmup,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "rows": rows,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m senseflow.bench_inference", description=__doc__.split("\n")[0]
    )
    p.add_argument("--recipe", choices=SUPPORTED, default="sd35_medium")
    p.add_argument(
        "--teacher",
        help="teacher folder or arch:/tiny: name (default: the recipe's full-size arch: with random weights)",
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    p.add_argument("--num-steps", type=int, default=4)
    p.add_argument("--resolution", type=int, help="image side (default: the model's native size)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", help="write the result JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from .metrics import setup_logging

    args = parse_args(argv)
    setup_logging(0)
    try:
        result = benchmark(args)
    except SenseFlowError as err:
        logger.error("%s", err)
        return 2
    emit(
        f"{result['recipe']} on {result['device']}, {result['resolution']} px, {result['num_steps']} steps",
        "| impl | batch | s/call (median) | images/s | peak GiB |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {r['impl']} | {r['batch']} | {r['median_s']:.3f} | {r['images_per_s']:.2f} | {r['peak_gib']:.1f} |"
            for r in result["rows"]
        ),
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
