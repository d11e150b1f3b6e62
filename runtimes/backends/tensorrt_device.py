"""TensorRT device identity: which GPU and TensorRT this is, which engine set fits it.

Shared by the TensorRT backend and ``freedeploy build`` / ``inspect`` (``exporters.tensorrt``);
tensorrt and the CUDA bindings are imported only inside functions, with install guidance when
absent, too old, or too new for the driver. What each supported version does differently, and
why the pins are what they are, is in ``docs/tensorrt.md``.

``cuda.bindings`` comes from the ``cuda-bindings`` package (12.8 and later) or, for CUDA 12.6
(JetPack 6), from ``cuda-python==12.6.2.post1``, the only release built for 12.6 that has it.
The two report a missing driver differently: cuda-python 12.6.2 raises ``RuntimeError`` ("Failed
to dlopen libcuda.so.1"), cuda-bindings 12.9 and 13 return ``cudaErrorInsufficientDriver``; both
become a BackendUnavailableError here, so ``Runtime.load(backend="auto")`` can fall back.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtimes.bundle import ENGINE_PRECISIONS, Bundle
from runtimes.records import BUILD_SCHEMA, EngineSet, read_json_record
from runtimes.errors import BackendUnavailableError, BundleError, ConfigError

__all__ = ["DeviceInfo", "detect_device", "target_key", "read_build", "find_engine_dir", "import_tensorrt",
           "import_cudart", "cuda_check", "native_handle", "install_hint", "bindings_hint", "MIN_TENSORRT",
           "BUILD_FILE", "BUILD_SCHEMA", "ENGINES_DIR"]

log = logging.getLogger(__name__)

BUILD_FILE = "build.json"
ENGINES_DIR = "engines"
MIN_TENSORRT = 10  # the name-based tensor API, STRONGLY_TYPED and IProgressMonitor; 8.6 has neither of the last two
JETSON_CUDA12_BINDINGS = "cuda-python==12.6.2.post1"  # JetPack 6.1/6.2: CUDA 12.6, Python 3.10, TensorRT 10.3
_TEGRA_RELEASE = Path("/etc/nv_tegra_release")  # present only on Jetson (L4T)
_DEVICE_TREE_MODEL = Path("/proc/device-tree/model")  # the board name on Jetson


# -- imports, errors, device --------------------------------------------------------------------------------------

def bindings_hint(driver_major: int | None = None) -> str:
    """The pip line for CUDA bindings that match a driver of CUDA ``driver_major`` (both lines when unknown)."""
    jetson = _TEGRA_RELEASE.exists()
    cuda12 = f"'{JETSON_CUDA12_BINDINGS}'" if jetson else "'cuda-bindings>=12.8,<13'"
    cuda13 = "'cuda-bindings==13.0.*'" if jetson else "'cuda-bindings>=13.0,<14'"
    if driver_major is not None:
        return f"`pip install {cuda12 if driver_major < 13 else cuda13}`"
    where = (" (JetPack 6)", " (JetPack 7)") if jetson else ("", " (`nvidia-smi` shows which)")
    return (f"`pip install {cuda12}` for a CUDA 12 driver{where[0]}, "
            f"`pip install {cuda13}` for a CUDA 13 driver{where[1]}")


def install_hint() -> str:
    """How to get TensorRT and the CUDA bindings on this platform (never pip tensorrt on a Jetson)."""
    if _TEGRA_RELEASE.exists():
        return ("on Jetson TensorRT comes with JetPack (6.1 or later) for the system Python, not from pip: create "
                f"the venv with `python3 -m venv --system-site-packages .venv`, then {bindings_hint()}")
    return ("install TensorRT 10.3 or later and the CUDA bindings for your driver: `pip install tensorrt-cu12 "
            "'cuda-bindings>=12.8,<13'` for a CUDA 12 driver, `pip install tensorrt-cu13 'cuda-bindings>=13.0,<14'` "
            "for a CUDA 13 driver (`nvidia-smi` shows which; an NVIDIA GPU and driver are needed)")


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or BackendUnavailableError saying how to install or upgrade it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailableError(f"TensorRT is not importable ({exc}); {install_hint()}") from exc
    version = str(getattr(tensorrt, "__version__", "unknown"))
    if _major(version) < MIN_TENSORRT:
        upgrade = ("JetPack 6.1 or later brings TensorRT 10.3" if _TEGRA_RELEASE.exists() else
                   "`pip install -U tensorrt-cu12` (or tensorrt-cu13 for a CUDA 13 driver)")
        raise BackendUnavailableError(f"TensorRT {version} is too old: freedeploy needs TensorRT {MIN_TENSORRT} or "
                                      f"later (it is written against 10.3 and 11.x); {upgrade}")
    return tensorrt


def import_cudart() -> Any:
    """``cuda.bindings.runtime``, from cuda-bindings or cuda-python 12.6.2.post1 (not older cuda-python, not PyCUDA)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as exc:
        raise BackendUnavailableError(f"cuda-bindings is not importable ({exc}); {install_hint()}") from exc
    return cudart


def _major(version: str) -> int:
    m = re.match(r"\s*(\d+)", version)
    return int(m[1]) if m else 0


def _bindings_version() -> str:
    return str(getattr(sys.modules.get("cuda.bindings"), "__version__", "unknown"))


def cuda_check(cudart: Any, result: Any, call: str) -> Any:
    """Unwrap a cuda-bindings result ``(err, *values)``; raise on any error code."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise BackendUnavailableError(f"CUDA call {call} failed with {getattr(err, 'name', err)}")
    return values[0] if len(values) == 1 else (tuple(values) if values else None)


def native_handle(handle: Any) -> int:
    """The raw pointer of a cuda-bindings handle (a cudaStream_t for ``execute_async_v3``). ``int(handle)``
    is deprecated from cuda-bindings 12.9.1 / 13.0 in favour of ``get_cuda_native_handle``, which older
    bindings (12.9.0, cuda-python 12.6.2) do not have. Never ``handle.getPtr()``: that is the address
    of the handle's storage, not the handle."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(handle)
    return int(get_cuda_native_handle(handle))


@dataclass(frozen=True)
class DeviceInfo:
    """What a TensorRT plan is tied to, and what build.json records."""

    gpu_name: str  # cudaGetDeviceProperties().name, e.g. "NVIDIA H200" ("Orin" on a Jetson)
    compute_capability: tuple[int, int]
    driver_version: str  # the CUDA version the driver supports (cudaDriverGetVersion), e.g. "12.6"
    # the CUDA runtime library installed here (getLocalRuntimeVersion: libcudart), None where none is found;
    # not cudaRuntimeGetVersion, which reports the CUDA that cuda-bindings itself was built for
    cuda_runtime_version: str | None
    tensorrt_version: str  # tensorrt.__version__
    jetpack: str | None  # L4T release from /etc/nv_tegra_release, e.g. "R36.4.3"; None off Jetson
    board: str | None = None  # /proc/device-tree/model on Jetson: tells Orin Nano from AGX Orin
    cuda_bindings_version: str | None = None  # cuda.bindings.__version__, e.g. "12.6.2.post1"

    @property
    def device_name(self) -> str:
        name = self.board or self.gpu_name
        return re.sub(r"\s+developer\s+kit$", "", name.strip(), flags=re.IGNORECASE)


def detect_device(device_index: int = 0) -> DeviceInfo:
    """Versions and identity of GPU ``device_index``; BackendUnavailableError if nothing usable is there."""
    trt, cudart = import_tensorrt(), import_cudart()
    count = _device_count(cudart)
    if not 0 <= device_index < count:
        raise ConfigError(f"device cuda:{device_index} does not exist; this machine has {count} GPU(s)")
    prop = cuda_check(cudart, cudart.cudaGetDeviceProperties(device_index), "cudaGetDeviceProperties")
    name = prop.name.decode("utf-8", "replace") if isinstance(prop.name, bytes) else str(prop.name)
    return DeviceInfo(
        gpu_name=name.split("\x00")[0].strip(), compute_capability=(int(prop.major), int(prop.minor)),
        driver_version=_cuda_version(cuda_check(cudart, cudart.cudaDriverGetVersion(), "cudaDriverGetVersion")),
        cuda_runtime_version=_local_runtime_version(cudart), tensorrt_version=str(trt.__version__),
        jetpack=_l4t_release(), board=_board(), cuda_bindings_version=_bindings_version())


def _device_count(cudart: Any) -> int:
    """How many GPUs the driver shows; every way of having no usable driver is a BackendUnavailableError."""
    try:
        err, count = cudart.cudaGetDeviceCount()
    except RuntimeError as exc:  # cuda-python 12.6.2 raises when libcuda.so.1 cannot be loaded
        raise BackendUnavailableError(f"the NVIDIA driver cannot be loaded ({exc}); check the driver (nvidia-smi, "
                                      "or tegrastats on Jetson)") from exc
    if err == cudart.cudaError_t.cudaSuccess and count:
        return int(count)
    if err == cudart.cudaError_t.cudaErrorInsufficientDriver:  # cuda-bindings 12.9 / 13: no driver, or too old
        raise BackendUnavailableError(_insufficient_driver(cudart))
    raise BackendUnavailableError(f"no CUDA GPU is visible ({getattr(err, 'name', err)}); check the NVIDIA driver "
                                  "(nvidia-smi, or tegrastats on Jetson) and CUDA_VISIBLE_DEVICES")


def _insufficient_driver(cudart: Any) -> str:
    err, driver = cudart.cudaDriverGetVersion()  # 0 when no driver is loaded
    _, built_for = cudart.cudaRuntimeGetVersion()  # the CUDA these bindings were built for
    if err != cudart.cudaError_t.cudaSuccess or not driver:
        return ("no NVIDIA driver is loaded (cudaErrorInsufficientDriver); install the driver, or check it with "
                "nvidia-smi (tegrastats on Jetson)")
    return (f"the NVIDIA driver supports CUDA {_cuda_version(driver)}, older than the CUDA "
            f"{_cuda_version(built_for)} that cuda-bindings {_bindings_version()} is built for: replace them with "
            f"`pip uninstall -y cuda-bindings cuda-python` and {bindings_hint(driver // 1000)}")


def _local_runtime_version(cudart: Any) -> str | None:
    get = getattr(cudart, "getLocalRuntimeVersion", None)
    if get is None:
        return None
    try:
        err, version = get()
    except (RuntimeError, OSError) as exc:  # no libcudart on the library path
        log.debug("no local CUDA runtime found: %s", exc)
        return None
    return _cuda_version(version) if err == cudart.cudaError_t.cudaSuccess and version else None


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
