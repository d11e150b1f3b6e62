"""ONNX -> TensorRT plans for every graph of a bundle (``freedeploy build BUNDLE --target trt-<precision>``).

Precision is already inside the ONNX (fp16, or explicit Q/DQ int8), so every network is strongly
typed and no precision builder flag is set. The same code therefore builds on TensorRT 10.3
(JetPack 6) and on 11.x, where the fp16/int8 builder flags, the INT8 calibrators and
``EXPLICIT_BATCH`` are gone (checked against the TensorRT 11.0-11.4 Python migration guides and
NVIDIA's sources at v10.3.0, v11.0 and v11.1). ``build.json`` records the builder flags the config
really has: TF32 is on by default in 10.x and 11.x, so that list is not empty.
Plans are written raw, with no header of ours, so trtexec, Triton and DeepStream can load them.
What they were built from and with is recorded beside them::

    engines/<target-key>/segment_0.plan, exit_0.plan, ..., full.plan
    engines/<target-key>/timing.cache      reused by the next build of this set (--overwrite)
    engines/<target-key>/build.json        versions, GPU, settings by enum name, profiles, sha256s

The target key (``trt10.3.0-sm87-nvidia-jetson-agx-orin-fp16``) names what a plan is tied to:
TensorRT version, compute capability, device and precision. Device detection and ``build.json``
reading live in ``runtimes.backends.tensorrt`` because the runtime needs them too (and
``runtimes`` never imports ``exporters``); they are re-exported here.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

from runtimes.atomic import Replaceable, atomic_directory, atomic_write_text
from runtimes.backends.tensorrt_device import (BUILD_FILE, BUILD_SCHEMA, ENGINES_DIR, DeviceInfo, detect_device,
                                        import_tensorrt, read_build, target_key)
from exporters.config import BuildDefaults
from runtimes import naming
from runtimes.bundle import Bundle, load_bundle
from runtimes.records import ENGINE_PRECISIONS, EngineSet, GraphBuild
from runtimes.errors import BundleError, ConfigError, ExportError

__all__ = ["DeviceInfo", "BuildResult", "PlanBuild", "detect_device", "target_key", "profile_for",
           "onnx2plan", "build_engines", "read_build", "list_engine_sets", "TIMING_CACHE"]

log = logging.getLogger(__name__)

TIMING_CACHE = "timing.cache"
ENGINE_SET = Replaceable("a TensorRT engine set", BUILD_FILE, "graphs")  # what build --overwrite may replace
Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max) shape
Progress = Callable[[str, float], None]  # (message, fraction of the whole job done)


class PlanBuild(NamedTuple):
    """What ``onnx2plan`` built: the raw plan, the timing cache after the build, the builder flags that were set."""

    plan: bytes
    timing_cache: bytes
    builder_flags: tuple[str, ...]  # by enum name, e.g. ("TF32",): TensorRT's defaults count too


@dataclass(frozen=True)
class BuildResult:
    key: str  # the target key, also the engine set's directory name
    directory: Path
    plans: dict[str, Path]  # graph key -> plan file
    seconds: float


def _import_tensorrt() -> Any:
    """The ``tensorrt`` module, imported only when a build runs (tests put a fake in sys.modules)."""
    return import_tensorrt()


def profile_for(bundle: Bundle, graph_key: str) -> Profile:
    """One optimization profile: the bundle's (min, opt, max) batch on the batch axis, fixed sizes elsewhere;
    a decoder's named axes (``DecoderHead.axis_ranges``) over their whole range, tuned for one new token per step."""
    b = bundle.batch
    named = bundle.head.axis_ranges()
    profile: Profile = {}
    for t in bundle.graph(graph_key).inputs:
        dims = []
        for d in t.shape:
            if d == "batch":
                dims.append((b.min, b.opt, b.max))
            elif isinstance(d, int):
                dims.append((d, d, d))
            elif d in named:
                dims.append(named[d])
            else:
                raise BundleError(f"{graph_key}: input {t.name} has a named dimension {d!r}; TensorRT profiles need "
                                  "every dimension but 'batch' fixed")
        profile[t.name] = (tuple(d[0] for d in dims), tuple(d[1] for d in dims), tuple(d[2] for d in dims))
    return profile


def _network_flags(trt: Any) -> tuple[int, list[str]]:
    """Creation flags for a strongly typed network, and their names for build.json."""
    if int(str(trt.__version__).split(".")[0]) >= 11:
        # 11.x builds only strongly typed networks: STRONGLY_TYPED is deprecated and ignored, and reading
        # EXPLICIT_BATCH raises (TensorRT 11.0 migration guide), so no flag at all.
        return 0, []
    flag = trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED  # 10.x (checked with the 10.3 Python API)
    return 1 << int(flag), [flag.name]


def _progress_monitor(trt: Any, progress: Progress) -> Any:
    """An ``IProgressMonitor`` that forwards the top-level build phases to ``progress``."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)  # pybind11 trampolines need the base initialiser
            self.steps: dict[str, int] = {}
            self.top: str | None = None
            self.error: BaseException | None = None

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.steps[phase_name] = max(int(num_steps), 1)
            if parent_phase is None:
                self.top = phase_name
                self._say(phase_name, 0)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return self._say(phase_name, step + 1) if phase_name == self.top else self.error is None

        def phase_finish(self, phase_name: str) -> None:
            self.steps.pop(phase_name, None)

        def _say(self, phase: str, done: int) -> bool:
            """False asks TensorRT to cancel: an exception cannot cross into TensorRT, so it is kept and re-raised."""
            if self.error is None:
                try:
                    progress(phase, min(done / self.steps.get(phase, 1), 1.0))
                except Exception as exc:  # noqa: BLE001 - re-raised after build_serialized_network returns
                    self.error = exc
            return self.error is None

    return Monitor()


def _timing_cache(config: Any, data: bytes | None, onnx_path: Path) -> Any:
    cache = config.create_timing_cache(data or b"")
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    # A cache from another TensorRT version or GPU is refused; it only saves build time, so start empty.
    log.warning("timing cache not usable for %s (another TensorRT or GPU?); starting an empty one", onnx_path.name)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise ExportError(f"TensorRT refused an empty timing cache while building {onnx_path}")
    return cache


def onnx2plan(onnx_path: Path, profile: Profile, *, timing_cache: bytes | None = None, workspace_bytes: int = 2 << 30,
              optimization_level: int = 3, progress: Progress | None = None) -> PlanBuild:
    """Build one ONNX file into a raw serialized plan, with the timing cache and builder flags it was built with."""
    if not 0 <= optimization_level <= 5:
        raise ConfigError(f"the builder optimization level must be 0..5, got {optimization_level}")
    if workspace_bytes <= 0:
        raise ConfigError(f"the workspace must be a positive number of bytes, got {workspace_bytes}")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ExportError(f"{onnx_path} does not exist")
    trt = _import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt)[0])
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # parse_from_file resolves external weight files
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or ["(the parser gave no details)"]
        raise ExportError(f"TensorRT could not parse {onnx_path} ({len(errors)} error(s)):\n"
                          + "\n".join(f"  - {e}" for e in errors))
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(profile):
        raise ExportError(f"{onnx_path} has inputs {sorted(names)}, the bundle's profile covers {sorted(profile)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    config.builder_optimization_level = optimization_level
    monitor = _progress_monitor(trt, progress) if progress else None
    if monitor is not None:
        config.progress_monitor = monitor
    shapes = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        try:
            shapes.set_shape(name, lo, opt, hi)
        except RuntimeError as exc:  # the binding raises when min <= opt <= max or the ranks do not hold
            raise ExportError(f"TensorRT rejected the profile of {name} for {onnx_path} (min {lo}, opt {opt}, max "
                              f"{hi}): {exc}") from exc
    if config.add_optimization_profile(shapes) < 0:
        raise ExportError(f"TensorRT rejected the optimization profile {profile} for {onnx_path}")
    _timing_cache(config, timing_cache, onnx_path)
    plan = builder.build_serialized_network(network, config)
    if monitor is not None and monitor.error is not None:
        raise monitor.error
    if plan is None:
        raise ExportError(f"TensorRT failed to build {onnx_path}; the TensorRT log above says why (a larger "
                          "--workspace-gb or a lower --opt-level can help)")
    return PlanBuild(bytes(plan), bytes(config.get_timing_cache().serialize()), _builder_flags(trt, config))


def _builder_flags(trt: Any, config: Any) -> tuple[str, ...]:
    """The builder flags ``config`` has set, by name (none are set here, but TensorRT sets TF32 by default)."""
    return tuple(sorted({flag.name for flag in trt.BuilderFlag.__members__.values() if config.get_flag(flag)}))


def build_engines(bundle_dir: Path, precision: str, *, workspace_gb: float = BuildDefaults.workspace_gb,
                  optimization_level: int = BuildDefaults.optimization_level,
                  progress: Progress | None = None, overwrite: bool = False) -> BuildResult:
    """Build every graph of the bundle for ``precision`` into ``engines/<target-key>/``, atomically."""
    t0 = time.perf_counter()
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)
    if precision not in ENGINE_PRECISIONS:
        raise ConfigError(f"TensorRT builds {', '.join(ENGINE_PRECISIONS)}, not {precision!r} "
                          "(int8-heads runs on ONNX Runtime only: TensorRT does not parse its integer MatMul)")
    if precision not in bundle.head.engine_precisions:
        raise ConfigError(f"bundle {bundle.name!r} ({bundle.task}): its engines are built from "
                          f"{', '.join(bundle.head.engine_precisions)} graphs for now "
                          f"(freedeploy build BUNDLE --target trt-{bundle.head.engine_precisions[0]})")
    if precision not in bundle.precisions:
        raise ConfigError(f"bundle {bundle.name!r} has no {precision} ONNX (it has {', '.join(bundle.precisions)}): "
                          f"export it with `freedeploy export RUN --target trt-{precision}`")
    if workspace_gb <= 0:
        raise ConfigError(f"--workspace-gb must be positive, got {workspace_gb}")
    trt, info = _import_tensorrt(), detect_device()
    key = target_key(info, precision)
    target = bundle_dir / ENGINES_DIR / key
    workspace = int(workspace_gb * (1 << 30))
    say = progress or (lambda message, fraction: None)
    cache = (target / TIMING_CACHE).read_bytes() if overwrite and (target / TIMING_CACHE).is_file() else None
    keys, graphs, flags = bundle.graph_keys(), {}, set()
    with atomic_directory(target, overwrite=overwrite, kind=ENGINE_SET) as tmp:  # never a half-written set
        for i, gkey in enumerate(keys):
            rel, profile = bundle.graph(gkey).files[precision], profile_for(bundle, gkey)
            say(f"building {gkey}", i / len(keys))
            t1 = time.perf_counter()
            plan, cache, used = onnx2plan(bundle.path(rel), profile, timing_cache=cache, workspace_bytes=workspace,
                                          optimization_level=optimization_level,
                                          progress=_scaled(say, gkey, i, len(keys)) if progress else None)
            flags.update(used)
            (tmp / naming.plan_file(gkey)).write_bytes(plan)
            graphs[gkey] = GraphBuild(rel, bundle.files[rel], naming.plan_file(gkey), hashlib.sha256(plan).hexdigest(),
                                      round(time.perf_counter() - t1, 3),
                                      {n: {"min": s[0], "opt": s[1], "max": s[2]} for n, s in profile.items()})
        (tmp / TIMING_CACHE).write_bytes(cache or b"")
        record = _build_record(trt, info, key, precision, bundle, graphs, cache or b"", workspace, optimization_level,
                               sorted(flags), time.perf_counter() - t0)
        atomic_write_text(tmp / BUILD_FILE, json.dumps(record.to_dict(), indent=2) + "\n")
    say(f"built {len(keys)} engines", 1.0)
    log.info("built %d TensorRT engines into %s", len(keys), target)
    return BuildResult(key, target, {k: target / naming.plan_file(k) for k in keys}, time.perf_counter() - t0)


def _scaled(say: Progress, gkey: str, index: int, total: int) -> Progress:
    return lambda message, fraction: say(f"{gkey}: {message}", (index + fraction) / total)


def _build_record(trt: Any, info: DeviceInfo, key: str, precision: str, bundle: Bundle,
                  graphs: dict[str, GraphBuild], cache: bytes, workspace: int, optimization_level: int,
                  builder_flags: list[str], seconds: float) -> EngineSet:
    """build.json: settings by enum *name*, because TensorRT 11 renumbered enum values."""
    return EngineSet(
        schema=BUILD_SCHEMA, key=key, precision=precision, tensorrt_version=info.tensorrt_version, graphs=graphs,
        bundle=bundle.name, cuda_runtime_version=info.cuda_runtime_version, cuda_driver_version=info.driver_version,
        gpu={"name": info.gpu_name, "compute_capability": list(info.compute_capability), "board": info.board},
        jetpack_l4t=info.jetpack,
        settings={"strongly_typed": True, "network_flags": _network_flags(trt)[1], "builder_flags": builder_flags,
                  "memory_pool_limits": {trt.MemoryPoolType.WORKSPACE.name: workspace},
                  "builder_optimization_level": optimization_level, "optimization_profiles": 1,
                  "batch": {"min": bundle.batch.min, "opt": bundle.batch.opt, "max": bundle.batch.max}},
        timing_cache={"file": TIMING_CACHE, "sha256": hashlib.sha256(cache).hexdigest()},
        build_seconds=round(seconds, 3),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def list_engine_sets(bundle_dir: Path, device: DeviceInfo | None = None) -> list[dict[str, Any]]:
    """Every ``engines/*/build.json`` (for ``freedeploy inspect``); ``matches`` when a device is given."""
    out = []
    for build_file in sorted((Path(bundle_dir) / ENGINES_DIR).glob(f"*/{BUILD_FILE}")):
        try:
            entry = {**read_build(build_file.parent).to_dict(), "directory": str(build_file.parent)}
        except BundleError as exc:
            out.append({"directory": str(build_file.parent), "error": str(exc)})
            continue
        if device is not None:
            entry["matches"] = entry["key"] == target_key(device, entry["precision"])
        out.append(entry)
    return out
