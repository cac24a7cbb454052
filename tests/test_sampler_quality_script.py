"""scripts/sampler_quality.py end to end on a few samplers: the analytic tables, and the real-model table at the
scale the scripts would use for that model (its yaml's sampling_defaults.scale, else 7.5, or --scale)."""
from __future__ import annotations

from tests.conftest import TINY_CONFIG
from tests.script_utils import load_script


def test_report_sections_and_the_real_models_scale(tmp_path):
    sq = load_script("sampler_quality")
    rec = tmp_path / "rec.yaml"
    rec.write_text(TINY_CONFIG.read_text() + "\nsampling_defaults:\n  scale: 2.0\n")
    base = ["--samplers", "ddim,euler", "--ref_steps", "50", "--search_max", "3", "--device", "cpu"]
    for name, extra, expect in [("plain", ["--config", str(TINY_CONFIG)], "guidance 7.5,"), ("rec", ["--config", str(rec)], "guidance 2,"),
                                ("given", ["--config", str(rec), "--scale", "3"], "guidance 3,")]:
        out = tmp_path / name
        assert sq.main(base + extra + ["--outdir", str(out)]) == 0
        text = (out / "quality.md").read_text()
        assert "## Analytic model, default schedules" in text and "## Real model, default schedules" in text, text
        real = text[text.index("## Real model"):]
        assert expect in real, real[:400]
        assert "| ddim | uniform | 1 |" in real and "| euler | karras | 1 |" in real
        assert (out / "quality.csv").is_file() and (out / "quality.png").is_file()
    # --scale also sets the analytic model's guidance
    assert "Exact Gaussian model with guidance 3," in (tmp_path / "given" / "quality.md").read_text()


def test_a_bad_checkpoint_is_one_line(tmp_path, capsys):
    sq = load_script("sampler_quality")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    argv = ["--samplers", "ddim", "--ref_steps", "50", "--search_max", "2", "--outdir", str(tmp_path / "o"), "--ckpt", str(bad)]
    assert sq.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "bad.ckpt" in err[0], err
