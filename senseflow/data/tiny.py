"""The embedded tiny default: a tiny SD3-family teacher and a tiny captioned image set, built offline.

Everything here is generated locally and deterministically (no downloads): hand-made CLIP (BPE) and T5
(Unigram) tokenizers, a randomly initialised ``stable-diffusion-3`` diffusers directory with the layout of
``stabilityai/stable-diffusion-3.5-medium``, and a procedural data set of coloured shapes with captions.
``resolve_tiny("tiny:sd3")`` / ``resolve_tiny("tiny:shapes")`` build them once into a cache folder
(``$SENSEFLOW_CACHE/tiny``, default ``~/.cache/senseflow/tiny``), safely when several processes race.

CLI: ``python -m senseflow.data.tiny --out DIR [--seed 0]`` builds ``DIR/sd3`` and ``DIR/shapes``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import string
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from senseflow.errors import ConfigError

from ..output import emit

logger = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"
TINY_VERSION = 1
COMPLETE_MARKER = ".complete"

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_MAX_LENGTH = 77
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
T5_MAX_LENGTH = 512

# --------------------------------------------------------------------------------------------------------
# Caption vocabulary of the shapes data set
# --------------------------------------------------------------------------------------------------------

SHAPE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (245, 215, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 185),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "beige": (222, 210, 180),
    "pink": (240, 175, 200),
    "teal": (50, 128, 128),
    "brown": (115, 80, 55),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.16, "large": 0.30}  # shape extent as a fraction of the short side
# (name, caption phrase, column, row) of a 3x3 grid
POSITIONS: tuple[tuple[str, str, int, int], ...] = (
    ("top left", "at the top left", 0, 0),
    ("top", "at the top", 1, 0),
    ("top right", "at the top right", 2, 0),
    ("left", "on the left", 0, 1),
    ("center", "in the center", 1, 1),
    ("right", "on the right", 2, 1),
    ("bottom left", "at the bottom left", 0, 2),
    ("bottom", "at the bottom", 1, 2),
    ("bottom right", "at the bottom right", 2, 2),
)
CAPTION_WORDS = "a and on the plain gradient background".split()

# A few hundred common English words (and common prompt words), all lower-case letters.
COMMON_WORDS = """
the of and to in is was he for it with as his on be at by had are but from or have an they which one you
were her all she there would their we him been has when who will more no if out so said what up its about
into than them can only other new some could time these two may then do first any my now such like our
over man me even most made after also did many before must through back years where much your way well
down should because each just those people how too little state good very make world still own see men
work long get here between both life being under never day same another know while last might us great
old year off come since against go came right used take three small large big tiny huge tall short wide
round flat bright dark light colorful shiny soft hard warm cold wet dry clean dirty beautiful pretty ugly
happy sad young new old fast slow high low near far inside outside above below behind front next close
photo photograph picture painting drawing sketch image portrait illustration render art style realistic
detailed simple abstract cartoon anime digital oil watercolor pencil ink color colors shape shapes
cat dog bird fish horse cow sheep pig rabbit mouse lion tiger bear elephant monkey fox wolf deer duck
owl frog snake butterfly bee tree trees flower flowers grass leaf leaves forest garden park field
mountain mountains hill river lake sea ocean beach sand sky cloud clouds sun moon star stars rain snow
fire water stone rock wood metal glass paper house home building city town street road bridge tower
castle church window door wall roof room table chair bed sofa lamp cup bowl plate bottle book books
car bus train plane boat ship bicycle truck apple banana orange bread cake pizza coffee tea food fruit
woman girl boy child person face hair eyes hand hands smiling standing sitting walking running flying
swimming sleeping holding wearing looking hat dress shirt coat shoes night morning evening sunset
sunrise winter summer spring autumn view scene landscape background foreground middle corner edge
side center top bottom left right up down circle square triangle line lines dot dots pattern texture
gold silver pink brown gray grey black white red green blue yellow purple violet cyan magenta beige
teal with without together alone many few several single pair group
""".split()


def _caption_words() -> list[str]:
    """Return every word the tiny captions can use."""
    words: list[str] = list(CAPTION_WORDS) + list(SHAPES) + list(SIZES)
    for name in list(SHAPE_COLORS) + list(BACKGROUND_COLORS):
        words += name.split()
    for _, phrase, _, _ in POSITIONS:
        words += phrase.split()
    return words


def tokenizer_words() -> list[str]:
    """Return the deterministic, de-duplicated word list of the tiny tokenizers (captions first)."""
    return list(dict.fromkeys(_caption_words() + COMMON_WORDS))


# --------------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------------


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges (lowest rank first, leftmost on ties) to one word's symbols."""
    symbols = list(symbols)
    while len(symbols) > 1:
        best, best_i = None, -1
        for i in range(len(symbols) - 1):
            rank = ranks.get((symbols[i], symbols[i + 1]))
            if rank is not None and (best is None or rank < best):
                best, best_i = rank, i
        if best is None:
            break
        symbols[best_i : best_i + 2] = [symbols[best_i] + symbols[best_i + 1]]
    return symbols


def _clip_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build a CLIP-style byte-level BPE vocab where every word of ``words`` is a single token."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())  # the 256 byte-level symbols
    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = list(word)
        symbols[-1] += "</w>"
        # Append merges (at the lowest priority) until the word is one token; appending never changes
        # the result for words already merged, since their merge steps all have lower ranks.
        while len(pieces := _bpe(symbols, ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]:
        vocab.setdefault(token, len(vocab))
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return vocab, merges


def _added_token(content: str) -> dict:
    """Return a ``tokenizer_config.json`` entry for a special token."""
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def _write_json(path: Path, obj: object) -> None:
    """Write ``obj`` as indented, key-sorted JSON (deterministic bytes)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def build_clip_tokenizer(out_dir: str | os.PathLike) -> None:
    """Write a tiny CLIP BPE tokenizer folder (vocab.json, merges.txt, configs) loadable by CLIPTokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_vocab_and_merges(tokenizer_words())
    _write_json(out / "vocab.json", vocab)
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    specials = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "unk_token": CLIP_EOS, "pad_token": CLIP_EOS}
    _write_json(out / "special_tokens_map.json", specials)
    _write_json(
        out / "tokenizer_config.json",
        {
            **specials,
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": CLIP_MAX_LENGTH,
            "do_lower_case": True,
            "errors": "replace",
            "clean_up_tokenization_spaces": True,
            "added_tokens_decoder": {str(vocab[t]): _added_token(t) for t in (CLIP_BOS, CLIP_EOS)},
        },
    )
    logger.debug("wrote CLIP tokenizer (%d tokens, %d merges) to %s", len(vocab), len(merges), out)


def _t5_vocab(words: list[str]) -> list[tuple[str, float]]:
    """Build a Unigram vocab (piece, log-prob) where every word of ``words`` is a single ``▁word`` piece."""
    vocab: list[tuple[str, float]] = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), ("\u2581", -4.0)]
    # Whole words score far above their spelling (>= 2 characters at -12 each), so Viterbi keeps them whole;
    # longer words score slightly lower, like real Unigram log-probabilities.
    vocab += [("\u2581" + w, -6.0 - 0.01 * i) for i, w in enumerate(words)]
    seen = {piece for piece, _ in vocab}
    chars = string.ascii_letters + string.digits + string.punctuation
    vocab += [(c, -12.0) for c in chars if c not in seen]
    return vocab


def build_t5_tokenizer(out_dir: str | os.PathLike) -> None:
    """Write a tiny T5 Unigram tokenizer folder (tokenizer.json, configs) loadable by T5TokenizerFast."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _t5_vocab(tokenizer_words())
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    # Same pipeline as transformers' T5Tokenizer rebuilds from tokenizer.json, so every version agrees.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", T5_EOS], pair=["$A", T5_EOS, "$B", T5_EOS], special_tokens=[(T5_EOS, 1)]
    )
    tok.add_special_tokens([T5_PAD, T5_EOS, T5_UNK])
    tok.save(str(out / "tokenizer.json"))
    specials = {"eos_token": T5_EOS, "unk_token": T5_UNK, "pad_token": T5_PAD}
    _write_json(out / "special_tokens_map.json", {**specials, "additional_special_tokens": []})
    _write_json(
        out / "tokenizer_config.json",
        {
            **specials,
            "tokenizer_class": "T5Tokenizer",
            "model_max_length": T5_MAX_LENGTH,
            "extra_ids": 0,
            "additional_special_tokens": [],
            "clean_up_tokenization_spaces": True,
            "added_tokens_decoder": {str(i): _added_token(t) for i, t in enumerate((T5_PAD, T5_EOS, T5_UNK))},
        },
    )
    logger.debug("wrote T5 tokenizer (%d pieces) to %s", len(vocab), out)


# --------------------------------------------------------------------------------------------------------
# Tiny SD3 teacher
# --------------------------------------------------------------------------------------------------------


def _clip_ids(tokenizer) -> dict[str, int]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _tiny_clip(cls, tokenizer, hidden: int, act: str, projection: int | None = None):
    """A 2-layer CLIP text model (``CLIPTextModel`` or ``CLIPTextModelWithProjection``)."""
    from transformers import CLIPTextConfig

    kwargs = {"projection_dim": projection} if projection else {}
    return cls(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=CLIP_MAX_LENGTH,
            hidden_act=act,
            **kwargs,
            **_clip_ids(tokenizer),
        )
    )


def _tiny_t5(tokenizer, d_model: int = 32):
    """A 2-layer T5 v1.1-style encoder (gated GELU)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=8,
            d_ff=2 * d_model,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            dense_act_fn="gelu_new",
            is_gated_act=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def _tiny_vae(
    latent_channels: int, scaling_factor: float, shift_factor: float | None, quant_conv: bool = False
):
    """A 4-level AutoencoderKL (spatial factor 8) for 128-px images (SD3/FLUX have no quant convs, SDXL has)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=latent_channels,
        sample_size=128,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    )


def save_tiny_pipeline(pipe, out: Path, tokenizers: dict[str, Callable[[Path], None]]) -> None:
    """``save_pretrained`` a tiny pipeline, then rewrite its tokenizer folders with the hand-made ones.

    transformers 5 writes only tokenizer.json for CLIP; the hand-made folders (vocab.json + merges.txt,
    tokenizer.json for T5) load in older versions too. transformers 5 also aliases T5TokenizerFast to
    T5Tokenizer, which older versions read as the slow sentencepiece class, so the fast class is
    recorded in model_index.json, as the real repositories do.
    """
    pipe.save_pretrained(out, safe_serialization=True)
    index = json.loads((out / "model_index.json").read_text(encoding="utf-8"))
    for name, build in tokenizers.items():
        shutil.rmtree(out / name)
        build(out / name)
        index[name] = ["transformers", "T5TokenizerFast" if build is build_t5_tokenizer else "CLIPTokenizer"]
    _write_json(out / "model_index.json", index)


def sd3_tokenizers(out: Path):
    """Write the hand-made tokenizer folders of an SD3 directory (CLIP BPE for ``tokenizer``, T5 Unigram
    for ``tokenizer_3``) and load them: returns ``(clip_tokenizer, t5_tokenizer)``."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    build_clip_tokenizer(out / "tokenizer")
    build_t5_tokenizer(out / "tokenizer_3")
    return CLIPTokenizer.from_pretrained(out / "tokenizer"), T5TokenizerFast.from_pretrained(
        out / "tokenizer_3"
    )


def save_sd3_folder(out: Path, transformer, vae, text_encoders, tokenizers, shift: float) -> None:
    """Assemble a ``StableDiffusion3Pipeline`` from its parts (CLIP-L, CLIP-G, T5 encoders; the CLIP and T5
    tokenizers of :func:`sd3_tokenizers`; a shifted flow-matching scheduler) and save it in the diffusers
    layout with the hand-made tokenizer folders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    clip_tok, t5_tok = tokenizers
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=vae,
        text_encoder=text_encoders[0],
        tokenizer=clip_tok,
        text_encoder_2=text_encoders[1],
        tokenizer_2=clip_tok,
        text_encoder_3=text_encoders[2],
        tokenizer_3=t5_tok,
    )
    save_tiny_pipeline(
        pipe,
        out,
        {
            "tokenizer": build_clip_tokenizer,
            "tokenizer_2": build_clip_tokenizer,
            "tokenizer_3": build_t5_tokenizer,
        },
    )


def build_tiny_sd3(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a complete, randomly initialised tiny stable-diffusion-3 diffusers directory; return its path."""
    import torch
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    out = Path(out_dir)
    clip_tok, t5_tok = sd3_tokenizers(out)

    # fork_rng: seeding must not disturb the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=24,
            pos_embed_max_size=32,
            qk_norm="rms_norm",
            dual_attention_layers=(0,),
        )
        _reinit_zero_outputs(transformer)
        torch.manual_seed(seed)
        text_encoder = _tiny_clip(CLIPTextModelWithProjection, clip_tok, 8, "quick_gelu", projection=8)
        torch.manual_seed(seed)
        text_encoder_2 = _tiny_clip(CLIPTextModelWithProjection, clip_tok, 16, "gelu", projection=16)
        torch.manual_seed(seed)
        text_encoder_3 = _tiny_t5(t5_tok)
        torch.manual_seed(seed)
        vae = _tiny_vae(16, 1.5305, 0.0609)
    save_sd3_folder(
        out, transformer, vae, (text_encoder, text_encoder_2, text_encoder_3), (clip_tok, t5_tok), 3.0
    )
    logger.info("built tiny SD3 teacher (seed %d) in %s", seed, out)
    return out


def build_tiny_flux(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a complete, randomly initialised tiny FLUX.1-dev-style diffusers directory (guidance-distilled
    transformer with a guidance embedder, CLIP pooled + T5 conditioning, dynamic-shift scheduler)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5TokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_clip_tokenizer(out / "tokenizer")
    build_t5_tokenizer(out / "tokenizer_2")
    clip_tok = CLIPTokenizer.from_pretrained(out / "tokenizer")
    t5_tok = T5TokenizerFast.from_pretrained(out / "tokenizer_2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=8,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
        _reinit_zero_outputs(transformer)
        torch.manual_seed(seed)
        text_encoder = _tiny_clip(CLIPTextModel, clip_tok, 8, "quick_gelu")
        torch.manual_seed(seed)
        text_encoder_2 = _tiny_t5(t5_tok)
        torch.manual_seed(seed)
        vae = _tiny_vae(16, 0.3611, 0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
    )
    save_tiny_pipeline(pipe, out, {"tokenizer": build_clip_tokenizer, "tokenizer_2": build_t5_tokenizer})
    logger.info("built tiny FLUX teacher (seed %d) in %s", seed, out)
    return out


def _reinit_zero_outputs(model, std: float = 0.02) -> None:
    """Re-initialise all-zero linear/conv weights (zero-initialised output layers) with small random values."""
    import torch

    with torch.no_grad():
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if (
                isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
                and weight is not None
                and not weight.any()
            ):
                logger.debug("re-initialising zero-initialised layer %s", name)
                weight.normal_(0.0, std)


# --------------------------------------------------------------------------------------------------------
# Tiny shapes data set
# --------------------------------------------------------------------------------------------------------


def _image_size(index: int, resolution: int) -> tuple[int, int]:
    """Return (width, height) of image ``index``: square, landscape (5:4) or portrait (8:11), in turn."""
    kind = index % 3
    if kind == 1:
        return round(resolution * 1.25), resolution
    if kind == 2:
        return resolution, round(resolution * 1.375)
    return resolution, resolution


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, str]:
    """Return an HxWx3 uint8 plain or gradient background and its caption phrase."""
    name = str(rng.choice(list(BACKGROUND_COLORS)))
    base = np.asarray(BACKGROUND_COLORS[name], dtype=np.float32)
    if rng.random() < 0.5:
        return np.broadcast_to(base, (height, width, 3)).astype(np.uint8), f"on a plain {name} background"
    other = np.clip(base + (70.0 if base.mean() < 128 else -70.0), 0, 255)
    if rng.random() < 0.5:
        ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None] * np.ones(
            (1, width, 1), np.float32
        )
    else:
        ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None] * np.ones(
            (height, 1, 1), np.float32
        )
    pixels = base * (1.0 - ramp) + other * ramp
    return np.round(pixels).astype(np.uint8), f"on a {name} gradient background"


def _draw_shape(draw, shape: str, cx: float, cy: float, extent: float, fill: tuple[int, int, int]) -> None:
    """Draw one filled shape of side/diameter ``extent`` centred at (cx, cy)."""
    h = extent / 2.0
    if shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:  # triangle, pointing up
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)


def _make_sample(rng: np.random.Generator, width: int, height: int):
    """Return (PIL image, caption, shapes) for one random scene of 1-3 shapes in distinct grid cells."""
    from PIL import Image, ImageDraw

    pixels, bg_phrase = _background(rng, width, height)
    image = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    draw = ImageDraw.Draw(image)
    count = int(rng.integers(1, 4))
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    colors = rng.choice(list(SHAPE_COLORS), size=count, replace=False)
    cell_w, cell_h = width / 3.0, height / 3.0
    shapes, phrases = [], []
    for cell, color in zip(cells, colors):
        pos_name, pos_phrase, col, row = POSITIONS[int(cell)]
        shape = str(rng.choice(SHAPES))
        size = str(rng.choice(list(SIZES)))
        extent = SIZES[size] * min(width, height)
        slack_x, slack_y = max(cell_w - extent, 0.0) / 2.0, max(cell_h - extent, 0.0) / 2.0
        cx = (col + 0.5) * cell_w + rng.uniform(-0.5, 0.5) * slack_x
        cy = (row + 0.5) * cell_h + rng.uniform(-0.5, 0.5) * slack_y
        _draw_shape(draw, shape, cx, cy, extent, SHAPE_COLORS[str(color)])
        shapes.append(
            {
                "shape": shape,
                "color": str(color),
                "size": size,
                "position": pos_name,
                "center": [round(cx, 2), round(cy, 2)],
                "extent": round(extent, 2),
            }
        )
        phrases.append(f"a {size} {color} {shape} {pos_phrase}")
    body = phrases[0] if count == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return image, f"{body} {bg_phrase}", shapes


def _build_dataset(out_dir: Path, num_images: int, resolution: int, seed: int, path_root: Path) -> Path:
    """Write images + dataset.json into ``out_dir``, recording image paths under ``path_root``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    keys, paths, prompts, shapes = [], [], [], []
    for i in range(num_images):
        key = f"tiny_{i:05d}"
        image, caption, drawn = _make_sample(rng, *_image_size(i, resolution))
        image.save(out_dir / "images" / f"{key}.png", format="PNG")
        keys.append(key)
        paths.append(str(path_root / "images" / f"{key}.png"))
        prompts.append(caption)
        shapes.append(drawn)
    _write_json(out_dir / "dataset.json", {"keys": keys, "image_paths": paths, "prompts": prompts})
    # Ground truth of what was drawn, for tests and inspection (not part of the data set format).
    _write_json(out_dir / "shapes.json", dict(zip(keys, shapes)))
    logger.info("built tiny shapes data set (%d images, seed %d) in %s", num_images, seed, out_dir)
    return out_dir / "dataset.json"


def build_tiny_dataset(
    out_dir: str | os.PathLike, num_images: int = 64, resolution: int = 128, seed: int = 0
) -> Path:
    """Write a procedural captioned shapes data set into ``out_dir``; return the ``dataset.json`` path."""
    out = Path(out_dir).expanduser().resolve()
    return _build_dataset(out, num_images, resolution, seed, path_root=out)


# --------------------------------------------------------------------------------------------------------
# Cache resolution
# --------------------------------------------------------------------------------------------------------


def _build_sd3_into(tmp: Path, final: Path) -> None:
    """Build the tiny teacher (seed 0) into ``tmp``."""
    build_tiny_sd3(tmp, seed=0)


def _build_flux_into(tmp: Path, final: Path) -> None:
    """Build the tiny FLUX teacher (seed 0) into ``tmp``."""
    build_tiny_flux(tmp, seed=0)


def _build_sdxl_into(tmp: Path, final: Path) -> None:
    """Build the tiny SDXL teacher (seed 0) into ``tmp``."""
    from .tiny_sdxl import build_tiny_sdxl

    build_tiny_sdxl(tmp, seed=0)


def _build_shapes_sdxl_into(tmp: Path, final: Path) -> None:
    """The tiny shapes set as DMD2-format latents of the tiny SDXL VAE (128 px -> 4x16x16), in ``tmp``."""
    from .lmdb_convert import convert_json_to_lmdb

    convert_json_to_lmdb(
        resolve_tiny("tiny:shapes"),
        resolve_tiny("tiny:sdxl"),
        tmp,
        resolution=128,
        batch_size=16,
        device="cpu",
        seed=0,
        num_workers=0,
        progress=False,
    )


def _build_shapes_into(tmp: Path, final: Path) -> None:
    """Build the tiny data set (64 images, seed 0) into ``tmp``, recording image paths under ``final``."""
    _build_dataset(tmp, 64, 128, 0, path_root=final)


def _build_dino_into(tmp: Path, final: Path) -> None:
    """The discriminator's tiny DINOv2 (transformers layout)."""
    from ..discriminator.tiny import build_tiny_dino

    build_tiny_dino(tmp, seed=0)


def _build_clip_into(tmp: Path, final: Path) -> None:
    """The discriminator's tiny open_clip CLIP (weights file + open_clip_config.json)."""
    from ..discriminator.tiny import build_tiny_clip

    build_tiny_clip(tmp / "open_clip_model.safetensors", seed=0)


# name -> (builder(tmp_dir, final_dir), path that resolve_tiny returns, relative to the final folder)
_TINY_BUILDERS: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "sd3": (_build_sd3_into, "."),
    "flux": (_build_flux_into, "."),
    "sdxl": (_build_sdxl_into, "."),
    "shapes": (_build_shapes_into, "dataset.json"),
    "shapes_sdxl": (_build_shapes_sdxl_into, "."),
    "dino": (_build_dino_into, "."),
    "clip": (_build_clip_into, "."),
}


def is_tiny(spec: object) -> bool:
    """Return True if ``spec`` names an embedded tiny default (a string starting with ``tiny:``)."""
    return isinstance(spec, str) and spec.strip().startswith(TINY_PREFIX)


def cache_root() -> Path:
    """Return the senseflow cache folder (``$SENSEFLOW_CACHE``, default ``~/.cache/senseflow``)."""
    root = os.environ.get("SENSEFLOW_CACHE") or "~/.cache/senseflow"
    return Path(root).expanduser().resolve()


def resolve_tiny(spec: str) -> Path:
    """Return the path of a tiny default (``tiny:sd3`` teacher dir, ``tiny:shapes`` JSON), building it once."""
    name = spec.strip()[len(TINY_PREFIX) :] if is_tiny(spec) else None
    if name not in _TINY_BUILDERS:
        valid = ", ".join(TINY_PREFIX + n for n in _TINY_BUILDERS)
        raise ConfigError(f"unknown tiny spec {spec!r}: valid names are {valid}")
    builder, relative = _TINY_BUILDERS[name]
    final = cache_root() / "tiny" / f"{name}-v{TINY_VERSION}"
    if not (final / COMPLETE_MARKER).is_file():
        _build_atomically(final, builder)
    return final if relative == "." else final / relative


ARCH_PREFIX = "arch:"
ARCH_ROOT = Path(__file__).resolve().parents[1] / "arch"


def _build_arch_into(name: str):
    def build(tmp: Path, final: Path) -> None:
        shutil.copytree(ARCH_ROOT / name, tmp, dirs_exist_ok=True)
        if not (tmp / "model_index.json").is_file():
            return
        index = json.loads((tmp / "model_index.json").read_text())
        for component, entry in index.items():
            if isinstance(entry, list) and entry[1] == "CLIPTokenizer":
                build_clip_tokenizer(tmp / component)
            elif isinstance(entry, list) and entry[1] in ("T5TokenizerFast", "T5Tokenizer"):
                build_t5_tokenizer(tmp / component)

    return build


def resolve_arch(spec: str) -> Path:
    """A full-size teacher folder with configs only (``arch:sd35_medium``), for ``model.random_init``.

    The architectures are shipped in ``senseflow/arch/``; the tokenizers are the tiny ones (their ids
    index the full-size embedding tables), so everything builds without a download.
    """
    name = spec.strip()[len(ARCH_PREFIX) :]
    if not name or not (ARCH_ROOT / name).is_dir():
        valid = ", ".join(ARCH_PREFIX + p.name for p in sorted(ARCH_ROOT.iterdir()) if p.is_dir())
        raise ConfigError(f"unknown architecture {spec!r}: valid names are {valid}")
    final = cache_root() / "arch" / f"{name}-v{TINY_VERSION}"
    if not (final / COMPLETE_MARKER).is_file():
        _build_atomically(final, _build_arch_into(name))
    return final


def resolve_path(spec: str) -> Path:
    """A config path: ``tiny:<name>`` and ``arch:<name>`` are built on first use, anything else is a path."""
    if is_tiny(spec):
        return resolve_tiny(spec)
    if isinstance(spec, str) and spec.strip().startswith(ARCH_PREFIX):
        return resolve_arch(spec)
    return Path(spec).expanduser()


def _build_atomically(final: Path, builder: Callable[[Path, Path], None]) -> None:
    """Build into a unique temporary sibling of ``final`` and rename it into place (first writer wins)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    start = time.monotonic()
    logger.info("building %s (cache miss) in %s", final.name, tmp)
    try:
        builder(tmp, final)
        if not any(tmp.iterdir()):
            # e.g. transformers' save_pretrained writes nothing on a rank != 0 of a process group
            raise RuntimeError(
                f"building {final.name} wrote no files (resolve assets before torch.distributed)"
            )
        _write_json(tmp / COMPLETE_MARKER, {"name": final.name, "pid": os.getpid(), "built_at": time.time()})
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any other folder
        for _ in range(5):
            try:
                os.rename(tmp, final)
                logger.info("built %s in %.1f s", final, time.monotonic() - start)
                return
            except OSError:
                if (final / COMPLETE_MARKER).is_file():
                    logger.info("%s was built concurrently by another process; using it", final)
                    return
                if not final.exists():
                    raise
                # An incomplete folder that this code did not publish: move it aside and retry.
                stale = final.parent / f".{final.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                logger.warning("replacing incomplete cache folder %s", final)
                try:
                    os.rename(final, stale)
                except OSError:
                    continue
                shutil.rmtree(stale, ignore_errors=True)
        raise OSError(f"could not move {tmp} to {final}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Build the tiny teacher (DIR/sd3) and data set (DIR/shapes) and print their paths."""
    parser = argparse.ArgumentParser(prog="python -m senseflow.data.tiny", description=main.__doc__)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the images")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out).expanduser().resolve()
    teacher = build_tiny_sd3(out / "sd3", seed=args.seed)
    dataset = build_tiny_dataset(out / "shapes", seed=args.seed)
    emit(f"teacher: {teacher}", f"dataset: {dataset}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
