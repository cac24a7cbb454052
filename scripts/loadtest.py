#!/usr/bin/env python3
"""A bounded load test of the server on the loopback address: N concurrent clients, throughput and latency.

For each `--batching` mode it starts `scripts/serve.py` (the demo model unless --ckpt; CPU float32 by default) on
a free port of 127.0.0.1, then for each client count sends `--requests` txt2img requests per client (each client
waits for its answer before sending the next; prompts and seeds differ per request), and reports requests per
second, images per second and the p50 / p95 latency. Every answer is checked: HTTP 200, the right number of images,
and, across modes, the same pixels for the same request. Run it on an otherwise idle machine.

    python scripts/loadtest.py                                   # batching on vs off, 1, 4 and 16 clients
    python scripts/loadtest.py --clients 16 --modes on --steps 20 --json load.json
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle on a blue background", "a green square", "two yellow triangles", "a blue circle on a white background"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--clients", type=str, default="1,4,16", help="comma-separated concurrent client counts")
    p.add_argument("--requests", type=int, default=3, help="requests per client, per client count")
    p.add_argument("--modes", type=str, default="on,off", help="--batching modes to measure, comma-separated")
    p.add_argument("--steps", type=int, default=20, help="sampling steps per request")
    p.add_argument("--sampler", type=str, default="Euler a", help="the web UI's sampler name")
    p.add_argument("--size", type=int, default=64, help="width and height in pixels")
    p.add_argument("--batch_size", type=int, default=1, help="images per request")
    p.add_argument("--max_batch_size", type=str, default="16", help="the server's --max_batch_size")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server process")
    p.add_argument("--ckpt", type=str, default=None, help="checkpoint (default: the demo model)")
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--precision", type=str, default="full")
    p.add_argument("--json", type=str, default=None, help="write the results here")
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: Optional[dict] = None, timeout: float = 600.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read() or b"null")


def start_server(args: argparse.Namespace, mode: str, log: Any) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, str(REPO / "scripts" / "serve.py"), "--port", str(port), "--device", args.device, "--precision", args.precision,
           "--batching", mode, "--max_batch_size", args.max_batch_size, "--max_queue", "256", "--max_steps", str(max(150, args.steps))]
    if args.ckpt:
        cmd += ["--ckpt", args.ckpt]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tempfile.gettempdir())
    base = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see its log")
        try:
            call(f"{base}/sdapi/v1/options", timeout=5)
            return proc, base
        except OSError:
            if time.monotonic() > end:
                proc.kill()
                raise RuntimeError("the server did not start within 300 s")
            time.sleep(0.2)


def body_for(args: argparse.Namespace, n: int) -> dict:
    return {"prompt": PROMPTS[n % len(PROMPTS)], "seed": 1000 + n, "steps": args.steps, "sampler_name": args.sampler, "cfg_scale": 7,
            "width": args.size, "height": args.size, "batch_size": args.batch_size}


def run_clients(base: str, args: argparse.Namespace, clients: int, first: int) -> dict:
    """`clients` threads, each sending args.requests requests one after another; request numbers from `first`."""
    latencies: list[float] = []
    digests: dict[int, str] = {}

    def client(c: int) -> None:
        for k in range(args.requests):
            n = first + c * args.requests + k
            t0 = time.perf_counter()
            status, out = call(f"{base}/sdapi/v1/txt2img", body_for(args, n))
            latencies.append(time.perf_counter() - t0)
            if status != 200 or len(out["images"]) != args.batch_size:
                raise RuntimeError(f"request {n}: HTTP {status}, {len(out.get('images', []))} images")
            digests[n] = hashlib.sha256("".join(out["images"]).encode()).hexdigest()

    before = call(f"{base}/microbatch/v1/batching")[1]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client, c) for c in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    after = call(f"{base}/microbatch/v1/batching")[1]
    calls = after["unet_calls"] - before["unet_calls"]
    rows = after["rows"] - before["rows"]
    requests = clients * args.requests
    return {
        "clients": clients, "requests": requests, "wall_s": round(wall, 3), "requests_per_s": round(requests / wall, 3),
        "images_per_s": round(requests * args.batch_size / wall, 3), "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(percentile(latencies, 95), 3), "unet_calls": calls, "rows_per_call": round(rows / calls, 2) if calls else 0.0,
        "shared_calls": after["shared_calls"] - before["shared_calls"], "digests": digests,
    }


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, linear between closest ranks."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    if any(m not in ("on", "off") for m in modes) or any(c < 1 for c in counts) or args.requests < 1:
        print("error: --modes takes on and/or off; --clients and --requests positive integers", file=sys.stderr)
        return 2
    results: dict[str, list[dict]] = {}
    for mode in modes:
        with tempfile.NamedTemporaryFile("w+", suffix=f"-serve-{mode}.log", delete=False) as log:
            proc, base = start_server(args, mode, log)
            try:
                call(f"{base}/sdapi/v1/txt2img", body_for(args, 10**6))  # warm-up, not counted
                first = 0
                results[mode] = []
                for clients in counts:
                    row = run_clients(base, args, clients, first)
                    first += row["requests"]
                    results[mode].append(row)
                    print(f"batching {mode:3} {clients:3} clients: {row['requests_per_s']:.2f} req/s, p50 {row['p50_s']:.2f} s, "
                          f"p95 {row['p95_s']:.2f} s, {row['rows_per_call']:.1f} rows/UNet call", flush=True)
            finally:
                proc.terminate()
                proc.wait(120)
    # Every image right: the same request gives the same pixels in every mode.
    if len(results) > 1:
        digests = [{n: d for row in rows for n, d in row["digests"].items()} for rows in results.values()]
        if any(d != digests[0] for d in digests[1:]):
            print("error: a request gave other pixels with batching on than off", file=sys.stderr)
            return 1
    print()
    print("| clients | batching | requests | req/s | p50 s | p95 s | rows/UNet call | shared calls |")
    print("|---:|:---|---:|---:|---:|---:|---:|---:|")
    for i, clients in enumerate(counts):
        for mode in modes:
            r = results[mode][i]
            print(f"| {clients} | {mode} | {r['requests']} | {r['requests_per_s']:.2f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['rows_per_call']:.1f} | {r['shared_calls']} |")
    if "on" in results and "off" in results:
        print()
        for i, clients in enumerate(counts):
            on, off = results["on"][i], results["off"][i]
            print(f"{clients} clients: throughput on/off {on['requests_per_s'] / off['requests_per_s']:.2f}x, p95 on/off {on['p95_s'] / off['p95_s']:.2f}")
    if args.json:
        for rows in results.values():
            for row in rows:
                row.pop("digests")
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
