"""``freedeploy serve`` for real: Triton (through PyTriton) in the serving environment (numpy 1.26),
answers compared with the local runtime here (numpy 2), and what a stop leaves behind."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from runtimes import Runtime
from runtimes.errors import BackendUnavailableError, InputError
from serving.bench import ServerProcess, free_ports
from serving.client import Client, Fleet
from tests.serving.conftest import ROOT, port_in_use

GRPC_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as grpc
client = grpc.InferenceServerClient(sys.argv[1])
images = np.array([[bytes.fromhex(h)] for h in json.loads(sys.stdin.read())], dtype=object)
x = grpc.InferInput("image", list(images.shape), "BYTES")
x.set_data_from_numpy(images)
r = client.infer(sys.argv[2], [x])
print(json.dumps([[l.decode(), int(b)] for l, b in zip(r.as_numpy("label")[:, 0], r.as_numpy("block")[:, 0])]))
"""


def png_bytes(items) -> list[bytes]:
    from PIL import Image

    out = []
    for item in items:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(item)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def bundle(micro_bundle) -> Path:
    return micro_bundle.out


@pytest.fixture(scope="module")
def test_images(bundle) -> list[bytes]:
    """The bundle's own test split, as PNG files' bytes (what a camera client would send)."""
    from analysis.evaluation import bundle_split
    from runtimes.bundle import load_bundle

    data, idx = bundle_split(load_bundle(bundle), None, "test")
    return png_bytes([data.items[i] for i in idx[:64]])


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _owned(pid: int, children: set[int]) -> set[str]:
    """What this server's processes hold on disk and in shared memory, read from their command lines:
    the workspace, the Python backend's model folders, the shared-memory regions (named after the
    server's pid)."""
    paths = set()
    for child in children:
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        for arg in args:
            for part in arg.replace("=", " ").replace(",", " ").split():
                if part.startswith(("/tmp/freedeploy-serve-", "/tmp/folder")):  # its workspace, Triton's copies
                    paths.add("/tmp/" + part.split("/")[2])
        if args[0].endswith("triton_python_backend_stub") and len(args) > 2:  # STUB MODEL.PY SHM-REGION ...
            paths.add(f"/dev/shm/{args[2]}")
    shm = {f"/dev/shm/{n}" for n in os.listdir("/dev/shm") if n.startswith(f"pytrtion{pid}")} \
        if os.path.isdir("/dev/shm") else set()
    return paths | shm


def _left(owned: set[str], pid: int) -> set[str]:
    left = {p for p in owned if os.path.exists(p)}
    if os.path.isdir("/dev/shm"):
        left |= {f"/dev/shm/{n}" for n in os.listdir("/dev/shm") if n.startswith(f"pytrtion{pid}")}
    return left


class Server(ServerProcess):
    """A served bundle, with what its processes hold, read once it is ready."""

    def __init__(self, serve_python: str, bundle, *args: str) -> None:
        super().__init__(serve_python, bundle, *args)
        self.children = _descendants(self.proc.pid)
        self.owned = _owned(self.proc.pid, self.children)


def _local(bundle, images: list[bytes]):
    with Runtime.load(bundle) as rt:
        return [rt.infer([img])[0] for img in images]


def _same(served, local) -> None:
    assert (served.label, served.class_index, served.exit_index, served.block) == \
        (local.label, local.class_index, local.exit_index, local.block)
    assert served.confidence == pytest.approx(local.confidence, abs=1e-5)


def test_eight_clients_get_the_local_runtimes_answers_and_a_stop_leaves_nothing(serve_python, bundle,
                                                                               test_images):
    local = _local(bundle, test_images)
    server = Server(serve_python, bundle)
    try:
        assert server.children, "Triton runs as child processes of the server"
        assert any(p.startswith("/tmp/freedeploy-serve-") for p in server.owned) and \
            any(p.startswith("/dev/shm/") for p in server.owned), server.owned
        assert server.info["models"] == {"raw": "micro", "tensors": "micro_tensors"}
        client = Client(server.url, "micro")
        assert client.ready()

        def worker(t: int) -> list[tuple[int, object]]:
            rng = np.random.default_rng(t)
            out = []
            for _ in range(200):
                i = int(rng.integers(len(test_images)))
                out.append((i, client.infer([test_images[i]])[0]))
            return out

        with ThreadPoolExecutor(8) as pool:
            answers = [a for part in pool.map(worker, range(8)) for a in part]
        assert len(answers) == 1600
        for i, served in answers:
            _same(served, local[i])
        stats = client.stats(server.info["endpoints"]["metrics"])
        assert stats.success >= 1600 and stats.failure == 0
        assert stats.mean_batch > 1, "eight clients at once: dynamic batching joined requests"

        # the preprocessed model takes the same rows as arrays, in batches
        with Runtime.load(bundle) as rt:
            arrays = rt.encode(test_images[:10])
        for served, want in zip(client.infer(arrays), local[:10]):
            _same(served, want)
        # more rows than the model's max batch go as several requests, as Runtime.infer splits them
        many = [test_images[i % len(test_images)] for i in range(2 * server.info["max_batch"] + 3)]
        for served, i in zip(client.infer(many), range(len(many))):
            _same(served, local[i % len(test_images)])
        with pytest.raises(InputError, match="unknown model"):
            Client(server.url, "nosuch").infer([test_images[0]])
        # gRPC answers the same, through NVIDIA's own client in the serving environment
        grpc = subprocess.run([serve_python, "-c", GRPC_CLIENT, f"127.0.0.1:{server.grpc}", "micro"],
                              input=json.dumps([b.hex() for b in test_images[:4]]), capture_output=True, text=True,
                              timeout=60)
        assert grpc.returncode == 0, grpc.stderr[-2000:]
        for (label, block), want in zip(json.loads(grpc.stdout), local[:4]):
            assert (label, block) == (want.label, want.block)
        # a corrupt image costs its own row only, in the same request as good ones
        rows = client.infer([test_images[0], b"not an image", test_images[1]], errors="keep")
        _same(rows[0], local[0])
        _same(rows[2], local[1])
        assert isinstance(rows[1], InputError) and "cannot read image" in str(rows[1])
        with pytest.raises(InputError, match="cannot read image"):
            client.infer([b"\x89PNG broken"])
    finally:
        rc = server.stop(signal.SIGTERM)
    assert rc == 0, server.stderr[-2000:]
    assert json.loads(server.lines[-1])["event"] == "stopped"
    assert not [p for p in server.children if _alive(p)], "no Triton process outlives the server"
    assert not any(port_in_use(p) for p in (server.http, server.grpc, server.metrics))
    assert _left(server.owned, server.proc.pid) == set(), "shared memory, workspaces and model folders are removed"


def test_two_servers_behind_a_fleet_client_answer_as_the_local_runtime(serve_python, bundle, test_images, tmp_path):
    local = _local(bundle, test_images)
    servers = [Server(serve_python, bundle), Server(serve_python, bundle, "--engine", "pytriton", "--no-batching")]
    try:
        fleet = Fleet([s.url for s in servers], "micro")

        def worker(t: int):
            return [(i, fleet.infer([test_images[i]])[0]) for i in range(t, len(test_images), 4)]

        with ThreadPoolExecutor(4) as pool:
            answers = [a for part in pool.map(worker, range(4)) for a in part]
        for i, served in answers:
            _same(served, local[i])
        assert all(n > 0 for n in fleet.served), f"both servers answered: {fleet.served}"

        # the example client spreads a folder of images over both, as two cameras would
        folder = tmp_path / "images"
        folder.mkdir()
        for i, img in enumerate(test_images[:12]):
            (folder / f"{i:02d}.png").write_bytes(img)
        example = subprocess.run([sys.executable, str(ROOT / "examples" / "fleet_client.py"), "micro",
                                  ",".join(s.url for s in servers), str(folder), "--threads", "2"],
                                 capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert example.returncode == 0, example.stderr
        lines = example.stdout.strip().splitlines()
        assert sorted(line.split(":")[0] for line in lines) == [str(folder / f"{i:02d}.png") for i in range(12)]
        for line in lines:
            i = int(Path(line.split(":")[0]).stem)
            assert f": {local[i].label} (" in line and f"block {local[i].block})" in line

        assert servers[1].stop(signal.SIGINT) == 0  # one server goes away: the fleet carries on with the other
        for i in range(8):
            _same(fleet.infer([test_images[i]])[0], local[i])
        assert fleet.served[0] >= 8
    finally:
        for s in servers:
            if s.proc.poll() is None:
                s.stop()
    with pytest.raises(BackendUnavailableError, match="no server of the fleet answered"):
        Fleet([s.url for s in servers], "micro", timeout=2).infer([test_images[0]])
    for s in servers:
        assert _left(s.owned, s.proc.pid) == set()


RUNTIME_PROBE = """
import json, sys
import numpy as np
from runtimes import Runtime
images = [bytes.fromhex(h) for h in json.loads(sys.stdin.read())]
from runtimes.monitor import Monitor
rt = Runtime.load(sys.argv[1], monitor=Monitor(1.0, tolerance=0.05))
conf = rt.record(images).confidences  # (rows, exits + 1)
rt.thresholds = [float(np.median(conf[:, i])) for i in range(len(rt.bundle.exits))]  # about half leave at each
out = {}
r = rt.infer(images); out["plain"] = [r.classes.tolist(), r.blocks.tolist(), r.confidences.tolist()]
r = rt.infer(images + [b"junk"], errors="keep"); out["keep"] = [r.classes.tolist(), sorted(r.errors)]
out["full"] = rt.infer_full(images).classes.tolist()
out["record"] = rt.record(images).confidences.tolist()
out["deadline"] = rt.infer(images, deadline_ms=1000).classes.tolist()
out["monitor"] = rt.stats().to_dict()["monitor"]
print(json.dumps([np.__version__, out]))
"""


def test_the_runtime_answers_alike_on_numpy_1_and_2(serve_python, bundle, test_images):
    """The runtime's paths (early exit, kept errors, the monolithic graph, records, deadlines, the drift
    monitor) give the same numbers in the serving environment (numpy 1.26) as here (numpy 2)."""
    def probe(python: str) -> tuple[str, dict]:
        r = subprocess.run([python, "-c", RUNTIME_PROBE, str(bundle)], input=json.dumps([b.hex() for b in
                           test_images[:16]]), capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        return tuple(json.loads(r.stdout))

    (old_numpy, old), (new_numpy, new) = probe(serve_python), probe(sys.executable)
    assert old_numpy.startswith("1.") and new_numpy.startswith("2."), (old_numpy, new_numpy)
    assert old == new and len(set(new["plain"][1])) > 1, "rows left at several exits"


def test_the_serving_environment_is_the_runtime_without_torch_on_numpy_1(serve_python):
    probe = ("import importlib.util, numpy; print(numpy.__version__, importlib.util.find_spec('torch') is None, "
             "importlib.util.find_spec('cv2') is None)")
    out = subprocess.run([serve_python, "-c", probe], capture_output=True, text=True, timeout=60, check=True).stdout
    version, no_torch, no_cv2 = out.split()
    assert version.startswith("1.") and no_torch == "True" and no_cv2 == "True", out


def test_serving_refuses_bad_settings_with_one_line(serve_python, bundle, tmp_path):
    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([serve_python, "-m", "freedeploy", "serve", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)

    missing = serve(str(tmp_path / "nope"))
    assert missing.returncode == 5 and missing.stderr.count("\n") == 1, missing.stderr
    http, grpc, metrics = free_ports(3)
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", http))
        taken.listen()
        busy = serve(str(bundle), "--host", "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc),
                     "--metrics-port", str(metrics))
    assert busy.returncode == 2 and f"http port {http} is not free" in busy.stderr, busy.stderr
    same = serve(str(bundle), "--http-port", str(http), "--grpc-port", str(http), "--metrics-port", str(metrics))
    assert same.returncode == 2 and "must differ" in same.stderr
    for host in ("no-such-host.invalid", "10.255.255.1"):
        bad_host = serve(str(bundle), "--host", host, "--http-port", str(http), "--grpc-port", str(grpc),
                         "--metrics-port", str(metrics))
        assert bad_host.returncode == 2 and "is not an address of this machine" in bad_host.stderr, bad_host.stderr
    thresholds = serve(str(bundle), "--thresholds", "0.5,0.5,0.5,0.5", "--http-port", str(http), "--grpc-port",
                       str(grpc), "--metrics-port", str(metrics))
    assert thresholds.returncode == 2 and thresholds.stderr.count("\n") == 1, thresholds.stderr
    name = serve(str(bundle), "--name", "bad/name", "--http-port", str(http), "--grpc-port", str(grpc),
                 "--metrics-port", str(metrics))
    assert name.returncode == 2 and "not one Triton takes" in name.stderr


def test_generative_bundles_are_refused_clearly(serve_python, decoder_bundle):
    http, grpc, metrics = free_ports(3)
    r = subprocess.run([serve_python, "-m", "freedeploy", "serve", str(decoder_bundle.out), "--http-port", str(http),
                        "--grpc-port", str(grpc), "--metrics-port", str(metrics)], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "generative" in r.stderr and r.stderr.count("\n") == 1, r.stderr
