"""`lowvram probe`: detect the machine (NVIDIA via nvml, AMD via torch's HIP build, else CPU), measure host-to-device
bandwidth, and match the nearest built-in profile (or build a custom one from the measurements).

It reports what is there; choosing memory settings for the machine is the planner's job.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from lowvram.profiles import GIB, HardwareProfile, all_profiles, load_profile


@dataclass
class GpuInfo:
    index: int
    name: str
    vendor: str  # nvidia | amd
    vram_total_bytes: int
    vram_free_bytes: int | None = None
    driver: str | None = None
    pcie_gen: int | None = None
    pcie_width: int | None = None
    h2d_pinned_gbps: float | None = None
    h2d_pageable_gbps: float | None = None


@dataclass
class ProbeResult:
    gpus: list[GpuInfo]
    ram_total_bytes: int
    ram_available_bytes: int
    cpu_count: int
    disk_path: str
    disk_free_bytes: int
    profile: str
    profile_reason: str
    notes: list[str] = field(default_factory=list)
    swap_total_bytes: int = 0  # reported, never budgeted (a plan that needs swap is refused)
    disk_read_gbps: float | None = None  # sequential read of a fresh file in disk_path, page cache dropped

    def to_json(self) -> dict:
        return asdict(self)


def _nvidia_gpus() -> list[GpuInfo]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no NVIDIA driver on this machine
        return []
    gpus = []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else str(name)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gen = width = None
            try:
                gen = int(pynvml.nvmlDeviceGetMaxPcieLinkGeneration(h))
                width = int(pynvml.nvmlDeviceGetMaxPcieLinkWidth(h))
            except Exception:  # some boards (SXM, virtualised) do not report the link
                pass
            gpus.append(GpuInfo(i, name, "nvidia", int(mem.total), int(mem.free), driver, gen, width))
    finally:
        pynvml.nvmlShutdown()
    return gpus


def _torch_gpus() -> list[GpuInfo]:
    """AMD (ROCm builds report device type "cuda"; `torch.version.hip` tells them apart) or NVIDIA without nvml."""
    from lowvram import device

    if not device.accelerator_available():
        return []
    vendor = "amd" if device.is_rocm() else "nvidia"
    return [
        GpuInfo(i, device.accelerator_name(i), vendor, device.accelerator_total_bytes(i))
        for i in range(device.accelerator_count())
    ]


def measure_h2d_gbps(backend, nbytes: int = 256 * 2**20, pinned: bool = True, repeats: int = 3) -> float:
    """Host-to-device copy bandwidth (GB/s) with a short timed copy through the device seam; best of `repeats`.

    Timed on the backend's clock (wall clock after a synchronize; the simulated clock on the simulated device).
    """
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8)
    if pinned:
        host = backend.pin(host)
    backend.to_device(host, non_blocking=pinned)  # warm-up (allocation, page faults)
    best = float("inf")
    for _ in range(repeats):
        t0 = backend.clock_s()
        copy = backend.to_device(host, non_blocking=pinned)
        best = min(best, backend.clock_s() - t0)
        del copy
    return nbytes / best / 1e9 if best > 0 else float("inf")


def measure_disk_read_gbps(folder: str | os.PathLike, nbytes: int = 256 * 2**20, chunk: int = 8 * 2**20) -> float:
    """Sequential read GB/s of a fresh file written in `folder`, its pages dropped from the page cache before the
    read (a re-read of a cached file would measure RAM). The file is removed afterwards."""
    import tempfile

    import numpy as np

    block = np.random.default_rng(0).integers(0, 256, chunk, dtype=np.uint8).tobytes()  # incompressible
    fd, name = tempfile.mkstemp(prefix=".lowvram-probe-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            for _ in range(max(1, nbytes // chunk)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(chunk)
        t0 = time.perf_counter()
        total = 0
        with open(name, "rb", buffering=0) as f:
            while (got := f.readinto(buf)) > 0:
                total += got
        return total / (time.perf_counter() - t0) / 1e9
    finally:
        os.unlink(name)


def nearest_profile(gpu: GpuInfo | None) -> tuple[HardwareProfile, str]:
    """The built-in profile for this GPU: by model number in its name, else the same vendor's closest VRAM size."""
    profiles = all_profiles()
    if gpu is None:
        return load_profile("cpu"), "no GPU found"
    name = gpu.name.lower().replace(" ", "")
    for p in profiles:
        key = p.name.lower().replace("-", "")
        if p.vendor == gpu.vendor and key in name.replace("-", ""):
            return p, f"GPU name '{gpu.name}' matches profile '{p.name}'"
    same_vendor = [p for p in profiles if p.vendor == gpu.vendor] or [p for p in profiles if p.vendor != "cpu"]
    best = min(same_vendor, key=lambda p: abs(p.vram_bytes - gpu.vram_total_bytes))
    return best, f"closest {gpu.vendor} profile by VRAM ({best.vram_bytes / GIB:.0f} GiB)"


def custom_profile(base: HardwareProfile, gpu: GpuInfo | None, ram_total_bytes: int) -> HardwareProfile:
    """`base` with what was measured on this machine (VRAM, host RAM, copy bandwidths), listed in `measured`.

    Without a GPU the device is host memory: the cpu profile's device share is capped at the RAM there is.
    """
    if gpu is None:
        update = {
            "name": f"{base.name}-probed",
            "description": f"this machine without a GPU, probed (figures not measured come from profile '{base.name}')",
            "host_ram_bytes": ram_total_bytes,
            "vram_bytes": min(base.vram_bytes, ram_total_bytes),
        }
        measured = ["host_ram_bytes"]
    else:
        slug = "".join(c if c.isalnum() else "-" for c in gpu.name.lower()).strip("-")
        update = {
            "name": f"probed-{slug}",
            "description": f"{gpu.name}, probed (figures not measured come from profile '{base.name}')",
            "vram_bytes": gpu.vram_total_bytes,
            "host_ram_bytes": ram_total_bytes,
        }
        measured = ["vram_bytes", "host_ram_bytes"]
        if gpu.h2d_pinned_gbps:
            update["h2d_pinned_gbps"] = round(gpu.h2d_pinned_gbps, 2)
            measured.append("h2d_pinned_gbps")
        if gpu.h2d_pageable_gbps:
            update["h2d_pageable_gbps"] = round(gpu.h2d_pageable_gbps, 2)
            measured.append("h2d_pageable_gbps")
    update["measured"] = tuple(dict.fromkeys([*base.measured, *measured]))
    return base.model_copy(update=update)


def profile_to_toml(profile: HardwareProfile, source: str) -> str:
    data = profile.model_dump()
    supports = data.pop("supports")
    lines = [f"# {source}"]
    for key, value in data.items():
        if value is None:  # TOML has no null: a field left out takes its default (not measured)
            continue
        lines.append(f"{key} = {_toml(value)}")
    lines.append("")
    lines.append("[supports]")
    lines.extend(f"{key} = {_toml(value)}" for key, value in supports.items())
    return "\n".join(lines) + "\n"


def _toml(value) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def probe(
    measure_bandwidth: bool = True, disk_path: str | os.PathLike = ".", measure_disk: bool = False
) -> tuple[ProbeResult, HardwareProfile]:
    """Detect GPUs, RAM, cores and free disk; match a profile. Returns the result and the profile to use: the
    matched built-in one with every figure measured here put in (`profile.measured` names them)."""
    notes: list[str] = []
    gpus = _nvidia_gpus()
    if not gpus:
        gpus = _torch_gpus()
    vm = psutil.virtual_memory()
    disk = Path(disk_path).expanduser().resolve()
    while not disk.exists():
        disk = disk.parent
    if gpus and measure_bandwidth:
        from lowvram import device

        if not device.accelerator_available():
            notes.append("GPU found by the driver but this torch build cannot use it: install a CUDA/ROCm torch.")
    if gpus and measure_bandwidth and not notes:
        from lowvram.device import get_backend

        backend = get_backend("cuda")
        g = gpus[0]
        g.h2d_pinned_gbps = measure_h2d_gbps(backend, pinned=True)
        g.h2d_pageable_gbps = measure_h2d_gbps(backend, pinned=False)
    disk_gbps = None
    if measure_disk:
        try:
            disk_gbps = measure_disk_read_gbps(disk)
        except OSError as e:
            notes.append(f"disk read speed not measured in {disk}: {e.strerror or e}")
    primary = gpus[0] if gpus else None
    matched, reason = nearest_profile(primary)
    # What was measured here replaces the built-in figures (a 3090 with 32 GiB of RAM is planned for 32 GiB);
    # `ProbeResult.profile` keeps the built-in name it started from.
    profile = custom_profile(matched, primary, int(vm.total))
    reason += f"; measured here: {', '.join(profile.measured)}"
    if not gpus:
        notes.append("No GPU found: using the 'cpu' profile (good for the tiny demo and tests, not for 19B training).")
    if len(gpus) > 1:
        notes.append(f"{len(gpus)} GPUs found: profiles describe one; `lowvram train --nproc {len(gpus)}` uses all.")
    result = ProbeResult(
        gpus=gpus,
        ram_total_bytes=int(vm.total),
        ram_available_bytes=int(vm.available),
        cpu_count=os.cpu_count() or 1,
        disk_path=str(disk),
        disk_free_bytes=int(shutil.disk_usage(disk).free),
        profile=matched.name,
        profile_reason=reason,
        notes=notes,
        swap_total_bytes=int(psutil.swap_memory().total),
        disk_read_gbps=round(disk_gbps, 2) if disk_gbps else None,
    )
    if disk_gbps:
        profile = profile.model_copy(update={"disk_read_gbps": round(disk_gbps, 2)})
    return result, profile
