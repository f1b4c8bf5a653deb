"""A plan's explanation never contradicts itself: one usable-VRAM figure, ties broken by quality with the reason,
a runner-up faster than the choice says why it lost, and nothing "faster but does not fit" at the chosen speed."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from lowvram.config import load_config
from lowvram.plan import Settings, plan_run
from lowvram.plan.budget import GIB, PhaseBudget, StepTime
from lowvram.plan.plan import Candidate, _explain, _rank_key, _why_not
from lowvram.profiles import load_profile


@pytest.fixture(scope="module")
def cache_dir(request):
    return request.config.cache.mkdir("lowvram-plan-measurements")  # shared with test_plan_choose.py


def ltx2(batch: int = 1):
    cfg, _ = load_config(None, {"data.resolution": "832x480", "data.frames": 17, "train.batch_size": batch})
    return cfg


def candidate(precision: str, seconds: float, *, fits: bool = True, streamed: int = 0, **settings) -> Candidate:
    train = PhaseBudget("train", vram={"reserve": GIB, "weights": 12 * GIB}, ram={"process": 3 * GIB})
    time = StepTime(seconds, seconds, streamed / 24e9, 0.0, streamed)
    return Candidate(Settings(precision=precision, **settings), {"train": train}, time, 0 if fits else GIB, 0)


def test_at_equal_speed_int8_wins_over_fp8_because_fp8s_measured_error_is_10x():
    fp8, int8 = candidate("fp8-torchao", 1.93), candidate("int8-torchao", 1.93)
    assert min([fp8, int8], key=_rank_key) is int8
    why = _why_not(fp8, int8)
    assert "quality" in why and "2.5%" in why and "0.28%" in why


def test_a_lower_precision_only_a_little_faster_says_it_lost_on_quality():
    nf4, int8 = candidate("nf4-bnb", 5.20), candidate("int8-torchao", 5.25)
    assert min([nf4, int8], key=_rank_key) is int8
    assert _why_not(nf4, int8) == (
        "1% faster, but nf4-bnb (output error 7.4%) costs quality against int8-torchao (output error 0.28%): it "
        "must be over 36% faster to be chosen"
    )


def test_nothing_is_called_faster_but_not_fitting_at_exactly_the_chosen_speed():
    profile = load_profile("4070")
    chosen = candidate("bf16", 4.70, streamed=10 * 10**9, offload="block_swap", blocks_to_swap=30)
    same_speed = candidate("bf16", 4.70, fits=False, offload="none")  # copies nothing: ranked ahead on bytes
    faster = candidate("bf16", 4.10, fits=False, offload="ramtorch", ramtorch_share=1.0)
    no_ckpt = candidate("bf16", 9.0, fits=False, gradient_checkpointing=False)  # (skips the no-checkpointing line)
    lines = _explain(None, chosen, [chosen, same_speed, faster, no_ckpt], profile, 10 * GIB, 28 * GIB, False)
    faster_lines = [line for line in lines if line.startswith("would be faster")]
    assert faster_lines == [
        "would be faster but does not fit: bf16, stream 100% of block Linears, checkpointing (4.10 s/step): needs "
        "12.0 GiB VRAM, 10.00 GiB usable"
    ]


def test_the_chosen_int8_over_fp8_on_the_4090_prints_why(cache_dir):
    plan = plan_run(ltx2(1), load_profile("4090"), choose=True, cache_dir=cache_dir)
    fp8 = [r for r in plan.runners_up if r["settings"]["model.precision"] == "fp8-torchao"]
    assert plan.settings["model.precision"] != "fp8-torchao"
    assert fp8 and all(r["step_seconds"] > plan.step_seconds_estimate or "quality" in r["why_not"] for r in fp8)


@pytest.mark.parametrize("profile", ["4070", "4090", "3090"])
def test_every_runner_up_faster_than_the_choice_says_why_it_was_not_chosen(profile, cache_dir):
    plan = plan_run(ltx2(1), load_profile(profile), choose=True, cache_dir=cache_dir)
    for r in plan.runners_up:
        assert r["why_not"], r
        if round(r["step_seconds"], 2) < round(plan.step_seconds_estimate, 2):
            assert "faster, but" in r["why_not"] and "to be chosen" in r["why_not"], r
    for line in plan.explanation:
        m = re.match(r"would be faster but does not fit: .* \((\d+\.\d+) s/step\)", line)
        if m:
            assert float(m.group(1)) < round(plan.step_seconds_estimate, 2), line


@pytest.mark.parametrize("profile", ["4070", "3090"])
def test_one_usable_vram_figure_in_the_rendered_plan(profile, cache_dir):
    plan = plan_run(ltx2(2), load_profile(profile), choose=True, cache_dir=cache_dir)
    console = Console(record=True, width=260, color_system=None)
    plan.render(console)
    text = console.export_text()
    figures = set()
    for pattern in (
        r"VRAM[^\n]*?(?:usable|limit) (\d+\.\d+)",  # the table's peak rows and the heading
        r"usable VRAM (\d+\.\d+)",
        r"VRAM, (\d+\.\d+) GiB usable",  # what does not fit
        r"activations \((\d+\.\d+) GiB usable\)",  # without checkpointing
    ):
        figures |= set(re.findall(pattern, text))
    assert figures == {f"{plan.vram_usable_bytes / GIB:.2f}"}, text
