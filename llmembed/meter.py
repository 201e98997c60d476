"""Runtime and energy of a piece of work: wall and CPU seconds, peak memory, joules where the
hardware tells them (NVML's energy counter on NVIDIA GPUs, RAPL on CPUs), else null with the reason."""

from __future__ import annotations

import glob
import resource
import time
from pathlib import Path

RAPL = "/sys/class/powercap/intel-rapl:*/energy_uj"  # package domains (AMD exposes them too)


def _rapl_read() -> dict[str, int] | None:
    paths = [p for p in glob.glob(RAPL) if p.count(":") == 1]  # packages, not their sub-domains
    try:
        return {p: int(Path(p).read_text()) for p in paths} or None
    except OSError:  # present but not readable (needs root on recent kernels)
        return None


def _cuda():
    """torch.cuda where CUDA is in use, else None. Meters of work that ran no model (a cache hit) do
    not import torch for it."""
    import sys

    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_available() else None


def _nvml_devices(device_indices: list[int]):
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in device_indices]
    except Exception:
        return None, []


class Meter:
    """`with Meter(devices) as m: ...` then `m.figures()`. `devices` are the CUDA device indices
    whose energy belongs to this process; on CPU the RAPL package counters are read instead
    (`cpu_energy=False` leaves them to another process of the same node)."""

    def __init__(self, gpu_devices: list[int] | None = None, *, cpu_energy: bool = True):
        self.gpu_devices = gpu_devices or []
        self.cpu_energy = cpu_energy

    def __enter__(self) -> Meter:
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.nvml, self.handles = (
            _nvml_devices(self.gpu_devices) if self.gpu_devices else (None, [])
        )
        self.e0 = [self.nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles]  # mJ
        self.r0 = _rapl_read() if self.cpu_energy and not self.handles else None
        if cuda := _cuda():
            cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0
        self.energy, self.source, self.note = None, None, None
        if self.handles:
            used = [
                self.nvml.nvmlDeviceGetTotalEnergyConsumption(h) - e
                for h, e in zip(self.handles, self.e0, strict=True)
            ]
            self.energy, self.source = sum(used) / 1000, "nvml"
        elif self.r0 is not None:
            r1 = _rapl_read() or {}
            total = 0
            for path, start in self.r0.items():
                end = r1.get(path, start)
                if end < start:  # the counter wrapped around
                    end += int(Path(path).with_name("max_energy_range_uj").read_text())
                total += end - start
            self.energy, self.source = total / 1e6, "rapl"
        elif not self.cpu_energy:
            self.note = "measured by another process of this node"
        elif self.gpu_devices:
            self.note = "NVML is not available (install nvidia-ml-py)"
        else:
            self.note = f"no readable RAPL counters ({RAPL})"

    def figures(self) -> dict:
        return {
            "wall_s": round(self.wall, 3),
            "cpu_s": round(self.cpu, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_gpu_mb": round(cuda.max_memory_allocated() / 2**20, 1)
            if (cuda := _cuda())
            else None,
            "energy_j": None if self.energy is None else round(self.energy, 3),
            "energy_source": self.source,
            "energy_note": self.note,
        }


def combine(parts: list[dict]) -> dict:
    """Figures of several processes of one job: wall time of the slowest, the rest added up."""
    energies = [p["energy_j"] for p in parts if p["energy_j"] is not None]
    return {
        "processes": len(parts),
        "wall_s": max(p["wall_s"] for p in parts),
        "cpu_s": round(sum(p["cpu_s"] for p in parts), 3),
        "peak_rss_mb": max(p["peak_rss_mb"] for p in parts),
        "peak_gpu_mb": max(
            (p["peak_gpu_mb"] for p in parts if p["peak_gpu_mb"] is not None), default=None
        ),
        "energy_j": round(sum(energies), 3) if energies else None,
        "energy_source": next((p["energy_source"] for p in parts if p["energy_source"]), None),
        "energy_note": None if energies else parts[0]["energy_note"],
    }
