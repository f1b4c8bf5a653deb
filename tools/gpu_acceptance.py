"""The GPU acceptance run: the planner's predictions for the real 19B LTX-2 checked on a real GPU in one command.

(e) calibrate this GPU (`lowvram probe --calibrate`); (a) the full 19B transformer, bf16, random weights, LoRA r16 at
832x480x17 batch 2, no offload; (b) under a 24 GiB per-process cap the 3090 plan's choice, under 12 GiB the 4070
plan's, 3 steps each; (c) every strategy at real width on a few blocks (tools/gpu_check.py); (d) block swap and
streaming under TORCH_CUDA_SANITIZER=1. Each row puts measured peak VRAM, s/step, host->device GB/s and copy stall
share beside the prediction, uncalibrated and calibrated; one table on stdout, everything in a JSON file.

`--simulate` runs the same logic on the simulated accelerator at tiny widths (tests run it). Nothing comes from the
network; no device setting is changed (the memory cap is the caching allocator's per-process limit, lifted after).

    bash tools/gpu_acceptance.sh              # on the GPU machine (installs .whl/ first)
    bash tools/gpu_acceptance.sh --simulate   # anywhere
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing
GIB = 2**30
REAL_LAYERS = 48
SIM_LAYERS = 6  # the tiny family at this depth: the plans' block swaps scale to 3-4 blocks, more than the ring holds
SIM_TFLOPS = 0.5
# Rough cost of each section on an H100/H200, so one that cannot finish inside the budget is skipped, not cut off.
SECTION_S = {"calibrate": 60, "a": 60, "b_3090": 90, "base_low": 60, "b_4070": 90, "c": 90, "d": 60}


class Kit:
    """Shared state of one acceptance run: device, profiles, the clock, results (written after every section)."""

    def __init__(self, args: argparse.Namespace):
        from lowvram.device import accelerator_available, get_backend
        from lowvram.hardware import probe

        self.args = args
        self.simulate = args.simulate
        self.start = time.perf_counter()
        _, machine = probe(measure_bandwidth=not args.simulate)
        if args.simulate:
            from lowvram.profiles import load_profile

            # An H100-like device slowed to 0.5 TFLOP/s, so the tiny model's steps are compute, not batch copies;
            # predictions for the simulated device use the profile whose rates it was given.
            machine = load_profile("h100").model_copy(
                update={"name": "sim-h100", "bf16_tflops": SIM_TFLOPS, "description": "the simulated accelerator"}
            )
            self.backend = get_backend("sim", h2d_gbps=machine.h2d_pinned_gbps, tflops=machine.bf16_tflops)
        else:
            if not accelerator_available():
                raise SystemExit("gpu_acceptance: no CUDA or ROCm device here: run with --simulate")
            self.backend = get_backend("cuda")
        self.machine = machine
        self.calibrated = None
        self.dtype = torch.float32 if args.simulate else torch.bfloat16
        self.layers = SIM_LAYERS if args.simulate else REAL_LAYERS
        self.out = Path(args.json)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.results: dict = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "simulate": self.simulate,
            "device": self.device_name(),
            "torch": torch.__version__,
            "profile": machine.name,
            "cases": [],
            "skipped": [],
        }

    def device_name(self) -> str:
        from lowvram.calibrate import _device_name

        return _device_name(self.backend)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", flush=True)

    def has_time(self, section: str) -> bool:
        left = self.args.budget_s - self.elapsed()
        if self.simulate or left >= SECTION_S[section]:
            return True
        self.skip(section, f"{left:.0f} s of the {self.args.budget_s:g} s budget left, needs ~{SECTION_S[section]} s")
        return False

    def skip(self, section: str, why: str) -> None:
        self.log(f"skipped {section}: {why}")
        self.results["skipped"].append({"section": section, "why": why})

    def guard(self, section: str, fn, *args, **kwargs):
        """Run one section; an error is recorded in one line and the run goes on (the table shows what worked)."""
        try:
            return fn(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001
            self.log(f"{section} failed: {type(e).__name__}: {_first_line(e)}")
            self.results.setdefault("failed_sections", []).append(section)
            self.results.setdefault("errors", {})[section] = f"{type(e).__name__}: {_first_line(e)}"
            self.save()
            return None

    def save(self) -> None:
        from lowvram.fsutil import atomic_write_text

        atomic_write_text(self.out, json.dumps(self.results, indent=2, default=str) + "\n")

    # -- the run's shapes -------------------------------------------------------------------------------------------
    def cfg(self, precision: str = "bf16"):
        """The run config of the check: real 19B shapes on a GPU, the tiny family at small shapes when simulated."""
        from lowvram.config import load_config

        if self.simulate:
            values = {"model.family": "tiny", "data.resolution": "128x64", "data.frames": 9, "lora.rank": 4,
                      "data.max_text_tokens": 8, "train.mixed_precision": "fp32",
                      "model.precision": "fp32" if precision == "bf16" else precision}
        else:
            values = {"model.family": "ltx2", "data.resolution": "832x480", "data.frames": 17, "lora.rank": 16,
                      "model.precision": precision}
        values["train.batch_size"] = 2
        cfg, _ = load_config(None, values)
        return cfg

    def model_config(self) -> dict:
        from lowvram.plan.measure import model_configs

        return dict(model_configs("tiny" if self.simulate else "ltx2").transformer)


def real_cfg(batch: int = 2):
    from lowvram.config import load_config

    cfg, _ = load_config(None, {"model.family": "ltx2", "data.resolution": "832x480", "data.frames": 17,
                                "train.batch_size": batch, "lora.rank": 16})
    return cfg


def settings_of(dotted: dict):
    """The planner's `Settings` for a plan's run-config keys (the inverse of `Settings.dotted`)."""
    from lowvram.plan import Settings

    ramtorch = dotted.get("memory.ramtorch") or False
    if dotted.get("memory.blocks_to_swap"):
        offload = "block_swap"
    elif ramtorch:
        offload = "ramtorch"
    elif dotted.get("memory.group_offload"):
        offload = "group"
    else:
        offload = "none"
    return Settings(
        precision=dotted["model.precision"],
        offload=offload,
        blocks_to_swap=dotted.get("memory.blocks_to_swap") or 0,
        ramtorch_share=1.0 if ramtorch is True else float(ramtorch or 0.0),
        group_blocks_per_group=dotted.get("memory.group_offload_blocks_per_group") or 1,
        group_type=dotted.get("memory.group_offload_type") or "block_level",
        gradient_checkpointing=bool(dotted.get("memory.gradient_checkpointing")),
        activation_offload=bool(dotted.get("memory.activation_offload")),
        optimizer=dotted.get("optim.optimizer", "adamw"),
    )


def scaled(kit: Kit, s):
    """`s` for the check's model: unchanged on a GPU; on the simulated device swapped blocks scale to its depth."""
    if not kit.simulate:
        return s
    precision = "fp32" if s.precision == "bf16" else s.precision
    k = max(1, round(s.blocks_to_swap * kit.layers / REAL_LAYERS)) if s.blocks_to_swap else 0
    return replace(s, precision=precision, blocks_to_swap=min(k, kit.layers - 1))


def predict(kit: Kit, settings, profile) -> dict:
    """Device peak (no reserve: measured allocations are compared), s/step and stall share the planner predicts."""
    from lowvram.plan import predict_peak, predict_step_time

    cfg = kit.cfg(settings.precision)
    peak = predict_peak(cfg, profile, settings, num_layers=kit.layers)
    t = predict_step_time(cfg, profile, settings, num_layers=kit.layers)
    stall = 1.0 - (t.compute_seconds + t.dequant_seconds) / t.seconds if t.seconds else 0.0
    return {"peak_bytes": peak.step_bytes + peak.optimizer_bytes, "step_s": t.seconds, "stall_share": max(stall, 0.0)}


def train_steps(kit: Kit, settings, *, cap_bytes: int | None = None, steps: int = 3) -> dict:
    """Build the model at `settings.precision`, apply `settings` as training does, cap device memory, train `steps`
    LoRA steps (AdamW) after one warm-up. Measured peak (allocated, reserved), median s/step, H2D bytes/step.
    A failure (out of memory under the cap, a library error) is the case's result, not the end of the run."""
    from lowvram.calibrate import _attention_kind, batch_for, random_lora_transformer
    from lowvram.config import apply_overrides
    from lowvram.offload import apply_memory_plan
    from lowvram.offload.harness import lora_step

    backend = kit.backend
    result: dict = {"settings": settings.describe(), "cap_bytes": cap_bytes}
    transformer = optimizer = batch = applied = params = None
    try:
        cfg = apply_overrides(kit.cfg(settings.precision), settings.dotted())
        precision = "bf16" if settings.precision == "fp32" else settings.precision
        device = "cpu" if kit.simulate else backend.device
        # built uncapped (on a GPU the whole model is materialised there first), then the strategies move their share
        # to the host and the cap applies to training
        transformer = random_lora_transformer(
            kit.model_config(), num_layers=kit.layers, rank=cfg.lora.rank, dtype=kit.dtype, device=device,
            precision=precision,
        )
        applied = apply_memory_plan(transformer, memory=cfg.memory, backend=backend)
        params = [p for p in transformer.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        batch = batch_for(transformer, cfg, kit.dtype)
        gc.collect()
        backend.empty_cache()
        backend.set_memory_cap(cap_bytes)
        times: list[float] = []
        moved_before = 0
        # the attention kernels calibration times (flash on a GPU; on the simulated device the math kernel, which
        # its clock times)
        with _attention_kind(backend), backend.session():
            for i in range(steps + 1):
                if i == 1:  # after the warm-up: optimizer state exists, rings are filled
                    backend.reset_peak_memory_stats()
                    moved_before = sum(getattr(s, "copied_bytes", 0) for s in applied.strategies)
                start = backend.clock_s()
                for p in params:
                    p.grad = None
                lora_step(transformer, batch, backend)
                optimizer.step()
                if i:
                    times.append(backend.clock_s() - start)
        stats = backend.memory_stats()
        moved = sum(getattr(s, "copied_bytes", 0) for s in applied.strategies) - moved_before
        step_s = sorted(times)[len(times) // 2]
        result.update(
            ok=True, peak_bytes=stats.max_allocated_bytes, reserved_bytes=stats.max_reserved_bytes, step_s=step_s,
            h2d_bytes_per_step=moved // steps, h2d_gbps=moved / steps / step_s / 1e9 if step_s else 0.0,
        )
    except torch.OutOfMemoryError as e:
        result.update(ok=False, error=f"out of memory: {_first_line(e)}")
    except Exception as e:  # noqa: BLE001 - the kit reports what broke and goes on to the next case
        result.update(ok=False, error=f"{type(e).__name__}: {_first_line(e)}")
    finally:
        backend.set_memory_cap(None)
        transformer = optimizer = batch = applied = params = None
        gc.collect()
        backend.empty_cache()
    return result


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def case(kit: Kit, name: str, settings, *, cap_bytes=None, baseline: dict | None = None, note: str = "") -> dict:
    kit.log(f"{name}: {settings.describe()}" + (f" under a {cap_bytes / 2**20:.1f} MiB cap" if cap_bytes else ""))
    measured = train_steps(kit, settings, cap_bytes=cap_bytes, steps=kit.args.steps)
    row = {"case": name, "note": note, **measured, "predicted": predict(kit, settings, kit.machine)}
    if kit.calibrated is not None:
        row["calibrated"] = predict(kit, settings, kit.calibrated)
    if measured.get("ok") and baseline and baseline.get("ok"):
        row["stall_share"] = max(0.0, 1.0 - baseline["step_s"] / measured["step_s"])
    kit.results["cases"].append(row)
    kit.save()
    kit.log(f"{name}: " + (_summary(row) if measured.get("ok") else measured["error"]))
    return row


def _summary(row: dict) -> str:
    p = row["predicted"]
    return (f"peak {row['peak_bytes'] / 2**20:.1f} MiB (predicted {p['peak_bytes'] / 2**20:.1f}), "
            f"{row['step_s']:.4g} s/step (predicted {p['step_s']:.4g}"
            + (f", calibrated {row['calibrated']['step_s']:.4g}" if "calibrated" in row else "") + ")")


def section_calibrate(kit: Kit) -> None:
    from lowvram.calibrate import calibrate, calibrated_profile
    from lowvram.fsutil import atomic_write_text
    from lowvram.hardware import profile_to_toml

    kit.log("(e) calibrating this device (lowvram probe --calibrate)")
    repeats = 1 if kit.simulate else 2
    cal = calibrate(kit.backend, kit.cfg(), progress=lambda what: kit.log(f"    {what}"), repeats=repeats)
    kit.calibrated = calibrated_profile(kit.machine, cal)
    path = kit.out.with_name("calibrated-profile.toml")
    atomic_write_text(path, profile_to_toml(kit.calibrated, "written by tools/gpu_acceptance.py"))
    kit.results["calibration"] = cal.to_json()
    kit.results["calibrated_profile"] = str(path)
    kit.save()
    kit.log(f"    train {cal.train_tflops} TFLOP/s, matmul {cal.matmul_tflops}, attention {cal.attention_tflops}, "
            f"H2D {cal.h2d_pinned_gbps} / {cal.h2d_pageable_gbps} GB/s pinned / pageable ({cal.seconds:.1f} s)")


def section_plans(kit: Kit) -> dict:
    """The 3090 and 4070 plans for the real 19B at 832x480x17 batch 2 (what users of those cards get)."""
    from lowvram.plan import plan_run
    from lowvram.profiles import load_profile

    plans = {}
    for name in ("3090", "4070"):
        profile = load_profile(name)
        plan = plan_run(real_cfg(), profile, choose=True)
        plans[name] = (plan, profile)
        kit.log(f"plan for '{name}': {plan.summary_line()}")
    kit.results["plans"] = {n: {"summary": p.summary_line(), "settings": p.settings} for n, (p, _) in plans.items()}
    return plans


def section_capped(kit: Kit, name: str, plan, profile, baseline: dict | None) -> dict | None:
    settings = settings_of(plan.settings)
    if settings.precision == "nf4-bnb" and importlib.util.find_spec("bitsandbytes") is None:
        kit.skip(f"b_{name}", "the plan chose nf4-bnb and bitsandbytes is not installed here")
        return None
    run = scaled(kit, settings)
    train = plan.phases["train"]
    if kit.simulate:
        # the simulated device is as much bigger than the tiny model's predicted peak as the card is than its plan's
        p = predict(kit, run, kit.machine)
        cap = int(p["peak_bytes"] * profile.vram_bytes / (train.vram_peak_bytes - train.vram.get("reserve", 0)))
    else:
        cap = profile.vram_bytes
    note = (f"the '{name}' plan predicts {train.vram_peak_bytes / GIB:.1f} GiB, "
            f"{plan.step_seconds_estimate:.2f} s/step on a real {name}")
    return case(kit, f"b {name} plan", run, cap_bytes=cap, baseline=baseline, note=note)


def _gpu_check(kit: Kit, argv: list[str]):
    """tools/gpu_check.py in this process: (exit code, rows)."""
    spec = importlib.util.spec_from_file_location("lowvram_tools_gpu_check", REPO / "tools" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules["lowvram_tools_gpu_check"] = gpu_check  # dataclasses look their module up there
    spec.loader.exec_module(gpu_check)
    threads = torch.get_num_threads()
    args = gpu_check.parse_args(argv)
    try:
        link = gpu_check.measure_link_gbps(args)
        rows = gpu_check.run(args)
        return gpu_check.report(args, rows, link), rows
    finally:
        torch.set_num_threads(threads)


def section_gpu_check(kit: Kit) -> None:
    argv = ["--layers", "4", "--steps", "1" if kit.simulate else "2"]
    if kit.calibrated is not None:
        argv += ["--profile", kit.results["calibrated_profile"]]
    if kit.simulate:
        argv.append("--simulate")
    kit.log("(c) every strategy on a few real-width blocks (tools/gpu_check.py " + " ".join(argv) + ")")
    code, rows = _gpu_check(kit, argv)
    kit.results["gpu_check"] = {"exit_code": code, "rows": [r.__dict__ for r in rows]}
    if code:
        kit.results.setdefault("failed_sections", []).append("c")
    kit.save()


def section_sanitizer(kit: Kit) -> None:
    """Block swap and streaming in a fresh process under PyTorch's CUDA stream sanitizer (CSAN). CSAN instruments
    CUDA streams only: simulated, the same two runs go through gpu_check in this process, without it."""
    argv = ["--layers", "3", "--steps", "1", "--strategies", "block_swap,streaming"]
    if kit.simulate:
        # the same two runs already ran in (c) on the simulated device, whose stand-ins catch use-after-offload
        rows = {r["strategy"]: r for r in kit.results.get("gpu_check", {}).get("rows", [])}
        ok = all(name in rows and not rows[name]["refused"] for name in ("block_swap", "streaming"))
        kit.log("(d) the sanitizer needs CUDA: on the simulated device block swap and streaming ran in (c) "
                f"({'no use-after-offload' if ok else 'FAILED'})")
        kit.results["sanitizer"] = {"ok": ok, "sanitizer": False, "races": []}
        kit.save()
        return
    kit.log("(d) block swap and streaming under TORCH_CUDA_SANITIZER=1")
    env = {**os.environ, "TORCH_CUDA_SANITIZER": "1"}
    r = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), *argv], env=env, capture_output=True,
                       text=True, timeout=300)
    races = [line for line in r.stderr.splitlines() if "CSAN" in line or "data race" in line]
    ok = r.returncode == 0 and not races
    kit.results["sanitizer"] = {"ok": ok, "exit_code": r.returncode, "sanitizer": True, "races": races[:20],
                                "stderr_tail": "" if ok else r.stderr[-2000:]}
    kit.save()
    kit.log(f"(d) {'no race reported' if ok else 'FAILED: ' + (races[0] if races else r.stderr[-300:])}")


def print_table(kit: Kit) -> None:
    unit, div = ("MiB", 2**20) if kit.simulate else ("GiB", GIB)
    tunit, tmul = ("us", 1e6) if kit.simulate else ("s", 1.0)
    header = (f"{'case':<22}{'peak ' + unit:>9}{'pred':>8}{'err':>7}{tunit + '/step':>9}{'pred':>8}{'calib':>8}"
              f"{'err':>7}{'H2D GB/s':>9}{'stall':>7}{'pred':>7}")
    print()
    print(f"acceptance on {kit.results['device']} ({kit.results['date']}, torch {torch.__version__})")
    print(header)
    print("-" * len(header))
    for row in kit.results["cases"]:
        if not row.get("ok"):
            print(f"{row['case']:<22}{row.get('error', 'failed')}")
            continue
        p, c = row["predicted"], row.get("calibrated")
        peak_err = row["peak_bytes"] / p["peak_bytes"] - 1 if p["peak_bytes"] else float("nan")
        ref = c["step_s"] if c else p["step_s"]
        step_err = row["step_s"] / ref - 1 if ref else float("nan")
        stall = row.get("stall_share")
        print(f"{row['case']:<22}{row['peak_bytes'] / div:>9.2f}{p['peak_bytes'] / div:>8.2f}{peak_err:>+7.1%}"
              f"{row['step_s'] * tmul:>9.3f}{p['step_s'] * tmul:>8.3f}"
              f"{(c['step_s'] * tmul if c else float('nan')):>8.3f}"
              f"{step_err:>+7.1%}{row['h2d_gbps']:>9.2f}"
              f"{('-' if stall is None else f'{stall:.0%}'):>7}{p['stall_share']:>7.0%}")
    print("err: measured / predicted - 1 (s/step against the calibrated prediction where there is one)")


def worst_errors(kit: Kit) -> tuple[float | None, float | None]:
    """Largest |measured / predicted - 1| of the peaks (cases and gpu_check strategies) and of the calibrated s/step."""
    peaks, steps = [], []
    for row in kit.results["cases"]:
        if row.get("ok"):
            peaks.append(row["peak_bytes"] / row["predicted"]["peak_bytes"] - 1)
            if "calibrated" in row:
                steps.append(row["step_s"] / row["calibrated"]["step_s"] - 1)
    for row in kit.results.get("gpu_check", {}).get("rows", []):
        if not row["refused"] and row["predicted_peak_bytes"]:
            peaks.append(row["peak_bytes"] / row["predicted_peak_bytes"] - 1)
    def worst(xs):
        return max(xs, key=abs) if xs else None

    return worst(peaks), worst(steps)


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:+.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulate", action="store_true", help="the simulated accelerator at tiny widths (no GPU)")
    parser.add_argument("--json", default=None, help="where the results go (default $OUT or output/)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip sections that would end past this")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per case (after one warm-up)")
    args = parser.parse_args(argv)
    if args.json is None:
        args.json = str(Path(os.environ.get("OUT") or REPO / "output") / "gpu_acceptance.json")
    if args.simulate:
        torch.set_num_threads(1)
        args.steps = 1
    kit = Kit(args)
    kit.log(f"device: {kit.results['device']}; profile for predictions: '{kit.machine.name}'; results: {kit.out}")
    if importlib.util.find_spec("bitsandbytes") is None:
        kit.log("bitsandbytes is not installed: nf4 cases are skipped")
    from lowvram.plan import Settings

    if kit.has_time("calibrate"):
        kit.guard("e", section_calibrate)
    plans = kit.guard("plans", section_plans)
    if plans is None:
        print_table(kit)
        return 1
    base = scaled(kit, Settings(precision="bf16"))
    a = None
    if kit.has_time("a"):
        a = kit.guard("a", case, "a no offload", base, note="full depth, bf16, random weights")
    if kit.has_time("b_3090"):
        kit.guard("b_3090", section_capped, "3090", *plans["3090"], a)
    low_plan, low_profile = plans["4070"]
    low = scaled(kit, settings_of(low_plan.settings))
    low_base = a
    if low.precision != base.precision and kit.has_time("base_low"):
        plain = replace(low, offload="none", blocks_to_swap=0, ramtorch_share=0.0)
        low_base = kit.guard("base_low", case, f"{low.precision} no offload", plain, note="the 4070 plan's baseline")
    if kit.has_time("b_4070"):
        kit.guard("b_4070", section_capped, "4070", low_plan, low_profile, low_base)
    if kit.has_time("c"):
        kit.guard("c", section_gpu_check)
    if kit.has_time("d"):
        kit.guard("d", section_sanitizer)
    print_table(kit)
    failed = [r["case"] for r in kit.results["cases"] if not r.get("ok")]
    failed += kit.results.get("failed_sections", [])
    if not kit.results.get("sanitizer", {}).get("ok", True):
        failed.append("sanitizer")
    kit.results["failed"] = failed
    kit.save()
    print(f"results written to {kit.out}")
    print(f"acceptance_failed={','.join(failed) or 'none'}")
    # the goals: every peak within 5% of its prediction, calibrated s/step within 15%
    peak_err, step_err = worst_errors(kit)
    kit.results.update(worst_peak_error=peak_err, worst_calibrated_step_error=step_err)
    kit.save()
    print(f"worst_peak_error={_fmt(peak_err)} worst_calibrated_step_error={_fmt(step_err)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
