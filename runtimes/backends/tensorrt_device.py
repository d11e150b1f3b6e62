"""TensorRT device identity: which GPU and TensorRT this is, which engine set fits it.

Shared by the TensorRT backend and ``freedeploy build`` / ``inspect`` (``exporters.tensorrt``);
tensorrt and cuda-bindings are imported only inside functions, with install guidance when absent.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtimes.bundle import ENGINE_PRECISIONS, Bundle
from runtimes.records import BUILD_SCHEMA, EngineSet, read_json_record
from runtimes.errors import BackendUnavailableError, BundleError, ConfigError

__all__ = ["DeviceInfo", "detect_device", "target_key", "read_build", "find_engine_dir", "import_tensorrt",
           "import_cudart", "cuda_check", "install_hint", "BUILD_FILE", "BUILD_SCHEMA", "ENGINES_DIR"]

log = logging.getLogger(__name__)

BUILD_FILE = "build.json"
ENGINES_DIR = "engines"
_TEGRA_RELEASE = Path("/etc/nv_tegra_release")  # present only on Jetson (L4T)
_DEVICE_TREE_MODEL = Path("/proc/device-tree/model")  # the board name on Jetson


# -- imports, errors, device --------------------------------------------------------------------------------------

def install_hint() -> str:
    """How to get TensorRT and cuda-bindings on this platform (never pip tensorrt on a Jetson)."""
    if _TEGRA_RELEASE.exists():
        return ("on Jetson TensorRT comes with JetPack for the system Python, not from pip: create the venv with "
                "`python3 -m venv --system-site-packages .venv`, then `pip install 'cuda-bindings==<JetPack's CUDA>.*'` "
                "(12.6 on JetPack 6)")
    return "install them with `pip install tensorrt cuda-bindings` (TensorRT 10.3 or later, an NVIDIA GPU and driver)"


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or BackendUnavailableError saying how to install it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailableError(f"TensorRT is not importable ({exc}); {install_hint()}") from exc
    return tensorrt


def import_cudart() -> Any:
    """cuda-bindings' runtime module (the ``cuda-bindings`` package, not ``cuda-python`` or PyCUDA)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as exc:
        raise BackendUnavailableError(f"cuda-bindings is not importable ({exc}); {install_hint()}") from exc
    return cudart


def cuda_check(cudart: Any, result: Any, call: str) -> Any:
    """Unwrap a cuda-bindings result ``(err, *values)``; raise on any error code."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise BackendUnavailableError(f"CUDA call {call} failed with {getattr(err, 'name', err)}")
    return values[0] if len(values) == 1 else (tuple(values) if values else None)


@dataclass(frozen=True)
class DeviceInfo:
    """What a TensorRT plan is tied to, and what build.json records."""

    gpu_name: str  # cudaGetDeviceProperties().name, e.g. "NVIDIA H200" ("Orin" on a Jetson)
    compute_capability: tuple[int, int]
    driver_version: str  # the CUDA version the driver supports (cudaDriverGetVersion), e.g. "12.6"
    cuda_runtime_version: str  # the cudart this process loaded (cudaRuntimeGetVersion)
    tensorrt_version: str  # tensorrt.__version__
    jetpack: str | None  # L4T release from /etc/nv_tegra_release, e.g. "R36.4.3"; None off Jetson
    board: str | None = None  # /proc/device-tree/model on Jetson: tells Orin Nano from AGX Orin

    @property
    def device_name(self) -> str:
        name = self.board or self.gpu_name
        return re.sub(r"\s+developer\s+kit$", "", name.strip(), flags=re.IGNORECASE)


def detect_device(device_index: int = 0) -> DeviceInfo:
    """Versions and identity of GPU ``device_index``; BackendUnavailableError if nothing usable is there."""
    trt, cudart = import_tensorrt(), import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        raise BackendUnavailableError(f"no CUDA GPU is visible ({getattr(err, 'name', err)}); check the NVIDIA driver "
                                      "(nvidia-smi, or tegrastats on Jetson) and CUDA_VISIBLE_DEVICES")
    if not 0 <= device_index < count:
        raise ConfigError(f"device cuda:{device_index} does not exist; this machine has {count} GPU(s)")
    prop = cuda_check(cudart, cudart.cudaGetDeviceProperties(device_index), "cudaGetDeviceProperties")
    name = prop.name.decode("utf-8", "replace") if isinstance(prop.name, bytes) else str(prop.name)
    return DeviceInfo(
        gpu_name=name.split("\x00")[0].strip(), compute_capability=(int(prop.major), int(prop.minor)),
        driver_version=_cuda_version(cuda_check(cudart, cudart.cudaDriverGetVersion(), "cudaDriverGetVersion")),
        cuda_runtime_version=_cuda_version(cuda_check(cudart, cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")),
        tensorrt_version=str(trt.__version__), jetpack=_l4t_release(), board=_board())


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"  # 12060 -> "12.6"


def _l4t_release() -> str | None:
    try:
        first = _TEGRA_RELEASE.read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", first)
    return f"R{m[1]}.{m[2]}" if m else (first.strip("# \t") or None)


def _board() -> str | None:
    if not _TEGRA_RELEASE.exists():
        return None
    try:
        return _DEVICE_TREE_MODEL.read_text(errors="replace").strip("\x00 \n") or None
    except OSError:
        return None


def _slug(text: str, keep: str = "") -> str:
    return re.sub(rf"[^a-z0-9{re.escape(keep)}]+", "-", text.lower()).strip("-.") or "unknown"


def target_key(info: DeviceInfo, precision: str) -> str:
    """``trt10.3.0-sm87-nvidia-jetson-agx-orin-fp16``: TensorRT version, compute capability, device, precision."""
    if precision not in ENGINE_PRECISIONS:
        raise ConfigError(f"TensorRT builds precision {', '.join(ENGINE_PRECISIONS)}, not {precision!r}")
    major, minor = info.compute_capability
    return f"trt{_slug(info.tensorrt_version, keep='.')}-sm{major}{minor}-{_slug(info.device_name)}-{precision}"


# -- engine sets ---------------------------------------------------------------------------------------------------

def read_build(engine_dir: str | os.PathLike) -> EngineSet:
    """An engine set's ``build.json``, as a typed record (every field checked)."""
    path = Path(engine_dir) / BUILD_FILE
    if not path.is_file():
        raise BundleError(f"{Path(engine_dir)} is not an engine set: {BUILD_FILE} is missing")
    return read_json_record(EngineSet, path)


def find_engine_dir(bundle: Bundle, precision: str, info: DeviceInfo) -> Path:
    """The engine set under ``engines/`` built for this device and precision."""
    if bundle.root is None:
        raise BundleError("this bundle was not loaded from a directory, so it has no engines")
    want, found = target_key(info, precision), []
    for build_file in sorted((bundle.root / ENGINES_DIR).glob(f"*/{BUILD_FILE}")):
        try:
            key = read_build(build_file.parent).key
        except BundleError as exc:
            log.warning("ignoring engine set %s: %s", build_file.parent, exc)
            continue
        if key == want:
            return build_file.parent
        found.append(key)
    raise BackendUnavailableError(
        f"bundle {bundle.name!r} has no TensorRT engines for this GPU and precision (needs {want}; found "
        f"{', '.join(found) or 'none'}): run `freedeploy build {bundle.root} --target trt-{precision}` on this device")
