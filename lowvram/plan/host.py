"""Host RAM as a budget: the tiers host memory comes in, the machine's usable RAM, the load and export phases, and
the smallest host RAM that trains a run.

Tiers: pinned (page-locked, fast asynchronous copies), pageable anonymous RAM, file-backed page cache (reclaimable:
it speeds reads up but is never counted as required) and disk. The hard limit is anonymous + pinned bytes against
the machine's RAM minus a reserve; swap is reported, never counted. It does not choose settings (plan.py does).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lowvram.errors import UsageError

GIB = 2**30
GB = 10**9

TIERS = ("pinned", "pageable", "page cache", "disk")
# Held back from the machine's RAM for the OS, the desktop, the GPU driver's own host allocations and a minimal page
# cache: 2 GiB or 8% of RAM, whichever is more. An assumption (an idle Linux desktop sits at 1.5-2.5 GiB used; Windows
# at 3-4 GiB), stated in the plan output.
HOST_RESERVE_MIN_BYTES = 2 * GIB
HOST_RESERVE_SHARE = 0.08
# The pinned staging ring of the pageable and disk tiers: one buffer being filled by the worker thread, one being
# copied to the device (offload/disk_tier.py allocates exactly this many).
STAGING_SLOTS = 2
# Pageable masters copied through a pinned staging ring by a worker thread reach ~90% of pinned H2D bandwidth: musubi's
# staged copier cut the unpinned penalty from ~50% to ~10% (DESIGN.md, "The field").
PAGEABLE_STAGING_EFFICIENCY = 0.9


def host_reserve_bytes(ram_bytes: int) -> int:
    return max(HOST_RESERVE_MIN_BYTES, math.ceil(ram_bytes * HOST_RESERVE_SHARE))


def usable_host_bytes(ram_bytes: int) -> int:
    """Anonymous + pinned bytes a run may hold on a machine with `ram_bytes` of RAM."""
    return max(0, ram_bytes - host_reserve_bytes(ram_bytes))


def smallest_host_ram_bytes(need_bytes: int) -> int:
    """The smallest RAM (whole GiB) whose usable part holds `need_bytes` of anonymous + pinned memory."""
    ram = max(need_bytes + HOST_RESERVE_MIN_BYTES, math.ceil(need_bytes / (1 - HOST_RESERVE_SHARE)))
    gib = math.ceil(ram / GIB)
    while usable_host_bytes(gib * GIB) < need_bytes:  # rounding of the share can leave it a byte short
        gib += 1
    return gib * GIB


_UNITS = {"": GIB, "g": GIB, "gib": GIB, "gb": GB, "m": 2**20, "mib": 2**20, "mb": 10**6, "t": 2**40, "tib": 2**40}


def parse_host_ram(text: str | int, where: str = "--host-ram") -> int:
    """`16GiB`, `16G`, `16` (GiB), `16GB` (10^9), `16384MiB` -> bytes; anything else is refused in one line."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise UsageError(f"{where} must be positive, got {text}")
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise UsageError(f"{where} '{text}' is not a memory size: write e.g. 16GiB, 32GB or 16384MiB")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class HostMemory:
    """The host RAM a plan budgets against, where the figure came from, and the swap the machine has."""

    ram_bytes: int
    source: str  # "--host-ram" | "probed" | "profile '<name>'"
    swap_bytes: int = 0

    @property
    def usable_bytes(self) -> int:
        return usable_host_bytes(self.ram_bytes)


def probe_host() -> HostMemory:
    """This machine's RAM and swap (psutil)."""
    import psutil

    return HostMemory(int(psutil.virtual_memory().total), "probed", int(psutil.swap_memory().total))


def component_tier(label: str) -> str:
    """The host tier of a budget component, from its label: `(pinned)`, `(page cache)`, `(disk)`; else pageable."""
    for group in reversed(re.findall(r"\(([^)]*)\)", label)):
        for word in (w.strip() for w in group.split(",")):
            if word in TIERS:
                return word
    return "pageable"


def swap_bandwidth_bytes_per_s(tier: str, h2d_pinned_gbps: float, disk_read_gbps: float) -> float:
    """Bytes per second one swapped block reaches the device at, by the tier its master lives in.

    The disk tier's reads and copies are pipelined through the staging ring, so the slower of the two sets the rate;
    the page cache may make re-reads faster, which is never counted.
    """
    pinned = h2d_pinned_gbps * GB
    if tier == "pinned":
        return pinned
    if tier == "pageable":
        return pinned * PAGEABLE_STAGING_EFFICIENCY
    if tier == "disk":
        return min(pinned, disk_read_gbps * GB)
    raise ValueError(f"unknown host tier {tier!r}")


def swap_host_components(
    tier: str, blocks: int, on_disk: int, block_bytes: int
) -> tuple[dict[str, int], dict[str, int]]:
    """(host RAM, disk) components of `blocks` swapped blocks of `block_bytes` each: `on_disk` of them read from the
    disk tier's file, the others' masters in `tier` (pinned or pageable) RAM."""
    if blocks <= 0:
        return {}, {}
    on_disk = min(on_disk, blocks)
    ram: dict[str, int] = {}
    if blocks - on_disk:
        ram[f"swapped blocks ({tier})"] = (blocks - on_disk) * block_bytes
    if tier == "pageable" or on_disk:
        ram[f"staging ring ({STAGING_SLOTS} blocks, pinned)"] = STAGING_SLOTS * block_bytes
    disk = {"swapped blocks (disk)": on_disk * block_bytes} if on_disk else {}
    return ram, disk


def load_ram_components(
    tier: str, blocks: int, on_disk: int, block_bytes: int, whole_bytes: int, quantized: bool = True
) -> dict[str, int]:
    """Host RAM of loading the transformer at its stored precision (quantize on read, one tensor at a time).

    The loader holds the transformer, then block swap copies each swapped block into its host master (pinned or
    pageable: one block's copy beside the loaded model at worst). A quantized load writes each disk-tier block to
    the tier's file as soon as it is read (offload/disk_tier.py `DiskTierLoader`), so those are never held together;
    an unquantized load (train/run.py refuses blocks on disk there) would hold them all.
    """
    on_disk = min(on_disk, blocks)
    held = whole_bytes - (on_disk * block_bytes if quantized else 0)
    out = {"transformer being loaded (anonymous)": held}
    if blocks > on_disk:
        out[f"one swapped block's host master ({tier})"] = block_bytes
    if on_disk:
        out["block being written to the disk tier"] = block_bytes
    return out


def blocks_on_disk_needed(over_ram_bytes: int, block_bytes: int, blocks: int) -> int | None:
    """How many swapped blocks must move to disk so a plan `over_ram_bytes` over host RAM fits (each one moved frees
    one block's master in every phase the training settings decide); None when moving all of them is not enough."""
    if over_ram_bytes <= 0:
        return 0
    if block_bytes <= 0:
        return None
    # the first block on disk adds the staging ring (pinned tier) or nothing (pageable tier already has it)
    need = math.ceil(over_ram_bytes / block_bytes)
    return need if need <= blocks else None


def text_disk_tier_components(
    layers: int, layers_bytes: int, largest_layer_bytes: int, whole_bytes: int, quantized: bool = True
) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(device, host RAM, disk) of the text encoder with its `layers` decoder layers (`layers_bytes` together) in the
    disk tier while captions are cached (offload/text_disk_tier.py).

    The device holds the encoder outside its layers and a ring of two layer slots. Host RAM holds the pinned
    staging ring and, while loading, the encoder outside its layers (until it moves to the device) and the one layer
    being written to the file: a quantized load writes each layer as it reads it; an unquantized one (transformers'
    from_pretrained) holds the whole encoder first and writes the layers afterwards.
    """
    outside = whole_bytes - layers_bytes
    device = {"text encoder outside its layers": outside, "text encoder layer ring (2 slots)": 2 * largest_layer_bytes}
    loaded = (
        {"text encoder outside its layers while loading": outside}
        if quantized
        else {"text encoder loaded whole (unquantized: its layers go to disk after)": whole_bytes}
    )
    ram = {
        **loaded,
        "text encoder layer being written to the disk tier": largest_layer_bytes,
        f"text encoder staging ring ({STAGING_SLOTS} layers, pinned)": STAGING_SLOTS * largest_layer_bytes,
    }
    return device, ram, {f"text encoder layers ({layers}, disk)": layers_bytes}


def export_ram_components(lora_bytes: int) -> dict[str, int]:
    """Host RAM of writing the LoRA: its tensors brought to the host, and the file's serialized copy."""
    return {"LoRA tensors on the host": lora_bytes, "serialized LoRA file": lora_bytes}


def tier_totals(ram: dict[str, int], disk: dict[str, int]) -> dict[str, int]:
    """Bytes per tier for one phase's host components (page cache is never a requirement, so it has none)."""
    out = dict.fromkeys(TIERS, 0)
    for label, nbytes in ram.items():
        out[component_tier(label)] += nbytes
    for nbytes in disk.values():
        out["disk"] += nbytes
    return out


SWAP_TIERS = ("pinned", "pageable")


def reserve_assumption() -> str:
    return (
        f"host RAM usable = RAM minus {HOST_RESERVE_MIN_BYTES / GIB:.0f} GiB or {HOST_RESERVE_SHARE:.0%} (whichever is "
        "more) for the OS and driver; page cache and swap are never counted"
    )


def host_summary(
    host: HostMemory, *, chosen_phases: dict, smallest_need_bytes: int | None, smallest_describe: str | None
) -> dict:
    """The plan's host-RAM figures (`Plan.host`): budget, need per phase and tier, smallest RAM, swap."""
    need = max(p.ram_peak_bytes for p in chosen_phases.values())
    peak_phase = max(chosen_phases, key=lambda n: chosen_phases[n].ram_peak_bytes)
    tiers: dict[str, str] = {}
    for phase in chosen_phases.values():
        for label, nbytes in phase.ram.items():
            if nbytes:
                tiers[label] = component_tier(label)
        for label, nbytes in phase.disk.items():
            if nbytes:
                tiers[label] = "disk"
    usable = host.usable_bytes
    return {
        "ram_bytes": host.ram_bytes,
        "source": host.source,
        "usable_bytes": usable,
        "reserve_bytes": host.ram_bytes - usable,
        "swap_bytes": host.swap_bytes,
        "need_bytes": need,
        "peak_phase": peak_phase,
        "phases": {
            name: {"need_bytes": p.ram_peak_bytes, **tier_totals(p.ram, p.disk)} for name, p in chosen_phases.items()
        },
        "tiers": tiers,
        "smallest_ram_bytes": smallest_host_ram_bytes(smallest_need_bytes) if smallest_need_bytes else None,
        "smallest_settings": smallest_describe,
        "fits_only_by_swapping": usable < need <= usable + host.swap_bytes,
    }


def summary_lines(summary: dict) -> list[str]:
    """What `lowvram plan` prints about host RAM (empty for a plan without a host summary)."""
    if not summary:
        return []
    s = summary
    lines = [
        f"host RAM: {s['ram_bytes'] / GIB:.1f} GiB ({s['source']}), {s['usable_bytes'] / GIB:.1f} GiB usable; this "
        f"plan needs {s['need_bytes'] / GIB:.1f} GiB anonymous + pinned at its peak ({s['peak_phase']})"
    ]
    if s["smallest_ram_bytes"] is not None:
        lines.append(
            f"smallest host RAM that trains this: {s['smallest_ram_bytes'] / GIB:.0f} GiB ({s['smallest_settings']})"
        )
    else:
        lines.append("smallest host RAM that trains this: none (no setting fits this profile's VRAM)")
    by_tier: dict[str, list[str]] = {}
    for label, tier in s["tiers"].items():
        by_tier.setdefault(tier, []).append(label)
    for tier in TIERS:
        if tier in by_tier:
            lines.append(f"tier {tier}: " + "; ".join(by_tier[tier]))
    if s["fits_only_by_swapping"]:
        lines.append(
            f"it would fit only by swapping ({s['swap_bytes'] / GIB:.1f} GiB of swap): not chosen, swap thrashes"
        )
    return lines


def swap_reason(reason: str | None, summary: dict) -> str | None:
    """A refusal that says when the run would fit only by swapping (so the user knows it is not chosen)."""
    if reason and summary.get("fits_only_by_swapping"):
        return reason + f"; it would fit only by swapping ({summary['swap_bytes'] / GIB:.1f} GiB of swap), not planned"
    return reason
