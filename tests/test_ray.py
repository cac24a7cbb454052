"""Ray: the same job on a local Ray instance with 2 actors gives the single process's files and manifest; --ray
without Ray installed is one line naming the install command."""
from __future__ import annotations

import json
import sys

import pytest

from tests.script_utils import load_script
from tests.test_job import JOB, manifest, pixels


def test_without_ray_the_flag_is_one_line(tmp_path, tiny_ckpt, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    monkeypatch.chdir(tmp_path)
    assert load_script("batch_gen").main(["--ckpt", str(tiny_ckpt), *JOB, "--ray", "local"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install -e ".[ray]"' in err


def test_ray_two_workers_make_the_single_process_images(tmp_path, tiny_ckpt, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as the actors (one CPU each) and the single process here
    batch_gen = load_script("batch_gen")
    assert batch_gen.main(["--ckpt", str(tiny_ckpt), *JOB, "--outdir", "one"]) == 0
    assert batch_gen.main(["--ckpt", str(tiny_ckpt), *JOB, "--outdir", "ray", "--ray", "local", "--ray_workers", "2", "--metrics_json", "m.json"]) == 0
    assert pixels(tmp_path / "ray") == pixels(tmp_path / "one")
    assert sorted(line["index"] for line in manifest(tmp_path / "ray")) == list(range(7))
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["images"] == 7 and sum(r["images"] for r in metrics["ranks"]) == 7
    assert {r["rank"] for r in metrics["ranks"]} <= {"worker0", "worker1"}


def test_a_worker_that_dies_loses_nothing(tmp_path, tiny_ckpt, monkeypatch, capsys):
    """worker1 is killed while the job runs: its micro-batch goes to a replacement, every item exists once."""
    ray = pytest.importorskip("ray")
    import threading
    import time

    from microbatch.ray_runner import actor_name

    ray.shutdown()  # a fresh local instance for this job (an earlier test's may still be up)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    batch_gen = load_script("batch_gen")
    slow = ["--ddim_steps", "300", "--n_samples", "8"]  # long enough (about 10 s) to kill a worker mid-job
    assert batch_gen.main(["--ckpt", str(tiny_ckpt), *JOB, *slow, "--outdir", "one"]) == 0
    killed, errors = [], []

    def kill_when_started():
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if ray.is_initialized() and (tmp_path / "ray" / "manifest.jsonl").is_file():
                    ray.kill(ray.get_actor(actor_name("worker1")))
                    killed.append(True)
                    return
            except Exception as e:  # noqa: BLE001 - not started yet (ValueError), or to report
                errors.append(repr(e))
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_when_started, daemon=True)
    watcher.start()
    assert batch_gen.main(["--ckpt", str(tiny_ckpt), *JOB, *slow, "--outdir", "ray", "--ray", "local", "--ray_workers", "2"]) == 0
    watcher.join(5)
    assert killed and "worker1 died" in capsys.readouterr().out, errors[-3:]
    assert sorted(line["index"] for line in manifest(tmp_path / "ray")) == list(range(8))
    assert pixels(tmp_path / "ray") == pixels(tmp_path / "one")
