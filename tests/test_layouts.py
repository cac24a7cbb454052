"""Checkpoint layouts: every layout people's files come in loads the same weights as the canonical one, and files
that are not a full checkpoint (a VAE, a UNet, a LoRA, an embedding, a PNG) get one line saying what they are."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.checkpoint import CheckpointError, ema_key, read_checkpoint
from ldm.util import instantiate_from_config, load_model_from_config
from microbatch.devices import Dtypes
from microbatch.loading import builtin_config, demo_checkpoint, infer_config, load_model
from tests.conftest import REPO, TINY_CONFIG, build_tiny
from tests.script_utils import load_script

F32 = Dtypes(torch.float32, torch.float32, torch.float32)
CPU = torch.device("cpu")
TINY_INPAINT_V1 = REPO / "configs" / "tiny" / "tiny-v1-inpainting.yaml"
TE = "cond_stage_model.transformer."
POSITION_IDS = TE + "text_model.embeddings.position_ids"


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": sd}, path)
    return path


def _assert_same_weights(model: torch.nn.Module, reference: dict[str, torch.Tensor], cast: torch.dtype = torch.float32) -> None:
    own = model.state_dict()
    assert set(own) == set(reference)
    for key, value in reference.items():
        expected = value.to(cast).float() if value.is_floating_point() and key in dict(model.named_parameters()) else value
        assert torch.equal(own[key].float(), expected.float()), key


def _context(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.get_learned_conditioning(["a red circle on a blue background", ""])


def _strip_text_model(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace(TE + "text_model.", TE): v for k, v in sd.items()}


# --- the SD v1 text encoder without text_model. -----------------------------------------------------------------


def test_text_encoder_without_text_model_is_renamed_on_load(tmp_path, tiny_model, caplog):
    sd = tiny_model.state_dict()
    flat = _strip_text_model(sd)
    n_text = sum(1 for k in sd if k.startswith(TE + "text_model."))
    assert n_text > 10 and not any(".text_model." in k for k in flat)
    assert any(k.startswith(TE + "embeddings.") for k in flat) and any(k.startswith(TE + "final_layer_norm.") for k in flat)
    caplog.set_level(logging.INFO)
    path = _save(flat, tmp_path / "merged.safetensors")
    model = load_model_from_config(TINY_CONFIG, path)
    _assert_same_weights(model, sd)
    assert torch.equal(_context(model), _context(tiny_model))
    assert f"renamed {n_text} text-encoder keys" in caplog.text
    # The scripts' loader: the same rename, then the config is inferred from the renamed keys.
    loaded = load_model(path, None, CPU, F32, parameterization="eps")
    assert loaded.config_path == builtin_config("tiny/tiny-v1.yaml")
    _assert_same_weights(loaded.model, sd)


# --- position_ids -------------------------------------------------------------------------------------------------


def _position_ids(kind: str) -> torch.Tensor | None:
    ids = torch.arange(77)[None]
    if kind == "absent":
        return None
    if kind == "int64":
        return ids
    if kind == "float":
        return ids.half()
    corrupted = ids.float()
    corrupted[0, 40:] -= 1e-4  # what averaging merges did: 40 -> 39.9999, truncated to 39 when cast to int
    return corrupted


@pytest.mark.parametrize("kind,notes", [("absent", 0), ("int64", 0), ("float", 1), ("corrupted", 1)])
def test_position_ids_absent_float_or_corrupted_become_arange(tmp_path, tiny_model, caplog, kind, notes):
    sd = dict(tiny_model.state_dict())
    value = _position_ids(kind)
    if value is not None:
        sd[POSITION_IDS] = value
    caplog.set_level(logging.INFO)
    model = load_model_from_config(TINY_CONFIG, _save(sd, tmp_path / f"{kind}.ckpt"))
    _assert_same_weights(model, tiny_model.state_dict())
    embeddings = model.cond_stage_model.transformer.text_model.embeddings
    assert torch.equal(embeddings.position_ids, torch.arange(77)[None])
    assert torch.equal(_context(model), _context(tiny_model))
    assert caplog.text.count("using arange instead") == notes
    if kind == "corrupted":
        assert "differs from arange at 37 positions (position 40 holds 39.9999)" in caplog.text
        # The check can fail: the corrupted ids, if used, change the text conditioning.
        embeddings.position_ids = value.long()
        assert not torch.equal(_context(model), _context(tiny_model))
    if kind == "float":
        assert "is stored as float16" in caplog.text


def test_old_transformers_layout_with_float_position_ids(tmp_path, tiny_model, caplog):
    """Both at once, as in many merged v1 files: no text_model. and a float position_ids under the old name."""
    sd = _strip_text_model(tiny_model.state_dict())
    sd[TE + "embeddings.position_ids"] = torch.arange(77)[None].float()
    caplog.set_level(logging.INFO)
    model = load_model_from_config(TINY_CONFIG, _save(sd, tmp_path / "old.safetensors"))
    _assert_same_weights(model, tiny_model.state_dict())
    assert caplog.text.count("using arange instead") == 1


# --- fp16 / bf16 pruned, EMA-only ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,suffix", [(torch.float16, ".safetensors"), (torch.bfloat16, ".safetensors"), (torch.bfloat16, ".ckpt")])
def test_half_precision_pruned_files_load_cast_to_float32(tmp_path, tiny_model, caplog, dtype, suffix):
    """Pruned: every tensor in fp16 / bf16, schedule buffers included; or without the schedule buffers."""
    caplog.set_level(logging.INFO)
    sd = {k: v.to(dtype) for k, v in tiny_model.state_dict().items()}
    model = load_model_from_config(TINY_CONFIG, _save(sd, tmp_path / f"pruned{suffix}"))
    assert model.model.diffusion_model.out[2].weight.dtype == torch.float32
    _assert_same_weights(model, tiny_model.state_dict(), cast=dtype)
    w = "model.diffusion_model.out.2.weight"
    assert not torch.equal(model.state_dict()[w], tiny_model.state_dict()[w])  # rounded: the cast is real
    # The schedule stays the float32 one computed from the config, not the file's rounded copy.
    assert model.alphas_cumprod.dtype == torch.float32 and torch.equal(model.alphas_cumprod, tiny_model.alphas_cumprod)
    assert not torch.equal(sd["alphas_cumprod"].float(), tiny_model.alphas_cumprod)
    assert "stores 12 schedule buffers in reduced precision" in caplog.text
    without = {k: v for k, v in sd.items() if "." in k}
    model = load_model_from_config(TINY_CONFIG, _save(without, tmp_path / f"no-buffers{suffix}"))
    _assert_same_weights(model, tiny_model.state_dict(), cast=dtype)


def _ema_only(sd: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        out[ema_key(k) if k.startswith("model.diffusion_model.") else k] = v.to(dtype) if v.is_floating_point() else v
    out["model_ema.decay"] = torch.tensor(0.9999)
    out["model_ema.num_updates"] = torch.tensor(1000)
    return out


@pytest.mark.parametrize("use_ema", [None, True, False])
def test_ema_only_files_load_their_ema_unet(tmp_path, tiny_model, caplog, use_ema):
    caplog.set_level(logging.INFO)
    path = _save(_ema_only(tiny_model.state_dict()), tmp_path / "ema-only.ckpt")
    model = load_model_from_config(TINY_CONFIG, path, use_ema=use_ema)
    _assert_same_weights(model, tiny_model.state_dict())
    n_unet = sum(1 for k in tiny_model.state_dict() if k.startswith("model.diffusion_model."))
    assert f"{n_unet} UNet tensors" in caplog.text


def test_fp16_ema_only_file_through_the_scripts_loader(tmp_path, tiny_model):
    path = _save(_ema_only(tiny_model.state_dict(), torch.float16), tmp_path / "ema-fp16.safetensors")
    loaded = load_model(path, TINY_CONFIG, CPU, F32)
    _assert_same_weights(loaded.model, tiny_model.state_dict(), cast=torch.float16)


def test_use_ema_without_ema_weights_uses_the_unet_weights(tmp_path, tiny_model, caplog):
    caplog.set_level(logging.INFO)
    sd = dict(tiny_model.state_dict())
    sd["model_ema.decay"] = torch.tensor(0.9999)  # bookkeeping only: no EMA weights
    model = load_model_from_config(TINY_CONFIG, _save(sd, tmp_path / "plain.ckpt"), use_ema=True)
    _assert_same_weights(model, tiny_model.state_dict())
    assert "holds no EMA weights" in caplog.text


# --- SD 1.5 inpainting --------------------------------------------------------------------------------------------


def test_published_v1_inpainting_config():
    cfg = OmegaConf.load(builtin_config("stable-diffusion/v1-inpainting-inference.yaml"))
    params = cfg.model.params
    assert cfg.model.target == "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
    assert params.conditioning_key == "hybrid" and params.finetune_keys is None
    assert params.unet_config.params.in_channels == 9 and params.unet_config.params.context_dim == 768
    assert params.cond_stage_config.target == "ldm.modules.encoders.modules.FrozenCLIPEmbedder"


def test_sd15_inpainting_inferred_from_full_size_shapes():
    cfg = OmegaConf.load(builtin_config("stable-diffusion/v1-inpainting-inference.yaml"))
    with torch.device("meta"):
        sd = instantiate_from_config(cfg.model).state_dict()
    assert tuple(sd["model.diffusion_model.input_blocks.0.0.weight"].shape[:2]) == (320, 9)
    config, reason = infer_config(sd, Path("sd-v1-5-inpainting.ckpt"))
    assert config == builtin_config("stable-diffusion/v1-inpainting-inference.yaml")
    assert "SD v1" in reason and "768-wide context" in reason and "inpainting" in reason
    # The plain v1 shapes still give the plain config.
    cfg = OmegaConf.load(builtin_config("stable-diffusion/v1-inference.yaml"))
    with torch.device("meta"):
        sd = instantiate_from_config(cfg.model).state_dict()
    assert infer_config(sd, Path("v1-5.ckpt"))[0] == builtin_config("stable-diffusion/v1-inference.yaml")


def test_tiny_v1_inpainting_checkpoint_loads_without_config(tmp_path):
    from ldm.models.diffusion.ddpm import LatentInpaintDiffusion

    reference = build_tiny(TINY_INPAINT_V1, seed=3)
    path = _save(reference.state_dict(), tmp_path / "tiny-inpainting.safetensors")
    loaded = load_model(path, None, CPU, F32)
    assert loaded.config_path == TINY_INPAINT_V1 and isinstance(loaded.model, LatentInpaintDiffusion)
    assert "inpainting UNet" in loaded.config_reason and "SD v1" in loaded.config_reason
    _assert_same_weights(loaded.model, reference.state_dict())
    assert loaded.unet.in_channels == 9 and loaded.model.model.conditioning_key == "hybrid"


# --- files that are not a full checkpoint ---------------------------------------------------------------------------


def _partial_files(sd: dict[str, torch.Tensor]) -> dict[str, tuple[object, str]]:
    """name -> (content, expected message part). Content is a state dict, or an object for torch.save."""
    vae = {k: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    unet = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    return {
        "vae.safetensors": ({k[len("first_stage_model."):]: v for k, v in vae.items()}, "is a VAE-only file, not a full checkpoint: pass it with --vae"),
        "vae-prefixed.ckpt": (vae, "is a VAE-only file (first_stage_model.*), not a full checkpoint: pass it with --vae"),
        "unet.safetensors": (unet, "is a UNet-only file (model.diffusion_model.*, no VAE or text encoder), not a full checkpoint"),
        "unet-bare.safetensors": ({k[len("model.diffusion_model."):]: v for k, v in unet.items()}, "is a UNet-only file"),
        "kohya.safetensors": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
                               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
                               "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0)},
                              "is a LoRA (kohya lora_unet_* / lora_te_* keys), not a full checkpoint"),
        "peft.safetensors": ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32),
                              "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 4)},
                             "is a LoRA (PEFT *.lora_A / *.lora_B keys)"),
        "diffusers-lora.bin": ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": torch.zeros(4, 32),
                                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": torch.zeros(32, 4),
                                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": torch.zeros(4, 32)},
                               "is a LoRA (lora_down / lora_up keys)"),
        "emb.safetensors": ({"emb_params": torch.zeros(2, 768)}, "is a textual-inversion embedding (emb_params), not a full checkpoint"),
        "ti.pt": ({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(2, 768)}, "name": "style", "step": 3000},
                  "is a textual-inversion embedding (string_to_param), not a checkpoint"),
        "single.pt": (torch.zeros(768), "is a textual-inversion embedding (a single tensor of shape (768,)), not a checkpoint"),
    }


def _write(content: object, path: Path) -> Path:
    if path.suffix == ".safetensors":
        return _save(content, path)
    torch.save(content, path)
    return path


def test_partial_files_given_as_the_checkpoint_say_what_they_are(tmp_path, tiny_model):
    for name, (content, expected) in _partial_files(tiny_model.state_dict()).items():
        path = _write(content, tmp_path / name)
        for load in (lambda: load_model_from_config(TINY_CONFIG, path), lambda: load_model(path, None, CPU, F32)):
            with pytest.raises(CheckpointError) as e:
                load()
            message = str(e.value)
            assert message.startswith(str(path)) and expected in message, (name, message)
            assert "\n" not in message and "would run code" not in message


def test_a_checkpoint_without_its_text_encoder_is_a_key_error_not_a_kind(tmp_path, tiny_model):
    """A damaged full checkpoint stays explained by the strict key check."""
    sd = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith(TE + "text_model.encoder.layers.1.")}
    with pytest.raises(CheckpointError, match=r"does not fit the model config: \d+ weights missing \(\d+ text encoder\)"):
        load_model_from_config(TINY_CONFIG, _save(sd, tmp_path / "damaged.safetensors"))


def test_partial_file_through_the_script_is_one_line(tmp_path, tiny_model, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    content, _ = _partial_files(tiny_model.state_dict())["vae.safetensors"]
    path = _write(content, tmp_path / "x.safetensors")
    code = load_script("txt2img").main(["--ckpt", str(path), "--ddim_steps", "2", "--precision", "full", "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "x.safetensors is a VAE-only file, not a full checkpoint: pass it with --vae" in err


# --- not a checkpoint at all (issue 18 item 8) ---------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x02\x00\x00\x00\x90\x91h6"


def _not_checkpoints(tmp_path: Path) -> dict[Path, str]:
    import zipfile

    g = torch.Generator().manual_seed(7)
    noise = bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist())
    assert noise[0] != 0x80 and noise[8] != ord("{")
    files = {
        tmp_path / "image.ckpt": (PNG, "is not a checkpoint (it is a PNG image)"),
        tmp_path / "image.safetensors": (PNG, "is not a checkpoint (it is a PNG image)"),
        tmp_path / "photo.pt": (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + noise, "is not a checkpoint (it is a JPEG image)"),
        tmp_path / "noise.ckpt": (noise, f"is not a checkpoint (unrecognised content starting with bytes {noise[:8].hex(' ')})"),
        tmp_path / "page.safetensors": (b"<!DOCTYPE html><html><body>Not found</body></html>\n", "is not a checkpoint (it is an HTML page, perhaps a failed download)"),
        tmp_path / "lfs.ckpt": (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 4\n", "is not a checkpoint (it is a Git LFS pointer"),
    }
    with zipfile.ZipFile(tmp_path / "archive.ckpt", "w") as z:
        z.writestr("readme.txt", "hello")
    out = {path: expected for path, (data, expected) in files.items()}
    for path, (data, _) in files.items():
        path.write_bytes(data)
    out[tmp_path / "archive.ckpt"] = "is not a checkpoint (it is a zip archive without PyTorch's data.pkl, holding e.g. readme.txt)"
    return out


def test_non_checkpoints_are_named_not_called_unsafe_pickles(tmp_path):
    for path, expected in _not_checkpoints(tmp_path).items():
        with pytest.raises(CheckpointError) as e:
            read_checkpoint(path)
        message = str(e.value)
        assert message.startswith(str(path)) and expected in message, message
        assert "would run code" not in message and "trust-pickle" not in message and "\n" not in message


def test_convert_with_trust_pickle_on_a_non_checkpoint_is_one_line(tmp_path, capsys):
    convert = load_script("convert_checkpoint")
    for path, expected in _not_checkpoints(tmp_path).items():
        for flags in (["--trust-pickle"], []):
            out = tmp_path / f"{path.stem}-{len(flags)}.safetensors"
            assert convert.main([str(path), str(out), *flags]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and expected in err and "Traceback" not in err, err
            assert not out.exists()


def test_convert_with_trust_pickle_still_converts_real_files(tmp_path, tiny_ckpt, tiny_model):
    convert = load_script("convert_checkpoint")
    out = tmp_path / "trusted.safetensors"
    assert convert.main([str(tiny_ckpt), str(out), "--trust-pickle"]) == 0
    assert set(read_checkpoint(out)[0]) == set(tiny_model.state_dict())
    again = tmp_path / "again.safetensors"  # a safetensors input needs no unpickling at all
    assert convert.main([str(out), str(again), "--trust-pickle"]) == 0 and again.is_file()


def test_format_comes_from_the_content_not_the_suffix(tmp_path, tiny_model):
    st = _save(tiny_model.state_dict(), tmp_path / "model.safetensors")
    renamed = tmp_path / "model.ckpt"
    shutil.copy(st, renamed)
    _assert_same_weights(load_model_from_config(TINY_CONFIG, renamed), tiny_model.state_dict())


def test_legacy_torch_format_and_stray_lora_keys(tmp_path, tiny_model):
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": tiny_model.state_dict()}, legacy, _use_new_zipfile_serialization=False)
    _assert_same_weights(load_model_from_config(TINY_CONFIG, legacy), tiny_model.state_dict())
    # A full checkpoint with a stray LoRA key is a full checkpoint whose extra key the strict check names.
    sd = {**tiny_model.state_dict(), "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}
    with pytest.raises(CheckpointError, match=r"does not fit the model config: 1 unexpected weights, e.g. lora_unet_mid"):
        load_model_from_config(TINY_CONFIG, _save(sd, tmp_path / "stray.safetensors"))


# --- the shipped demo file (issue 18 item 11) ----------------------------------------------------------------------


def test_demo_file_loads_without_ignored_keys(caplog):
    """The demo file's one key outside the model is `scale_factor`, the measured latent scale: used, not ignored."""
    ckpt = demo_checkpoint()
    if ckpt is None:
        pytest.skip("this installation has no demo model")
    sd, _ = read_checkpoint(ckpt)
    caplog.set_level(logging.INFO)
    loaded = load_model(ckpt, None, CPU, F32, is_demo=True)
    extra = set(sd) - set(loaded.model.state_dict())
    assert extra == {"scale_factor"}
    assert "ignoring" not in caplog.text and "extra keys" not in caplog.text
    assert loaded.model.scale_factor == float(sd["scale_factor"])


def test_a_file_scale_factor_replaces_the_config_value_with_a_note(tmp_path, tiny_model, caplog):
    sd = dict(tiny_model.state_dict())
    sd["scale_factor"] = torch.tensor(0.5)
    caplog.set_level(logging.INFO)
    model = load_model_from_config(TINY_CONFIG, _save(sd, tmp_path / "scaled.safetensors"))
    assert model.scale_factor == 0.5
    assert "scale_factor 0.5 from" in caplog.text and "replaces the config's 0.18215" in caplog.text
    assert "ignoring" not in caplog.text
