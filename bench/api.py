"""``imaged bench api``: the daemon under load, measured from outside through its socket.

What it answers: how many ``GET /v1/info`` a second 16 concurrent keep-alive clients get; how many
container create+mount+unmount+delete cycles a second runtimes get through the API on overlay
(containers without quota; one client, then four at once); and whether the daemon's memory stays
flat (RSS idle, then after every thousand cycles). The daemon is a real ``imaged serve`` process
on a dedicated loop ext4; the load comes from this process over raw keep-alive HTTP in trio
tasks, cheap enough that the daemon, not the client, is what saturates.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import trio

from imaged.bench.daemon import imaged_daemon
from imaged.bench.report import Series, machine_facts, write_report
from imaged.bench.scratch import scratch_fs
from imaged.testing.images import OCILayout, directory, file, push
from imaged.testing.registry import local_registry

INFO_CLIENTS = 16
INFO_SECONDS = 3.0
CYCLE_BATCH = 100
MEMORY_CYCLES = 1000


class _Client:
    """One keep-alive HTTP/1.1 connection, parsed just enough for our own JSON answers."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    @classmethod
    async def connect(cls, path: Path) -> _Client:
        return cls(await trio.open_unix_socket(str(path)))

    async def call(self, method: str, target: str, body: Any = None) -> tuple[int, Any]:
        payload = b"" if body is None else json.dumps(body).encode()
        await self.stream.send_all(
            f"{method} {target} HTTP/1.1\r\nHost: imaged\r\nContent-Length: {len(payload)}\r\n"
            f"\r\n".encode() + payload)
        while b"\r\n\r\n" not in self.buffer:
            await self._more()
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        status = int(head.split()[1])
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        self.buffer = bytearray(rest)
        while len(self.buffer) < length:
            await self._more()
        data, self.buffer = bytes(self.buffer[:length]), self.buffer[length:]
        if status >= 400:
            raise RuntimeError(f"{method} {target}: {status} {data.decode(errors='replace')}")
        return status, json.loads(data) if data else None

    async def _more(self) -> None:
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            raise RuntimeError("the daemon closed the connection")
        self.buffer += chunk

    async def aclose(self) -> None:
        await self.stream.aclose()


async def _info_rate(socket_path: Path) -> float:
    done = 0
    clients = [await _Client.connect(socket_path) for _ in range(INFO_CLIENTS)]

    async def hammer(client: _Client) -> None:
        nonlocal done
        while True:
            await client.call("GET", "/v1/info")
            done += 1

    start = trio.current_time()
    with trio.move_on_after(INFO_SECONDS):
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(hammer, client)
    elapsed = trio.current_time() - start
    for client in clients:
        await client.aclose()
    return done / elapsed


async def _cycles(socket_path: Path, image: str, clients: int, count: int, tag: str) -> float:
    """Cycles a second: each client creates, mounts, unmounts and deletes its own containers."""
    per_client = count // clients

    async def worker(index: int) -> None:
        client = await _Client.connect(socket_path)
        for i in range(per_client):
            name = f"{tag}-{index}-{i}"
            await client.call("POST", "/v1/containers", {"name": name, "image": image})
            await client.call("POST", f"/v1/containers/{name}/mount")
            await client.call("POST", f"/v1/containers/{name}/unmount")
            await client.call("DELETE", f"/v1/containers/{name}")
        await client.aclose()

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index in range(clients):
            nursery.start_soon(worker, index)
    return per_client * clients / (time.perf_counter() - start)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def _measure(socket_path: Path, pid: int, image: str, runs: int,
                   series: dict[str, Series]) -> None:
    client = await _Client.connect(socket_path)
    await client.stream.send_all(
        b"POST /v1/images/pull HTTP/1.1\r\nHost: imaged\r\nConnection: close\r\n"
        + f"Content-Length: {len(json.dumps({'ref': image}))}\r\n\r\n".encode()
        + json.dumps({"ref": image}).encode())
    answer = bytearray()
    while chunk := await client.stream.receive_some(65536):
        answer += chunk
    if b'"status": "done"' not in answer:
        raise RuntimeError(f"pull failed: {answer[-500:].decode(errors='replace')}")
    series["idle"].samples.append(_rss_mib(pid))
    for run in range(runs):
        series["info"].samples.append(await _info_rate(socket_path))
        series["cycles1"].samples.append(
            await _cycles(socket_path, image, 1, CYCLE_BATCH, f"a{run}"))
        series["cycles4"].samples.append(
            await _cycles(socket_path, image, 4, CYCLE_BATCH, f"b{run}"))
    for thousand in range(2):
        await _cycles(socket_path, image, 4, MEMORY_CYCLES, f"m{thousand}")
        series[f"rss{thousand + 1}"].samples.append(_rss_mib(pid))


def run(out: Path, runs: int) -> list[Path]:
    series = {
        "info": Series(f"GET /v1/info, {INFO_CLIENTS} concurrent clients", "requests/s"),
        "cycles1": Series("create+mount+unmount+delete, 1 client (overlay, no quota)",
                          "cycles/s"),
        "cycles4": Series("create+mount+unmount+delete, 4 clients (overlay, no quota)",
                          "cycles/s"),
        "idle": Series("daemon RSS after start and one pull", "MiB"),
        "rss1": Series(f"daemon RSS after {MEMORY_CYCLES} more cycles", "MiB"),
        "rss2": Series(f"daemon RSS after {2 * MEMORY_CYCLES} more cycles", "MiB"),
    }
    with scratch_fs(4 << 30) as (scratch, where), \
            local_registry(scratch / "registry") as reg:
        layout = OCILayout(scratch / "layout")
        base = layout.add_layer([directory("etc"), file("etc/os-release", b"ID=bench\n")])
        app = layout.add_layer([file(f"app/f{i}", b"x" * 4096) for i in range(64)])
        layout.tag(layout.add_image([base, app]), "api")
        image = f"{reg.host}/bench/api:v1"
        push(layout, "api", image)
        (scratch / "imaged.toml").write_text("")
        env = {**os.environ, "IMAGED_CONFIG": str(scratch / "imaged.toml")}
        with imaged_daemon(scratch / "root", env, driver="overlay") as daemon:
            trio.run(_measure, daemon.socket, daemon.pid, image, runs, series)
    notes = [
        f"{runs} runs; info for {INFO_CLIENTS} keep-alive clients over {INFO_SECONDS:.0f} s per "
        f"run; cycles in batches of {CYCLE_BATCH} per run",
        f"store on {where}; image of 2 layers (65 files) pulled once through the API",
        "memory: VmRSS of the daemon process, read from /proc",
        "the load generator is the bench process itself (trio tasks, raw keep-alive HTTP)",
    ]
    ratios = {"RSS growth over the second thousand cycles (MiB)":
              series["rss2"].median - series["rss1"].median}
    return write_report(out, "api", "The daemon through its socket", list(series.values()),
                        machine_facts(), ratios, notes)
