"""The demo model's training code (microbatch.demo.train, scripts/train_demo.py) on a few steps.

The real run takes about an hour; here every stage runs for one or two steps on a handful of images, and what must
hold afterwards is asserted: the checkpoint loads strictly through the normal loader, its UNet holds the exported
EMA, the scale factor is the measured one, a resumed run continues from the saved step, and bad settings are refused
with a one-line error.
"""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from ldm.util import load_model_from_config
from microbatch.demo import train as T

ROOT = Path(__file__).resolve().parents[1]


def tiny_settings(tmp_path: Path, **overrides) -> T.TrainSettings:
    values = dict(
        out=tmp_path / "out", workdir=tmp_path / "work", threads=1, ae_steps=2, ae_batch=2, ae_warmup=1,
        n_latents=8, scale_images=8, unet_steps=2, unet_batch=4, warmup_steps=1, snapshot_every=1, log_every=1,
        ae_autocast="off",
    )
    values.update(overrides)
    return T.TrainSettings(**values)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"ae_steps": 0}, "ae_steps 0 needs ae_from"),
        ({"ae_autocast": "maybe"}, "ae_autocast must be one of auto, on, off, got 'maybe'"),
        ({"uncond_prob": 1.0}, "uncond_prob must be in [0, 1)"),
        ({"unet_batch": 0}, "unet_batch must be >= 1"),
        ({"scale_images": 9}, "scale_images (9) must not exceed n_latents (8)"),
    ],
)
def test_bad_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError) as err:
        tiny_settings(tmp_path, **overrides)
    assert message in str(err.value)


def test_cosine_lr_warms_up_then_decays_to_the_floor():
    assert T.cosine_lr(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert T.cosine_lr(9, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert T.cosine_lr(55, 100, 1.0, warmup=10, floor=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert T.cosine_lr(100, 100, 1.0, warmup=10, floor=0.1) == pytest.approx(0.1)
    assert T.cosine_lr(70, 100, 2.0, warmup=10, floor=1.0) == pytest.approx(2.0)  # floor 1: constant


def test_config_with_scale_rewrites_one_line_and_keeps_comments(tmp_path):
    text = T.config_with_scale(T.DEFAULT_CONFIG, 0.123456)
    assert "scale_factor: 0.12346" in text
    assert text.splitlines()[0].startswith("#")
    bad = tmp_path / "two.yaml"
    bad.write_text("scale_factor: 1\nscale_factor: 2\n")
    with pytest.raises(ValueError, match="exactly one scale_factor line, found 2"):
        T.config_with_scale(bad, 0.5)


def test_a_short_run_writes_a_checkpoint_that_loads_strictly_and_resumes(tmp_path, caplog):
    caplog.set_level("INFO", logger=T.__name__)
    torch_threads = torch.get_num_threads()
    try:
        summary = T.train(tiny_settings(tmp_path))
        path = Path(summary["checkpoint"]["path"])
        assert path == tmp_path / "out" / "demo-shapes.safetensors"
        model = load_model_from_config(path.with_suffix(".yaml"), path)  # strict key check
        assert model.scale_factor == pytest.approx(summary["latents"]["scale_factor"], abs=1e-5)
        assert math.isfinite(model.scale_factor) and model.scale_factor != 1.0
        assert "scale_factor: 1.0" not in path.with_suffix(".yaml").read_text()
        for part in ("l1", "color", "shape", "background"):
            assert 0.0 <= summary["ae"][part] <= 2.0
        # Snapshots every step: the resumable state says step 1; a resumed run to step 3 starts there.
        state = torch.load(tmp_path / "work" / T.STATE_FILE, map_location="cpu", weights_only=True)
        assert state["step"] == 1
        frozen = tmp_path / "work" / T.FROZEN_FILE
        resumed = T.train(tiny_settings(tmp_path, ae_from=frozen, ae_steps=0, unet_steps=3, resume=True))
        assert resumed["ae"]["from"] == str(frozen)
        again = load_model_from_config(path.with_suffix(".yaml"), path)
        # Same autoencoder (loaded, not retrained) and the same encoded latents (cached by fingerprint).
        for key, value in model.state_dict().items():
            if key.startswith("first_stage_model."):
                assert torch.equal(value, again.state_dict()[key]), key
        assert resumed["latents"]["scale_factor"] == pytest.approx(summary["latents"]["scale_factor"])
        assert "resumed the UNet stage at step 1" in caplog.text
    finally:
        torch.set_num_threads(torch_threads)


def test_script_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "scripts" / "train_demo.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--ae_steps", "0", "--workdir", str(tmp_path)]) == 2
    assert script.main(["--ae_from", str(tmp_path / "missing.safetensors"), "--workdir", str(tmp_path)]) == 2
    assert script.main(["--finetune_decoder", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: ae_steps 0 needs ae_from (a saved stage-a file) to skip the autoencoder stage",
        f"error: --ae_from {tmp_path / 'missing.safetensors'} not found",
        f"error: --finetune_decoder {tmp_path / 'missing.safetensors'} not found",
    ]


def test_training_never_replaces_the_shipped_weights_by_default(tmp_path, capsys):
    shipped = ROOT / "microbatch" / "assets"
    assert (shipped / "demo-shapes.safetensors").is_file()
    assert T.TrainSettings().out == ROOT / "outputs" / "demo-train"
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "scripts" / "train_demo.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.build_parser().parse_args([]).out.resolve() != shipped.resolve()
    with pytest.raises(ValueError, match="holds the shipped demo weights"):
        tiny_settings(tmp_path, out=shipped)
    assert tiny_settings(tmp_path, out=shipped, replace_shipped=True).out == shipped  # explicit: allowed
    checkpoint = shipped / "demo-shapes.safetensors"
    before = checkpoint.stat().st_mtime_ns
    assert script.main(["--out", str(shipped), "--workdir", str(tmp_path)]) == 2
    assert script.main(["--finetune_decoder", str(checkpoint), "--out", str(shipped)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --out {shipped} holds the shipped demo weights (demo-shapes.safetensors); pass --replace_shipped to overwrite them"] * 2
    assert checkpoint.stat().st_mtime_ns == before
