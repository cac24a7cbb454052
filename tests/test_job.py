"""Jobs: files named by item, the manifest, --resume, another job's outdir, and torchrun ranks sharing a queue
(subprocesses on the loopback address, bounded in time; every process they start is stopped)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.script_utils import REPO, load_script

TINY = str(REPO / "configs" / "tiny" / "tiny-v1.yaml")
JOB = ["--prompt", "a cat", "--n_samples", "7", "--max_batch_size", "2", "--W", "32", "--H", "32", "--ddim_steps", "3",
       "--precision", "full", "--quiet", "--device", "cpu", "--config", TINY]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]  # rendezvous on a free loopback port


def manifest(outdir: Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / "manifest.jsonl").read_text().splitlines() if line.strip()]


def pixels(outdir: Path) -> dict[str, bytes]:
    out = {}
    for path in sorted((outdir / "samples").glob("*.png")):
        with Image.open(path) as im:
            out[path.name] = im.tobytes() + im.info["parameters"].encode()
    return out


@pytest.fixture
def single(tmp_path, tiny_ckpt, monkeypatch):
    """One process (1 thread, as each CPU rank below): the reference images of the job."""
    monkeypatch.chdir(tmp_path)
    assert load_script("batch_gen").main(["--ckpt", str(tiny_ckpt), *JOB, "--outdir", "one"]) == 0
    return tmp_path / "one"


def test_files_are_named_by_item_and_recorded(single):
    lines = manifest(single)
    assert sorted(line["index"] for line in lines) == list(range(7))
    assert sorted(p.name for p in (single / "samples").glob("*.png")) == [f"{i:05d}.png" for i in range(7)]
    for line in lines:
        assert line["file"] == f"samples/{line['index']:05d}.png" and line["seed"] == 42 + line["index"] and line["rank"] == "rank0"
    job = json.loads((single / "job.json").read_text())
    assert job["request"]["prompt"] == "a cat" and "max_batch_size" not in job["request"]


def test_temporary_files_of_a_killed_writer_are_removed(single, tiny_ckpt, capsys):
    """A writer killed while saving leaves samples/.partial-*.png; the next run of the job (and the end of every
    run) removes it."""
    stray = single / "samples" / ".partial-killed.png"
    stray.write_bytes(b"\x89PNG half an image")
    assert load_script("batch_gen").main(["--ckpt", str(tiny_ckpt), *JOB, "--outdir", str(single), "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert not stray.exists() and len(list((single / "samples").glob("*.png"))) == 7


def test_a_revoked_writer_records_nothing_and_the_rest_goes_back(single):
    """The fence for a worker reported dead whose process still runs: what it recorded before the fence stays done,
    its appends after the fence are refused, so each item ends up recorded once (by it or by its replacement)."""
    from microbatch.engine import ImageJob
    from microbatch.job import Manifest

    book = Manifest(single)
    lines = {line.index: line for line in book.lines()}
    # Items 5 and 6 were not recorded yet when the worker "died".
    kept = [line for line in book.path.read_text().splitlines() if json.loads(line)["index"] not in (5, 6)]
    book.path.write_text("\n".join(kept) + "\n")
    jobs = [ImageJob(i, "a cat", 42 + i) for i in (4, 5, 6)]
    lease = single / ".revoked" / "batch"
    assert book.append(lines[5], lease) is True  # before the fence: recorded, so not redone
    left = book.revoke(lease, jobs)
    assert [job.index for job in left] == [6] and lease.is_file()
    assert book.append(lines[6], lease) is False  # the dead worker, after the fence
    assert sorted(line.index for line in book.lines()) == list(range(6))
    assert book.append(lines[6]) is True  # its replacement
    assert sorted(line.index for line in book.lines()) == list(range(7))


def test_rerun_needs_resume_and_resume_redoes_only_damaged_items(single, tiny_ckpt, capsys):
    batch_gen = load_script("batch_gen")
    before = pixels(single)
    capsys.readouterr()
    assert batch_gen.main(["--ckpt", str(tiny_ckpt), *JOB, "--outdir", str(single)]) == 2
    err = capsys.readouterr().err
    assert "pass --resume" in err and err.count("\n") == 1
    assert batch_gen.main(["--ckpt", str(tiny_ckpt), *JOB, "--outdir", str(single), "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().out and len(manifest(single)) == 7
    # Damage two items (one truncated, one removed) and resume with another micro-batch size: exactly those are redone.
    data = (single / "samples" / "00003.png").read_bytes()
    (single / "samples" / "00003.png").write_bytes(data[: len(data) // 2])
    (single / "samples" / "00005.png").unlink()
    assert batch_gen.main(["--ckpt", str(tiny_ckpt), *JOB, "--outdir", str(single), "--resume", "--max_batch_size", "3"]) == 0
    assert "5 of 7 images done, 2 to make (1 damaged or unrecorded files redone)" in capsys.readouterr().out
    assert pixels(single) == before
    assert sorted(line["index"] for line in manifest(single)[7:]) == [3, 5]


def test_another_jobs_outdir_is_refused(single, tiny_ckpt, capsys):
    other = [a if a != "a cat" else "a dog" for a in JOB]
    assert load_script("batch_gen").main(["--ckpt", str(tiny_ckpt), *other, "--outdir", str(single), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds another job" in err and "'a cat' there, 'a dog' now" in err and err.count("\n") == 1


def _torchrun(tiny_ckpt: Path, outdir: Path, extra: list[str], cwd: Path, launcher: tuple = ()) -> subprocess.Popen:
    cmd = [*TORCHRUN, *launcher, "--nproc_per_node", "2", str(REPO / "scripts" / "batch_gen.py"), "--ckpt", str(tiny_ckpt), *JOB, *extra, "--outdir", str(outdir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MICROBATCH_TEST_JOB": str(outdir)}
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{out[-3000:]}")
    return proc.returncode, out


def test_torchrun_two_ranks_make_the_same_images(single, tiny_ckpt, tmp_path):
    code, out = _finish(_torchrun(tiny_ckpt, tmp_path / "two", ["--metrics_json", str(tmp_path / "m.json")], tmp_path))
    assert code == 0, out[-3000:]
    assert pixels(tmp_path / "two") == pixels(single)
    assert sorted(line["index"] for line in manifest(tmp_path / "two")) == list(range(7))
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["images"] == 7 and [r["rank"] for r in metrics["ranks"]] == ["rank0", "rank1"]
    assert sum(r["images"] for r in metrics["ranks"]) == 7


def _rank_pids(marker: str) -> dict[int, int]:
    """{RANK: pid} of the torchrun workers started with MICROBATCH_TEST_JOB=marker in their environment."""
    return load_script("scaleout_sim").rank_pids(marker, "MICROBATCH_TEST_JOB")


@pytest.mark.parametrize("restarts", [0, 1])
def test_a_killed_rank_then_resume_gives_every_item_once(single, tiny_ckpt, tmp_path, restarts):
    """Without restarts the job fails and a rerun with --resume completes it; with torchrun --max-restarts the
    restarted ranks resume by themselves."""
    outdir = tmp_path / "killed"
    slow = ["--ddim_steps", "250", "--n_samples", "10"]  # long enough to kill a rank mid-job
    proc = _torchrun(tiny_ckpt, outdir, slow, tmp_path, launcher=["--max-restarts", str(restarts)])
    deadline = time.time() + 180
    killed = False
    while time.time() < deadline and proc.poll() is None:
        if (outdir / "manifest.jsonl").is_file() and manifest(outdir):
            pids = _rank_pids(str(outdir))
            if 1 in pids:
                os.kill(pids[1], signal.SIGKILL)
                killed = True
                break
        time.sleep(0.05)
    code, out = _finish(proc)
    assert killed, out[-3000:]
    if restarts:
        assert code == 0, out[-3000:]
    else:
        assert code != 0 and len({line["index"] for line in manifest(outdir)}) < 10, out[-3000:]
        assert load_script("batch_gen").main(["--ckpt", str(tiny_ckpt), *JOB, *slow, "--outdir", str(outdir), "--resume"]) == 0
    indices = [line["index"] for line in manifest(outdir)]
    assert sorted(indices) == list(range(10))  # every item exactly once
    assert not list(outdir.rglob(".partial*"))
    # The same images as one uninterrupted process with the same settings.
    shutil.rmtree(single)
    assert load_script("batch_gen").main(["--ckpt", str(tiny_ckpt), *JOB, *slow, "--outdir", str(single)]) == 0
    assert pixels(outdir) == pixels(single)


def test_skip_save_measures_without_files(tmp_path, tiny_ckpt, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    batch_gen = load_script("batch_gen")
    assert batch_gen.main(["--ckpt", str(tiny_ckpt), *JOB, "--outdir", "s", "--skip_save", "--metrics_json", "m.json"]) == 0
    assert "nothing saved" in capsys.readouterr().out
    assert not list((tmp_path / "s").rglob("*.png")) and not (tmp_path / "s" / "manifest.jsonl").exists()
    assert not (tmp_path / "s" / "job.json").exists()
    assert json.loads((tmp_path / "m.json").read_text())["images"] == 7
    assert batch_gen.main(["--ckpt", str(tiny_ckpt), *JOB, "--outdir", "s", "--skip_save", "--resume"]) == 2


def _manifest_matches_files(outdir: Path) -> list[int]:
    """The indices of the manifest; asserts each line's file is in place with the hash it records."""
    import hashlib

    lines = manifest(outdir)
    for line in lines:
        path = outdir / line["file"]
        assert path.is_file(), line
        assert hashlib.sha256(path.read_bytes()).hexdigest() == line["sha256"], line
    return [line["index"] for line in lines]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_launcher_stops_every_rank_and_keeps_finished_images(tiny_ckpt, tmp_path, sig):
    """SIGINT / SIGTERM to torchrun: the ranks stop after their current step; the images and manifest lines made so
    far stay whole, and --resume makes only the rest."""
    outdir = tmp_path / "stopped"
    slow = ["--ddim_steps", "250", "--n_samples", "10"]
    proc = _torchrun(tiny_ckpt, outdir, slow, tmp_path)
    deadline = time.time() + 180
    sent = False
    while time.time() < deadline and proc.poll() is None:
        if (outdir / "manifest.jsonl").is_file() and manifest(outdir) and len(_rank_pids(str(outdir))) == 2:
            os.kill(proc.pid, sig)  # the launcher only, as a terminal's Ctrl-C or a scheduler's kill would
            sent = True
            break
        time.sleep(0.05)
    code, out = _finish(proc)
    assert sent, out[-3000:]
    assert code != 0, out[-3000:]
    assert not _rank_pids(str(outdir)), "a rank outlived the launcher"
    done = _manifest_matches_files(outdir)
    assert 0 < len(done) < 10 and len(set(done)) == len(done), out[-3000:]
    assert not list(outdir.rglob(".partial*")) and len(list((outdir / "samples").glob("*.png"))) == len(done)
    first = {line["index"]: line["sha256"] for line in manifest(outdir)}

    assert load_script("batch_gen").main(["--ckpt", str(tiny_ckpt), *JOB, *slow, "--outdir", str(outdir), "--resume"]) == 0
    indices = _manifest_matches_files(outdir)
    assert sorted(indices) == list(range(10))  # every item exactly once
    assert {i: h for i, h in ((line["index"], line["sha256"]) for line in manifest(outdir)) if i in first} == first


def test_an_outdir_not_shared_between_nodes_is_refused(tiny_ckpt, tmp_path):
    """Two torchrun "nodes" on this machine, each in its own folder with a relative --outdir: rank 1 cannot see rank
    0's files, as on machines without a shared file system, and the job stops at the start with one line."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for node in ("node0", "node1"):
        (tmp_path / node).mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", node[-1],
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "notshared",
               "--rdzv_conf", "is_host=" + ("1" if node == "node0" else "0"),
               str(REPO / "scripts" / "batch_gen.py"), "--ckpt", str(tiny_ckpt), *JOB, "--outdir", "out"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MICROBATCH_TEST_JOB": f"notshared-{node}"}
        procs.append(subprocess.Popen(cmd, cwd=tmp_path / node, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True))
    results = [_finish(p, timeout=180) for p in procs]
    out = "\n".join(o for _, o in results)
    assert all(code != 0 for code, _ in results), out[-3000:]
    assert "is not shared between the ranks" in out and "cannot see rank 0's files" in out, out[-3000:]
    for node in ("node0", "node1"):
        assert not list((tmp_path / node).rglob("*.png")), out[-3000:]


def test_scaleout_costs_are_measured(tmp_path):
    """The figures behind the README's scaling analysis come from a real store and manifest."""
    costs = load_script("scaleout_sim").measure_costs(tmp_path, n=50)
    assert costs["queue_claim_us"] > 0 and costs["manifest_append_us"] > 0
    assert 150 < costs["manifest_line_bytes"] < 400
    assert not (tmp_path / "manifest.jsonl").exists()


def test_a_stop_between_micro_batches_ends_the_job(tiny_ckpt, tmp_path):
    """A signal that arrives while no generate call runs (between two micro-batches) is not lost: run_job asks
    should_stop before every claim."""
    from microbatch import GenerationRequest, Pipeline
    from microbatch.runner import Rank, run_job

    pipe = Pipeline.from_checkpoint(tiny_ckpt, config=TINY, device="cpu", precision="full")
    request = GenerationRequest(prompt="a cat", n_samples=6, n_iter=1, steps=2, height=32, width=32, max_batch_size=2)
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) > 1  # the stop comes after the first micro-batch finished

    report = run_job(pipe, Rank(), request, tmp_path, request.jobs(), save_images=False, should_stop=should_stop)
    assert report.interrupted and report.images == 2
