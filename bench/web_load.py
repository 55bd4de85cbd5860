"""Load figures of the web app (issue 18): what floods of requests do to a running ``factedit serve``.

    python bench/web_load.py [--predicts 200] [--slow 5000] [--uploads 10] [--big-uploads 20 --big-mib 60]
                             [--out out/web_load.json] [--pythonpath DIR --serve-args "..."]

Starts ``factedit serve --port 0`` in a subprocess (default limits, ``--no-persist``, one torch thread
unless OMP_NUM_THREADS says otherwise), then, one after another:

1. ``--predicts`` concurrent ``/api/predict`` requests (one connection each): latency p50 / p95 / max,
   status counts, and ``/api/info`` latency polled every 50 ms meanwhile;
2. ``--slow`` slow connections (each sends half a request line, then nothing): what a legitimate
   ``/api/info`` gets meanwhile (status, latency), how many slow ones the server closed, its open
   descriptors;
3. ``--uploads`` uploads of a zero patch of the embedding matrix (~195 KB file; applying it keeps
   the replaced 108 MiB weight so that it can be reverted): server RSS after each, statuses;
4. ``--big-uploads`` concurrent uploads of ``--big-mib`` MiB each (``Expect: 100-continue``, as curl sends):
   peak server RSS growth, statuses;
5. the largest trace the schema allows (64 tokens, 50 samples, window 64): status and message.

Prints the figures and the machine, and writes them as JSON to ``--out``; a count of 0 skips a
scenario. ``--pythonpath`` runs the server from another source tree (e.g. an unpacked older commit,
with ``--serve-args ""`` for its options) to compare before and after on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from machine import cpu_name, usable_cores

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"


def machine() -> str:
    cpu = cpu_name()
    cores = usable_cores()
    return (
        f"{cpu}; {os.cpu_count()} cores ({cores} usable); "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; python {platform.python_version()}"
    )


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


# --------------------------------------------------------------------------- raw HTTP


def request_bytes(method: str, path: str, body: bytes = b"", ctype: str = "application/json") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    if body or method == "POST":
        head += f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def parse(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    try:
        return status, json.loads(body) if body else {}
    except ValueError:
        return status, {"raw": body[:200].decode("latin-1")}


def http(port: int, method: str, path: str, body: bytes = b"", ctype: str = "application/json", timeout=120.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request_bytes(method, path, body, ctype))
        chunks = []
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
    return parse(b"".join(chunks))


async def ahttp(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, dict, float]:
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request_bytes(method, path, body))
        await writer.drain()
        raw = await reader.read()
        writer.close()
        status, data = parse(raw)
    except OSError as exc:
        status, data = 0, {"error": str(exc)}
    return status, data, time.perf_counter() - started


def http_expect(port: int, path: str, body: bytes, ctype: str, timeout: float = 120.0) -> tuple[int, dict]:
    """A POST with ``Expect: 100-continue`` (as curl sends for bodies over 1 MiB): the body goes only after
    the server's 100, so a refusal (503) arrives before the body is sent."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
        if data.startswith(b"HTTP/1.1 100"):
            s.sendall(body)
            data = data.partition(b"\r\n\r\n")[2]
        while chunk := s.recv(1 << 16):
            data += chunk
    return parse(data)


def multipart(data: bytes) -> tuple[bytes, str]:
    boundary = "factedit-bench-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="p.safetensors"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


# --------------------------------------------------------------------------- the server


class Server:
    def __init__(self, args) -> None:
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        if args.pythonpath:
            env["PYTHONPATH"] = args.pythonpath
        extra = shlex.split(args.serve_args)
        cmd = [sys.executable, "-c", "from factedit.cli.main import app; app()", "serve", "--port", "0", *extra]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.port = None
        self.log: list[str] = []
        deadline = time.monotonic() + 600
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.log.append(line.rstrip())
            m = re.search(r"at http://127\.0\.0\.1:(\d+)/", line)
            if m:
                self.port = int(m.group(1))
                break
            if time.monotonic() > deadline:
                break
        if self.port is None:
            raise SystemExit("the server did not start:\n" + "\n".join(self.log[-20:]))
        threading.Thread(target=self._drain, daemon=True).start()
        self.ps = psutil.Process(self.proc.pid)

    def _drain(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.log.append(line.rstrip())

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def fds(self) -> int:
        return self.ps.num_fds()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wait_job(port: int, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, job = http(port, "GET", f"/api/jobs/{job_id}")
        if job.get("status") not in ("queued", "running"):
            return job
        time.sleep(0.1)
    return {"status": "timeout"}


# --------------------------------------------------------------------------- scenarios


async def predict_flood(port: int, n: int) -> dict:
    body = json.dumps({"prompt": PROMPT, "k": 5}).encode()
    info_lat: list[float] = []
    done = asyncio.Event()

    async def poll_info() -> None:
        while not done.is_set():
            status, _, seconds = await ahttp(port, "GET", "/api/info")
            info_lat.append(seconds if status == 200 else float("inf"))
            await asyncio.sleep(0.05)

    poller = asyncio.create_task(poll_info())
    started = time.perf_counter()
    results = await asyncio.gather(*(ahttp(port, "POST", "/api/predict", body) for _ in range(n)))
    wall = time.perf_counter() - started
    done.set()
    await poller
    lat = [s for status, _, s in results if status == 200]
    codes: dict[str, int] = {}
    for status, _data, _ in results:
        codes[str(status)] = codes.get(str(status), 0) + 1
    busy = sum(1 for status, data, _ in results if status == 503 and "busy" in str(data.get("detail", "")))
    return {
        "requests": n,
        "wall_s": round(wall, 2),
        "status": codes,
        "busy_answers": busy,
        "latency_p50_s": round(pct(lat, 0.5), 3),
        "latency_p95_s": round(pct(lat, 0.95), 3),
        "latency_max_s": round(max(lat), 3) if lat else None,
        "info_polls": len(info_lat),
        "info_p50_s": round(pct(info_lat, 0.5), 4),
        "info_max_s": round(max(info_lat), 4) if info_lat else None,
    }


def slow_flood(server: Server, n: int) -> dict:
    port = server.port
    fds_before = server.fds()
    slow: list[socket.socket] = []
    refused_connect = 0
    started = time.perf_counter()
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /api/info HTTP/1.1\r\nHo")  # half a request, then nothing
            s.setblocking(False)
            slow.append(s)
        except OSError:
            refused_connect += 1
    opened = time.perf_counter() - started
    fds_peak = server.fds()
    legit = []
    for _ in range(10):
        t = time.perf_counter()
        try:
            status, reply = http(port, "GET", "/api/info", timeout=30)
        except OSError as exc:
            status, reply = 0, {"detail": str(exc)}
        legit.append({"status": status, "seconds": round(time.perf_counter() - t, 4), "detail": reply.get("detail")})
        time.sleep(0.2)
    time.sleep(0.5)
    closed = 0  # the server answered (a JSON 503 "waited longest" or 408) and/or closed the connection
    for s in slow:
        try:
            s.recv(1 << 12)
            closed += 1
        except BlockingIOError:  # still open, nothing received
            pass
        except OSError:
            closed += 1
        s.close()
    return {
        "slow_connections": n,
        "connect_failures": refused_connect,
        "open_seconds": round(opened, 2),
        "closed_by_server": closed,
        "server_fds_before": fds_before,
        "server_fds_with_flood": fds_peak,
        "legit_info": legit,
    }


def zero_embedding_patch(model) -> bytes:
    import torch

    from factedit.editing.patch import Patch, PatchEntry
    from factedit.models.architectures import arch_for, get_parameter
    from factedit.models.fingerprint import model_fingerprint, tensor_sha256

    name = arch_for(model).embed + ".weight"
    weight = get_parameter(model, name)
    entry = PatchEntry(
        name=name,
        shape=tuple(weight.shape),
        left=torch.zeros(weight.shape[0], 1),
        right=torch.zeros(1, weight.shape[1]),
        base_sha256=tensor_sha256(weight),
    )
    return Patch.for_model(model, method="rome", entries=[entry], base_fingerprint=model_fingerprint(model)).to_bytes()


def repeated_uploads(server: Server, data: bytes, n: int) -> dict:
    port = server.port
    body, ctype = multipart(data)
    rss = [server.rss()]
    steps = []
    applied = []
    for _ in range(n):
        status, reply = http(port, "POST", "/api/patches/upload", body, ctype)
        job = wait_job(port, reply["job"]["id"]) if status == 202 else None
        if job and job.get("status") == "done":
            applied.append(job["result"]["patch"]["id"])
        rss.append(server.rss())
        steps.append({"status": status, "job": job and job.get("status"), "detail": str(reply.get("detail", ""))[:160]})
    for patch_id in reversed(applied):
        status, reply = http(port, "POST", f"/api/patches/{patch_id}/revert")
        if status == 202:
            wait_job(port, reply["job"]["id"])
    growth = [round((b - a) / 2**20, 1) for a, b in zip(rss, rss[1:])]
    return {
        "file_bytes": len(data),
        "uploads": n,
        "applied": len(applied),
        "steps": steps,
        "rss_mib": [round(r / 2**20, 1) for r in rss],
        "rss_growth_mib_per_upload": growth,
        "rss_after_reverts_mib": round(server.rss() / 2**20, 1),
    }


def big_uploads(server: Server, n: int, mib: int) -> dict:
    port = server.port
    body, ctype = multipart(os.urandom(mib * 2**20))
    base = server.rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                peak.append(server.rss())
            except psutil.Error:
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results: list[tuple[int, str]] = [(-1, "")] * n

    def send(i: int) -> None:
        try:
            status, reply = http_expect(port, "/api/patches/upload", body, ctype, timeout=120)
            results[i] = (status, str(reply.get("detail", ""))[:120])
        except OSError as exc:  # a refusal while the body was still being sent: the server closed
            results[i] = (0, f"connection closed while sending ({type(exc).__name__})")

    started = time.perf_counter()
    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    time.sleep(0.3)
    stop.set()
    sampler.join()
    codes: dict[str, int] = {}
    for status, _ in results:
        codes[str(status)] = codes.get(str(status), 0) + 1
    return {
        "uploads": n,
        "mib_each": mib,
        "wall_s": round(wall, 2),
        "status": codes,
        "examples": sorted({d for _, d in results})[:4],
        "rss_peak_growth_mib": round((max(peak) - base) / 2**20, 1),
    }


def largest_trace(port: int, tok) -> dict:
    words = SUBJECT
    while len(tok(words + " the")["input_ids"]) <= 64:
        words += " the"
    body = json.dumps({"prompt": words, "subject": SUBJECT, "samples": 50, "window": 64}).encode()
    t = time.perf_counter()
    status, reply = http(port, "POST", "/api/trace", body)
    out = {"tokens": len(tok(words)["input_ids"]), "status": status, "seconds": round(time.perf_counter() - t, 3)}
    out.update({k: reply.get(k) for k in ("detail", "estimate", "limit")})
    if status == 202:  # an unbounded server queued it: cancel if it can, or say how long it would run
        job = reply.get("job", {})
        out["queued"] = True
        if job.get("id"):
            http(port, "POST", f"/api/jobs/{job['id']}/cancel")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--predicts", type=int, default=200)
    ap.add_argument("--slow", type=int, default=5000)
    ap.add_argument("--uploads", type=int, default=10)
    ap.add_argument("--big-uploads", type=int, default=20)
    ap.add_argument("--big-mib", type=int, default=60)
    ap.add_argument("--serve-args", default="--no-persist", help="options for factedit serve (default --no-persist)")
    ap.add_argument("--pythonpath", default=None, help="run the server from this source tree")
    ap.add_argument("--out", default=str(REPO / "out" / "web_load.json"))
    args = ap.parse_args()

    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.slow + 1024
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, want), hard))

    from factedit.models import load_model

    print("machine:", machine(), flush=True)
    server = Server(args)
    print(f"server on port {server.port}, pid {server.proc.pid}, RSS {server.rss() / 2**20:.0f} MiB", flush=True)
    figures: dict = {"machine": machine(), "serve_args": args.serve_args, "pythonpath": args.pythonpath}
    try:
        http(server.port, "POST", "/api/predict", json.dumps({"prompt": PROMPT}).encode())  # warm up
        if args.predicts:
            figures["predicts"] = asyncio.run(predict_flood(server.port, args.predicts))
            print("predicts:", json.dumps(figures["predicts"]), flush=True)
        if args.slow:
            figures["slow"] = slow_flood(server, args.slow)
            print("slow connections:", json.dumps(figures["slow"]), flush=True)
        model, tok = load_model()
        if args.uploads:
            figures["uploads"] = repeated_uploads(server, zero_embedding_patch(model), args.uploads)
            print("repeated uploads:", json.dumps(figures["uploads"]), flush=True)
        del model
        if args.big_uploads:
            figures["big_uploads"] = big_uploads(server, args.big_uploads, args.big_mib)
            print("big uploads:", json.dumps(figures["big_uploads"]), flush=True)
        figures["largest_trace"] = largest_trace(server.port, tok)
        print("largest trace:", json.dumps(figures["largest_trace"]), flush=True)
        status, _ = http(server.port, "GET", "/api/info")
        figures["info_after"] = status
    finally:
        server.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=1))
    print(f"figures written to {out}")


if __name__ == "__main__":
    main()
