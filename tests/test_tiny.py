"""Tests of senseflow.data.tiny: tiny tokenizers, tiny SD3 teacher, shapes data set and the tiny cache."""

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from senseflow.data import tiny
from senseflow.errors import ConfigError

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
WEIGHT_FILES = {
    "transformer": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",
    "text_encoder_3": "model.safetensors",
}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return tiny.build_tiny_sd3(tmp_path_factory.mktemp("teacher") / "sd3", seed=0)


@pytest.fixture(scope="module")
def pipe(teacher_dir):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(teacher_dir)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("SENSEFLOW_CACHE", str(root))
    return root


def _weights(model_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {c: load_file(model_dir / c / WEIGHT_FILES[c]) for c in COMPONENTS}


# ---------------------------------------------------------------------------------------------- teacher


def test_teacher_layout(teacher_dir):
    for sub in COMPONENTS + ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"):
        assert (teacher_dir / sub).is_dir(), sub
    index = json.loads((teacher_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["tokenizer_3"] == ["transformers", "T5TokenizerFast"]
    for sub in ("tokenizer", "tokenizer_2"):  # hand-made files, readable by slow tokenizers too
        assert (teacher_dir / sub / "vocab.json").is_file() and (teacher_dir / sub / "merges.txt").is_file()
    cfg = json.loads((teacher_dir / "transformer" / "config.json").read_text())
    assert (cfg["num_layers"], cfg["joint_attention_dim"], cfg["pooled_projection_dim"]) == (2, 32, 24)
    assert cfg["dual_attention_layers"] == [0] and cfg["qk_norm"] == "rms_norm"
    vae = json.loads((teacher_dir / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 16 and vae["scaling_factor"] == 1.5305 and vae["shift_factor"] == 0.0609
    sched = json.loads((teacher_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler" and sched["shift"] == 3.0


def test_teacher_generates_image(pipe):
    gen = torch.Generator().manual_seed(0)
    out = pipe("a large red circle at the top left", num_inference_steps=2, output_type="np", generator=gen)
    assert out.images.shape == (1, 128, 128, 3)
    assert np.isfinite(out.images).all()
    gen = torch.Generator().manual_seed(0)
    latents = pipe("a small blue square", num_inference_steps=2, output_type="latent", generator=gen).images
    assert latents.shape == (1, 16, 16, 16) and torch.isfinite(latents).all()


def test_encode_prompt_shapes_and_token_ids(pipe):
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        "a red circle", None, None, do_classifier_free_guidance=True, max_sequence_length=77
    )
    assert embeds.shape == (1, 154, 32) and neg.shape == (1, 154, 32)
    assert pooled.shape == (1, 24) and neg_pooled.shape == (1, 24)
    assert torch.isfinite(embeds).all() and torch.isfinite(pooled).all()
    for enc in (pipe.text_encoder, pipe.text_encoder_2):  # pooled output is read at <|endoftext|>
        assert enc.config.eos_token_id == pipe.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        assert enc.config.vocab_size == len(pipe.tokenizer)
    assert pipe.text_encoder_3.config.vocab_size == len(pipe.tokenizer_3)


def test_prompt_changes_transformer_output(pipe):
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    outs = []
    with torch.no_grad():
        for prompt in ("a large red circle at the top left", "a small blue triangle at the bottom right"):
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt, None, None, do_classifier_free_guidance=False, max_sequence_length=77
            )
            outs.append(
                pipe.transformer(
                    hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t
                ).sample
            )
    assert outs[0].abs().mean() > 0.1  # not a zero-initialised output layer
    assert (outs[0] - outs[1]).abs().mean() > 1e-2 * outs[0].abs().mean()
    with torch.no_grad():  # and it depends on the input latents
        other = pipe.transformer(
            hidden_states=x + 1.0, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t
        ).sample
    assert not torch.allclose(other, outs[1])


def test_same_seed_same_weights(teacher_dir, tmp_path):
    again = _weights(tiny.build_tiny_sd3(tmp_path / "again", seed=0))
    other = tiny.build_tiny_sd3(tmp_path / "other", seed=1)
    first = _weights(teacher_dir)
    for comp in COMPONENTS:
        assert first[comp].keys() == again[comp].keys()
        for key, value in first[comp].items():
            assert torch.equal(value, again[comp][key]), f"{comp}.{key}"
    proj = "proj_out.weight"
    assert not torch.equal(
        first["transformer"][proj], load_file(other / "transformer" / WEIGHT_FILES["transformer"])[proj]
    )


# ---------------------------------------------------------------------------------------------- tokenizers


def test_clip_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    tiny.build_clip_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert tok.model_max_length == 77
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and tok.bos_token == "<|startoftext|>"
    for word in tiny.tokenizer_words():
        assert tok.tokenize(word) == [word + "</w>"], word
    caption = "A large red circle at the top left and a small blue square at the bottom right"
    ids = tok(caption, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tok.bos_token_id and ids[1 + len(caption.split())] == tok.eos_token_id
    assert ids[1 : 1 + len(caption.split())] == tok.convert_tokens_to_ids(
        [w.lower() + "</w>" for w in caption.split()]
    )
    # unseen words split into known pieces (no unknown token), any ASCII text works
    ids = tok("zorgblat Qx_9~!").input_ids
    assert len(ids) > 4 and tok.eos_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True) == "zorgblat qx _ 9 ~!"


def test_t5_tokenizer(tmp_path):
    from transformers import T5TokenizerFast

    tiny.build_t5_tokenizer(tmp_path)
    tok = T5TokenizerFast.from_pretrained(tmp_path)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.model_max_length == 512
    ids = tok("a large red circle").input_ids
    assert len(ids) == 5 and ids[-1] == 1
    assert tok.convert_ids_to_tokens(ids[:-1]) == ["\u2581a", "\u2581large", "\u2581red", "\u2581circle"]
    ids = tok("Zorgblat, qx_9~!").input_ids
    assert ids[-1] == 1 and 2 not in ids  # no <unk> for ASCII text
    assert tok.decode(ids, skip_special_tokens=True) == "Zorgblat, qx_9~!"
    padded = tok("a red circle", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[3] == 1 and set(padded[4:]) == {0}


# ---------------------------------------------------------------------------------------------- data set


def test_dataset(tmp_path):
    path = tiny.build_tiny_dataset(tmp_path / "shapes", num_images=12, resolution=128, seed=3)
    assert path == (tmp_path / "shapes" / "dataset.json").resolve()
    data = json.loads(path.read_text())
    assert set(data) == {"keys", "image_paths", "prompts"}
    assert len(data["keys"]) == len(data["image_paths"]) == len(data["prompts"]) == 12
    assert data["keys"][0] == "tiny_00000" and len(set(data["keys"])) == 12
    truth = json.loads((path.parent / "shapes.json").read_text())
    sizes = []
    for key, image_path, prompt in zip(data["keys"], data["image_paths"], data["prompts"]):
        assert Path(image_path).is_absolute() and Path(image_path).is_file()
        image = Image.open(image_path)
        assert image.mode == "RGB"
        sizes.append(image.size)
        shapes = truth[key]
        assert 1 <= len(shapes) <= 3
        first = shapes[0]
        assert prompt.startswith(f"a {first['size']} {first['color']} {first['shape']} ")
        for shape in shapes:
            assert f"{shape['color']} {shape['shape']}" in prompt and shape["position"] in prompt
            cx, cy = (round(v) for v in shape["center"])
            assert image.getpixel((cx, cy)) == tiny.SHAPE_COLORS[shape["color"]], (key, shape)
    assert sorted(set(sizes)) == [(128, 128), (128, 176), (160, 128)]
    assert all(sizes.count(s) == 4 for s in set(sizes))


def test_dataset_deterministic(tmp_path):
    a = tiny.build_tiny_dataset(tmp_path / "a", num_images=6, seed=5)
    b = tiny.build_tiny_dataset(tmp_path / "b", num_images=6, seed=5)
    c = tiny.build_tiny_dataset(tmp_path / "c", num_images=6, seed=6)
    pa, pb, pc = (json.loads(p.read_text())["prompts"] for p in (a, b, c))
    assert pa == pb and pa != pc
    for i in range(6):
        name = f"images/tiny_{i:05d}.png"
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes()


# ---------------------------------------------------------------------------------------------- cache


def test_resolve_tiny_builds_once(cache, monkeypatch):
    path = tiny.resolve_tiny("tiny:shapes")
    final = cache.resolve() / "tiny" / "shapes-v1"
    assert path == final / "dataset.json"
    marker = final / ".complete"
    stamp = marker.stat().st_mtime_ns
    data = json.loads(path.read_text())
    assert len(data["keys"]) == 64
    assert all(Path(p).parent == final / "images" and Path(p).is_file() for p in data["image_paths"])

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a complete cache folder")

    monkeypatch.setattr(tiny, "_build_dataset", fail)
    assert tiny.resolve_tiny(" tiny:shapes") == path
    assert marker.stat().st_mtime_ns == stamp
    assert [p.name for p in final.parent.iterdir()] == ["shapes-v1"]  # no temporary folders left


def test_resolve_tiny_replaces_incomplete_folder(cache):
    final = cache / "tiny" / "shapes-v1"
    final.mkdir(parents=True)
    (final / "junk.txt").write_text("left over")
    path = tiny.resolve_tiny("tiny:shapes")
    assert path.is_file() and (final / ".complete").is_file() and not (final / "junk.txt").exists()
    assert sorted(p.name for p in final.parent.iterdir()) == ["shapes-v1"]


def _resolve_in_child(barrier, queue, specs):
    barrier.wait(timeout=60)
    queue.put([str(tiny.resolve_tiny(spec)) for spec in specs])


def test_resolve_tiny_concurrent_processes(cache):
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    specs = ["tiny:shapes", "tiny:sd3"]
    procs = [ctx.Process(target=_resolve_in_child, args=(barrier, queue, specs)) for _ in range(2)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert results[0] == results[1]
    shapes, sd3 = (Path(p) for p in results[0])
    assert shapes == cache.resolve() / "tiny" / "shapes-v1" / "dataset.json" and shapes.is_file()
    assert sd3 == cache.resolve() / "tiny" / "sd3-v1" and (sd3 / "model_index.json").is_file()
    assert (sd3 / ".complete").is_file()
    assert sorted(p.name for p in (cache / "tiny").iterdir()) == ["sd3-v1", "shapes-v1"]
    assert tiny.resolve_tiny("tiny:sd3") == sd3


def test_unknown_spec(cache):
    with pytest.raises(ConfigError, match=r"tiny:nope.*tiny:sd3.*tiny:flux.*tiny:sdxl.*tiny:shapes"):
        tiny.resolve_tiny("tiny:nope")
    with pytest.raises(ConfigError):
        tiny.resolve_tiny("sd3")
    assert tiny.is_tiny("tiny:sd3") and tiny.is_tiny("tiny:nope")
    assert not tiny.is_tiny("stabilityai/stable-diffusion-3.5-medium") and not tiny.is_tiny(None)
    assert not cache.exists()


def test_cli(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(tiny, "build_tiny_sd3", lambda out, seed=0: calls.append(("sd3", out, seed)) or out)
    assert tiny.main(["--out", str(tmp_path), "--seed", "2"]) == 0
    assert calls == [("sd3", tmp_path.resolve() / "sd3", 2)]
    printed = capsys.readouterr().out
    assert str(tmp_path.resolve() / "sd3") in printed
    assert str(tmp_path.resolve() / "shapes" / "dataset.json") in printed
    assert (tmp_path / "shapes" / "dataset.json").is_file()
