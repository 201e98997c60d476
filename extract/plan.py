"""`ExtractPlan`: one typed, frozen description of an extraction, validated once from the config.

Extraction, reading, training and prediction pass a plan around instead of a DictConfig: the
resolved device, dtypes, layers and poolings, the entry's spec (what hashes to the cache key) and
the key itself. Every check a user can trip runs here, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from llmembed.cache.format import STORE_DTYPES, EntrySpec
from llmembed.cache.keys import memo_path
from llmembed.cache.root import root_path
from llmembed.configs import check_backbone
from llmembed.errors import UserError
from llmembed.extract.backbones import BackboneInfo, inspect_backbone

log = logging.getLogger(__name__)

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # torch dtypes by name
AUTO_DTYPES = ("bfloat16", "float32")  # what `extract.dtype: auto` may resolve to


class ConfigError(UserError, ValueError):
    """An extraction setting is out of range; the message gives the valid values."""


class LayerRangeError(ConfigError):
    """Layers beyond the model's hidden states 0..`num_layers`."""

    def __init__(self, message: str, num_layers: int):
        super().__init__(message)
        self.num_layers = num_layers


@dataclass(frozen=True)
class BackboneRef:
    """Where a backbone comes from (conf/backbone/*.yaml), as plain values. `get` lets the loaders
    in `backbones.py` read it like the mapping they were written for."""

    name: str
    path: str
    revision: str | None = None
    tokenizer: str | None = None
    padding_side: str = "right"
    device_map: str | None = None
    trust_remote_code: bool = False

    @classmethod
    def from_config(cls, cfg) -> BackboneRef:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: cfg.get(k) for k in fields if cfg.get(k) is not None}
        ref = cls(**values)
        if ref.padding_side not in ("left", "right"):
            raise ConfigError(
                f"backbone.padding_side must be left or right, got {ref.padding_side!r}"
            )
        return ref

    def get(self, name: str, default=None):
        value = getattr(self, name, None)
        return default if value is None else value

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ExtractPlan:
    backbone: BackboneRef
    info: BackboneInfo
    spec: EntrySpec  # hashes to the key of the entry this plan fills
    read_specs: tuple[EntrySpec, ...]  # entries that may serve a read (`dtype: auto`: either dtype)
    layers: tuple[int, ...]  # hidden states stored when an entry is made (0 = embeddings)
    poolings: tuple[str, ...]
    need_layers: tuple[int, ...]  # what an existing entry must store to serve the request
    need_poolings: tuple[str, ...]
    device: (
        str  # as configured: auto (each process's own GPU under accelerate, else cpu), cpu, cuda:1
    )
    token_budget: int | str  # padded tokens per batch, or "auto" (sized when the append is planned)
    shard_mb: float | str  # MB per shard file, or "auto" (see `shard_bytes`)
    progress: bool
    cache_root: Path
    group_writable: bool = False
    dtype_request: str = ""  # extract.dtype as configured ("auto", or the dtype itself)

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def stored(self) -> dict[str, list[int]]:
        """Layers stored per pooling: the pooler exists for the last layer only."""
        return {
            p: ([self.info.num_layers] if p == "pooler" else list(self.layers))
            for p in self.poolings
        }

    @property
    def depth(self) -> int:
        """How many layers of the model to build."""
        return max([*self.layers, *([self.info.num_layers] if "pooler" in self.poolings else [])])

    def bytes_per_row(self, *, float32: bool = False) -> int:
        """Bytes of one text's stored values (`float32`: as pooled, before the store dtype)."""
        itemsize = 4 if float32 else STORE_DTYPES[self.spec.store_dtype]().itemsize
        return sum(len(v) for v in self.stored.values()) * self.info.hidden_size * itemsize

    def for_spec(self, spec: EntrySpec) -> ExtractPlan:
        """The same request, filling the entry of `spec` (one of `read_specs`)."""
        return dataclasses.replace(self, spec=spec)

    def storing(self, layers, poolings) -> ExtractPlan:
        return dataclasses.replace(self, layers=tuple(layers), poolings=tuple(poolings))

    def confirmed(self) -> ExtractPlan:
        """The plan whose `auto` device and dtype torch itself chose, for computing: the cache key
        of a new entry follows the hardware that computes it, even where `presumed_device` (no
        torch) could not see a GPU."""
        if self.device != "auto" or self.dtype_request != "auto":
            return self
        dtype = resolve_dtype("auto", resolve_device("auto"))
        if dtype == self.spec.compute_dtype:
            return self
        return self.for_spec(dataclasses.replace(self.spec, compute_dtype=dtype))


def resolve_device(name: str) -> str:
    """The device `name` means here; `auto` asks torch (CUDA where it sees a GPU, else the CPU)."""
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# What a GPU leaves on a Linux machine: its driver's device files, or a display or 3D controller
# (PCI class 0x03) by NVIDIA or AMD. Without any, torch cannot see one.
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg", "/dev/nvhost-ctrl")
GPU_VENDORS = ("0x10de", "0x1002")


def gpu_hints() -> bool:
    if any(os.path.exists(f) for f in GPU_DEVICE_FILES):
        return True
    for device in glob.glob("/sys/bus/pci/devices/*"):
        try:
            vendor = Path(device, "vendor").read_text().strip()
            kind = Path(device, "class").read_text().strip()
        except OSError:
            continue
        if vendor in GPU_VENDORS and kind.startswith("0x03"):
            return True
    return not os.path.isdir("/sys/bus/pci/devices")  # not Linux: ask torch


def presumed_device(name: str) -> str:
    """`resolve_device` without importing torch: what names the cache entry a run looks up first,
    so that a hit needs nothing from torch or CUDA (initializing CUDA alone took seconds on a GPU
    host). `auto` is cuda where a GPU's driver or device shows, else cpu; a named device is taken
    as named (`check_device` confirms a cuda or mps device where one is configured). A miss
    imports torch anyway and confirms `auto` (`ExtractPlan.confirmed`) before anything is
    computed."""
    if name == "auto":
        return "cuda" if gpu_hints() else "cpu"
    return name


def device_problem(name) -> str | None:
    """What keeps a device from running here, said as its fix (None: it can): auto, cpu, cuda,
    cuda:N or mps, present on this machine."""
    kind, _, number = str(name).partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (
        number and (kind != "cuda" or not number.isdigit())
    ):
        return "use auto, cpu, cuda, cuda:N or mps"
    if kind in ("cuda", "mps"):
        import torch
    if kind == "cuda":
        if not torch.cuda.is_available():
            return (
                f"this machine has no usable CUDA GPU (torch {torch.__version__}, CUDA "
                f"{torch.version.cuda or 'not built in'}): use cpu or auto"
            )
        n = torch.cuda.device_count()
        if number and int(number) >= n:
            return f"this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}: use one or auto"
    if kind == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available here: use cpu or auto"
    return None


def check_device(name, setting: str = "extract.device") -> str:
    """`name` if it can run here (device_problem), checked before any model is loaded: a missing
    GPU would otherwise fail only after loading the weights."""
    problem = device_problem(name)
    if problem:
        shown = f"{setting} {name!r}" if setting.startswith("--") else f"{setting}={name!r}"
        raise ConfigError(f"{shown}: {problem}")
    return str(name)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_settings(ex) -> None:
    """Settings that would otherwise be reinterpreted silently (1.5 read as layer 1), or fail late
    (no truncation then a crash, a division by zero): each is refused before any model is loaded."""
    if not _is_int(ex.max_length) or ex.max_length < 1:
        raise ConfigError(
            f"extract.max_length must be a positive number of tokens, got {ex.max_length!r}"
        )
    shard_mb = ex.shard_mb
    if shard_mb != "auto" and (
        not isinstance(shard_mb, (int, float))
        or isinstance(shard_mb, bool)
        or not 0 < shard_mb < float("inf")
    ):
        raise ConfigError(
            f"extract.shard_mb must be auto or a positive number of MB, got {shard_mb!r}"
        )
    budget = ex.token_budget
    if budget != "auto" and (not _is_int(budget) or budget < 1):
        raise ConfigError(
            f"extract.token_budget must be auto or a positive integer, got {budget!r}"
        )
    layers = ex.layers
    if layers != "all" and not isinstance(layers, (str, int, float)):
        odd = [x for x in layers if not _is_int(x)]
        if odd:
            raise ConfigError(
                f"extract.layers must be 'all' or a list of whole layer indices, got {odd} in "
                f"{list(layers)}; write e.g. [1,2]"
            )
    poolings = ex.poolings
    if poolings != "all" and not isinstance(poolings, str) and len(poolings) == 0:
        raise ConfigError(
            "extract.poolings is empty; give 'all' or a list of poolings, e.g. [mean,last]"
        )
    check_device(ex.device)


def native_bf16(device: str) -> bool:
    """Whether `device` multiplies bfloat16 in hardware (GPUs; x86 CPUs with AVX512-BF16 or AMX).

    There, bfloat16 ran SmolLM2 2.5-3x faster than float32 at cosine 0.9999 and the same probe
    accuracy (benchmarks/RESULTS.md); elsewhere bfloat16 is emulated and no faster."""
    if device.startswith("cuda"):
        return True
    flags = cpu_flags()
    if flags is not None:
        return bool(flags & {"avx512_bf16", "amx_tile"})
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence getattr
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


@cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags as Linux reports them (the same CPUID bits, enabled by the kernel,
    that torch's checks read), or None where /proc/cpuinfo does not exist."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def resolve_dtype(name: str, device: str) -> str:
    if name == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    if name not in COMPUTE_DTYPES:
        raise ConfigError(
            f"extract.dtype must be auto or one of {sorted(COMPUTE_DTYPES)}, got {name!r}"
        )
    return name


# A GPU's `auto` token budget may use this share of the memory free once the model is loaded:
# a quarter, so that a second job started on the same card at the same time fits beside it.
GPU_MEMORY_SHARE = 0.25
# Beyond this many tokens a batch is no faster, even for small models (and larger batches only
# hold more memory); at least this many keep a GPU's matmuls large.
GPU_BUDGET = (4096, 65536)
CPU_BUDGET = 1024  # measured fastest on CPUs: 3.7x faster than 16384 for SmolLM2


def resolve_token_budget(
    value,
    device: str,
    info: BackboneInfo | None = None,
    *,
    row_bytes: int = 0,
    mean_tokens: float = 1.0,
) -> int:
    """Padded tokens per batch. On a CPU small batches are fastest. On a GPU `auto` sizes batches
    to a share of the free memory: per token the working activations (about 17 hidden widths in
    bfloat16; layers are pooled as they run, so no hidden state is kept) and, per text, its pooled
    values (`row_bytes`, float32, with the cast copy, for each of the batches in flight) spread over
    its `mean_tokens`; out-of-memory still halves it."""
    if value != "auto":
        if not _is_int(value) or value < 1:
            raise ConfigError(
                f"extract.token_budget must be auto or a positive integer, got {value!r}"
            )
        return int(value)
    if not str(device).startswith("cuda"):
        return CPU_BUDGET
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    hidden = info.hidden_size if info else 4096
    in_flight = 4  # the batch being computed and three on their way to the host
    per_token = 17 * hidden * 2 + in_flight * 1.5 * row_bytes / max(mean_tokens, 1.0)
    low, high = GPU_BUDGET
    return int(min(max(GPU_MEMORY_SHARE * free / per_token, low), high))


# Shard files of `shard_mb: auto`: on a GPU larger files (fewer, each written faster per byte),
# on a CPU the size that keeps a job's memory small.
AUTO_SHARD_MB = {"cuda": 512, "cpu": 64}


def shard_bytes(shard_mb, device: str) -> float:
    if shard_mb == "auto":
        shard_mb = AUTO_SHARD_MB["cuda" if str(device).startswith("cuda") else "cpu"]
    return float(shard_mb) * 2**20


def resolve_layers(requested, num_layers: int, name: str) -> list[int]:
    if requested == "all":
        return list(range(num_layers + 1))
    if isinstance(requested, (str, int, float)) or not requested:
        raise ConfigError(
            f"extract.layers must be 'all' or a list of layer indices, got {requested!r}"
        )
    odd = [x for x in requested if not _is_int(x)]
    if odd:
        raise ConfigError(
            f"layers must be whole layer indices, got {odd} in {list(requested)}; write e.g. [1,2]"
        )
    layers = sorted({int(x) + (num_layers + 1 if int(x) < 0 else 0) for x in requested})
    bad = [x for x in requested if not -(num_layers + 1) <= int(x) <= num_layers]
    if bad:
        raise LayerRangeError(
            f"layers {list(bad)} requested but {name} has hidden states 0-{num_layers} "
            f"(0 = embeddings, {num_layers} = last layer); use layers within that range",
            num_layers,
        )
    return layers


def resolve_poolings(requested, info: BackboneInfo, name: str) -> list[str]:
    if requested == "all":
        return [p for p in info.poolings if not (p == "first" and info.causal)]
    requested = [requested] if isinstance(requested, str) else list(requested)
    if not requested:
        raise ConfigError(
            f"no pooling requested for {name}; give 'all' or a list, e.g. {list(info.poolings)}"
        )
    if "first" in requested and info.constant_first:
        raise ConfigError(
            f"pooling 'first' of {name} ({info.model_type}) is the state of the BOS token that its "
            "tokenizer puts before every text: a causal model's first token sees nothing else, so "
            f"it is the same vector for every text; use one of {list(info.poolings)}"
        )
    unknown = [p for p in requested if p not in info.poolings]
    if unknown:
        raise ConfigError(
            f"pooling {unknown} is not available for {name} ({info.model_type}); "
            f"available: {list(info.poolings)}"
        )
    return sorted(set(requested))


def make_plan(extract_cfg, backbone_cfg, cache_cfg, *, need=None) -> ExtractPlan:
    """Validate the `extract`, `backbone` and `cache` config sections into a plan.

    `need` (layer indices, poolings) is what an existing entry must cover; by default what
    `extract` asks to store. A new entry stores the union of both."""
    ex = extract_cfg
    check_settings(ex)  # before anything is read or loaded
    check_backbone(backbone_cfg)
    bb = BackboneRef.from_config(backbone_cfg)
    root = root_path(cache_cfg.root)
    info = inspect_backbone(bb, memo_path(root))
    if "{text}" not in ex.prompt:
        raise ConfigError(f"extract.prompt must contain {{text}}, got {ex.prompt!r}")
    if ex.truncation_side not in ("left", "right"):
        raise ConfigError(
            f"extract.truncation_side must be left or right, got {ex.truncation_side!r}"
        )
    if ex.store_dtype not in STORE_DTYPES:
        raise ConfigError(f"extract.store_dtype must be one of {sorted(STORE_DTYPES)}")
    resolve_token_budget(ex.token_budget, "cpu")  # checks a number; "auto" is sized when planning
    max_length = int(ex.max_length)
    if info.max_positions and max_length > info.max_positions:
        log.info(
            "max_length %d > %s's %d positions: using %d",
            max_length,
            bb.name,
            info.max_positions,
            info.max_positions,
        )
        max_length = info.max_positions
    spec = EntrySpec(
        backbone=info.identity,
        model_type=info.model_type,
        compute_dtype=resolve_dtype(ex.dtype, presumed_device(ex.device)),
        store_dtype=ex.store_dtype,
        max_length=max_length,
        truncation_side=ex.truncation_side,
        prompt=ex.prompt,
    )
    # `dtype: auto` reads an entry of either compute dtype, so that a sweep of CPU jobs reads what
    # a GPU job (bfloat16) extracted; a miss computes in this machine's own choice.
    specs = [spec]
    if ex.dtype == "auto":
        specs += [dataclasses.replace(spec, compute_dtype=d) for d in AUTO_DTYPES]
    read_specs = tuple({s.key: s for s in specs}.values())
    layers = resolve_layers(ex.layers, info.num_layers, bb.name)
    poolings = resolve_poolings(ex.poolings, info, bb.name)
    need_layers, need_poolings = layers, poolings
    if need is not None:
        need_layers = resolve_layers(list(need[0]), info.num_layers, bb.name)
        need_poolings = resolve_poolings(list(need[1]), info, bb.name)
        layers = sorted({*layers, *need_layers})
        poolings = sorted({*poolings, *need_poolings})
    return ExtractPlan(
        backbone=bb,
        info=info,
        spec=spec,
        read_specs=read_specs,
        layers=tuple(layers),
        poolings=tuple(poolings),
        need_layers=tuple(need_layers),
        need_poolings=tuple(need_poolings),
        device=str(ex.device),
        token_budget=ex.token_budget,
        shard_mb=ex.shard_mb if ex.shard_mb == "auto" else float(ex.shard_mb),
        progress=bool(ex.progress),
        cache_root=root,
        group_writable=bool(cache_cfg.get("group_writable", False)),
        dtype_request=str(ex.dtype),
    )


def plan_from_config(cfg, *, need=None) -> ExtractPlan:
    """A plan from a composed `extract` (or `classify`) config."""
    return make_plan(cfg.extract, cfg.backbone, cfg.cache, need=need)
