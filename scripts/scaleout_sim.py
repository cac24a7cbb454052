"""Scale-out on one machine: many torchrun CPU ranks on a tiny model, some slowed down at random, some killed.

    python scripts/scaleout_sim.py --ranks 16 --images 160 --kills 2 --out sim

Each rank runs the real batch_gen job code (queue in the rendezvous store, files, manifest); this harness only makes
chosen ranks slower (a sleep of `slowdown - 1` times each micro-batch's own time after it) and kills random ranks
with SIGKILL while the job runs, under `torchrun --max-restarts`. At the end it checks that every item exists
exactly once in the manifest and as a file, and prints per-rank images, images/s and idle fraction from the job's
metrics. Nothing here is used by the scripts; it is a measurement.

    python scripts/scaleout_sim.py --costs

measures instead the per-operation costs the README's scaling analysis uses: a queue claim (one `TCPStore.add`
round trip on the loopback) and a locked manifest append (in `--out`), and the bytes of a manifest line.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a source checkout

MARK = "MICROBATCH_SIM"


def worker(argv: list[str]) -> int:
    """One rank: slow this rank's micro-batches down by its factor, then run batch_gen's job code."""
    import microbatch.pipeline as pipeline_module
    from microbatch.cli import main_for

    factor = json.loads(os.environ[MARK + "_SLOW"]).get(os.environ.get("RANK", "0"), 1.0)
    real = pipeline_module.Pipeline.generate

    def slowed(self, *args, **kwargs):
        start = time.perf_counter()
        result = real(self, *args, **kwargs)
        time.sleep((factor - 1.0) * (time.perf_counter() - start))
        return result

    pipeline_module.Pipeline.generate = slowed
    return main_for("batch_gen", None, argv)


def ckpt_for_sim(folder: Path) -> Path:
    import torch

    from ldm.util import load_model_from_config

    path = folder / "tiny-sim.ckpt"
    if not path.is_file():
        torch.manual_seed(0)
        model = load_model_from_config(REPO / "configs" / "tiny" / "tiny-v1.yaml", None)
        torch.save({"state_dict": model.state_dict()}, path)
    return path


def rank_pids(marker: str, variable: str = MARK) -> dict[int, int]:
    """{RANK: pid} of the torchrun workers on this machine whose environment has `variable`=`marker`."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text(errors="replace").split("\0") if "=" in kv)
        except OSError:
            continue
        if env.get(variable) == marker and "LOCAL_RANK" in env:
            out[int(env["RANK"])] = int(entry.name)
    return out


def measure_costs(folder: Path, n: int = 3000) -> dict[str, float]:
    """Microseconds per queue claim and per manifest append, and bytes per manifest line."""
    from datetime import timedelta

    import torch.distributed as dist

    from microbatch.job import Manifest, ManifestLine

    server = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=30))
    client = dist.TCPStore("127.0.0.1", server.port, 1, False, timeout=timedelta(seconds=30))
    start = time.perf_counter()
    for _ in range(n):
        client.add("queue", 8)
    claim_us = (time.perf_counter() - start) / n * 1e6
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.jsonl").unlink(missing_ok=True)
    manifest = Manifest(folder)
    line = ManifestLine(index=123456, prompt="a photograph of an astronaut riding a horse", negative_prompt="", seed=42,
                        file="samples/123456.png", sha256="0" * 64, rank="rank17", seconds=1.234)
    start = time.perf_counter()
    for _ in range(n):
        manifest.append(line)
    append_us = (time.perf_counter() - start) / n * 1e6
    line_bytes = (folder / "manifest.jsonl").stat().st_size / n
    (folder / "manifest.jsonl").unlink()
    return {"queue_claim_us": round(claim_us, 1), "manifest_append_us": round(append_us, 1), "manifest_line_bytes": round(line_bytes, 1)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=16)
    p.add_argument("--images", type=int, default=160)
    p.add_argument("--batch", type=int, default=2, help="images per micro-batch")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--slow_ranks", type=int, default=4, help="ranks slowed down by a random factor in [2, 4]")
    p.add_argument("--kills", type=int, default=2, help="ranks killed with SIGKILL during the job")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=str, default="outputs/scaleout-sim")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--verbose", action="store_true", help="the ranks print tracebacks")
    p.add_argument("--costs", action="store_true", help="only measure a queue claim and a manifest append, and print them")
    args = p.parse_args(argv)
    if args.costs:
        print(json.dumps(measure_costs(Path(args.out).resolve() / "costs")))
        return 0
    rng = random.Random(args.seed)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    outdir = out / "job"
    ckpt = ckpt_for_sim(out)
    slow = {str(r): round(rng.uniform(2, 4), 2) for r in rng.sample(range(args.ranks), min(args.slow_ranks, args.ranks))}
    job = ["--ckpt", str(ckpt), "--config", str(REPO / "configs" / "tiny" / "tiny-v1.yaml"), "--prompt", "a cat", "--n_samples",
           str(args.images), "--max_batch_size", str(args.batch), "--W", "32", "--H", "32", "--ddim_steps", str(args.steps),
           "--precision", "full", "--quiet", "--device", "cpu", "--skip_grid", "--outdir", str(outdir), "--metrics_json", str(out / "metrics.json"),
           *(["--verbose"] if args.verbose else [])]
    # Two restarts beyond the kills: on an oversubscribed CPU, gloo can time out connecting the ranks at a start.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--max-restarts", str(args.kills + 2),
           "--nproc_per_node", str(args.ranks), str(Path(__file__).resolve()), "--worker", *job]
    env = {**os.environ, "OMP_NUM_THREADS": "1", MARK: str(outdir), MARK + "_SLOW": json.dumps(slow), "PYTHONPATH": str(REPO)}
    print(f"{args.ranks} ranks, {args.images} images, micro-batch {args.batch}, slowed ranks {slow}, {args.kills} kills")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    kills = []
    try:
        manifest = outdir / "manifest.jsonl"
        while proc.poll() is None and time.perf_counter() - start < args.timeout:
            done = len(manifest.read_text().splitlines()) if manifest.is_file() else 0
            # Kill at evenly spaced points of the job's progress.
            if len(kills) < args.kills and done >= (len(kills) + 1) * args.images // (args.kills + 2):
                pids = rank_pids(str(outdir))
                if pids:
                    victim = rng.choice(sorted(pids))
                    os.kill(pids[victim], signal.SIGKILL)
                    kills.append((victim, done))
                    print(f"killed rank {victim} at {done} manifest lines")
            time.sleep(0.2)
        output, _ = proc.communicate(timeout=max(1.0, args.timeout - (time.perf_counter() - start)))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    wall = time.perf_counter() - start
    (out / "torchrun.log").write_text(output)
    lines = [json.loads(line) for line in (outdir / "manifest.jsonl").read_text().splitlines() if line.strip()]
    indices = [line["index"] for line in lines]
    files = sorted(int(f.stem) for f in (outdir / "samples").glob("*.png"))
    once = sorted(indices) == list(range(args.images)) and files == list(range(args.images))
    print(f"exit {proc.returncode}; wall {wall:.1f} s; manifest lines {len(lines)}, distinct items {len(set(indices))}, "
          f"files {len(files)}: every item exactly once: {once}")
    if (out / "metrics.json").is_file():
        metrics = json.loads((out / "metrics.json").read_text())
        print("last round (after the restarts): rank, images, images/s, idle %, slowdown")
        for r in metrics["ranks"]:
            rank = r["rank"].removeprefix("rank")
            print(f"  {r['rank']:>6} {r['images']:>4} {r['images_per_s'] or 0:8.3f} {100 * r['idle_fraction']:6.1f}  x{slow.get(rank, 1.0)}")
    by_rank: dict[str, int] = {}
    for line in lines:
        by_rank[line["rank"]] = by_rank.get(line["rank"], 0) + 1
    print("images per rank over the whole job:", dict(sorted(by_rank.items(), key=lambda kv: int(kv[0].removeprefix("rank")))))
    if proc.returncode != 0:
        print(f"torchrun failed; its output is in {out / 'torchrun.log'}")
    return 0 if once and proc.returncode == 0 else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2:]))
    sys.exit(main())
