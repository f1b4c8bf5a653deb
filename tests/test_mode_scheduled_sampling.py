"""Scheduled sampling (rollout): the rolled-out input and the loss on hand-computed tiny cases, the loop's use of
it, bit-identical resume, its config keys and SimpleTuner mapping, and the planner's cost of it."""

from __future__ import annotations

import json

import pytest
import torch
from test_checkpoint_resume import tiny_samples, tiny_transformer  # tests/ is on sys.path (rootdir conftest)

from lowvram.config import load_config
from lowvram.errors import ConfigError, UsageError
from lowvram.method.modes import build_modes
from lowvram.method.modes.scheduled_sampling import ScheduledSampling, rollout
from lowvram.method.objective import FlowInputs, ObjectiveConfig, flow_loss


def one_token_inputs(x0: float, noise: float, sigma: float, audio_x0: float = 0.0, audio_noise: float = 1.0,
                     audio_sigma: float = 0.5, cond: float = 0.0) -> FlowInputs:  # fmt: skip
    """One sample, two video tokens (the first one clean when `cond`), one audio token, one channel each."""
    v0 = torch.tensor([[[x0], [x0]]])
    vn = torch.tensor([[[noise], [noise]]])
    a0, an = torch.tensor([[[audio_x0]]]), torch.tensor([[[audio_noise]]])
    mask = torch.tensor([[1.0 - cond, 1.0]])
    noisy = (1 - sigma) * v0 + sigma * vn
    noisy[:, 0] = cond * v0[:, 0] + (1 - cond) * noisy[:, 0]
    return FlowInputs(
        video_noisy=noisy,
        audio_noisy=(1 - audio_sigma) * a0 + audio_sigma * an,
        video_target=vn - v0,
        audio_target=an - a0,
        video_sigma=torch.tensor([sigma]),
        audio_sigma=torch.tensor([audio_sigma]),
        video_token_sigma=mask * sigma,
        video_loss_mask=mask,
        audio_loss_mask=torch.ones(1, 1),
        latent_frames=2,
        latent_height=1,
        latent_width=1,
        isolate_modalities=False,
        train_video=True,
        train_audio=True,
    )


class ConstantModel:
    """Predicts velocity `value` everywhere and records the σ it was asked at."""

    def __init__(self, value: float):
        self.value, self.calls = value, []

    def __call__(self, inputs: FlowInputs, *, inference: bool = False):
        self.calls.append((inputs.video_sigma[-1].item(), inputs.video_token_sigma.tolist(), inference))
        return torch.full_like(inputs.video_noisy, self.value), torch.full_like(inputs.audio_noisy, self.value)


def test_rollout_denoises_from_the_higher_sigma_with_the_models_own_velocity():
    # x0 = 1, noise = 3, σ = 0.5: on the schedule x = 2, target 2. Two steps of 0.1: start at σ 0.7 where
    # x = 1 + 0.7 * 2 = 2.4; the model says velocity 1: 0.7 -> 0.6 gives 2.3, 0.6 -> 0.5 gives 2.2.
    inputs = one_token_inputs(1.0, 3.0, 0.5, audio_x0=0.0, audio_noise=1.0, audio_sigma=0.5)
    model = ConstantModel(1.0)
    out = rollout(inputs, model, torch.tensor([True]), steps=2, sigma_step=0.1)
    assert out.video_noisy.flatten().tolist() == pytest.approx([2.2, 2.2])
    # audio: x0 0, noise 1, σ 0.5 -> start 0.7 (x 0.7), two steps of velocity 1 down by 0.2: 0.5
    assert out.audio_noisy.item() == pytest.approx(0.5)
    assert [round(c[0], 6) for c in model.calls] == [0.7, 0.6]
    assert all(c[2] for c in model.calls)  # run as at sampling time (eval: no dropout)
    # σ, target and masks of the training step are unchanged
    assert out.video_sigma.item() == 0.5 and torch.equal(out.video_target, inputs.video_target)
    # the loss is the flow loss of the rolled-out input against noise - x0: prediction 2.5 on target 2 -> 0.25
    pred_v = torch.full_like(out.video_noisy, 2.5)
    parts = flow_loss(pred_v, out.audio_target.clone(), out, ObjectiveConfig())
    assert parts.video.item() == pytest.approx(0.25) and parts.audio.item() == 0.0


def test_a_perfect_model_rolls_out_onto_the_schedule():
    # A model that predicts the true velocity brings the rollout back to the teacher-forced input.
    inputs = one_token_inputs(-0.5, 2.0, 0.3)
    target = inputs.video_target

    def oracle(inp, *, inference=False):
        return target.clone(), inp.audio_target.clone()

    out = rollout(inputs, oracle, torch.tensor([True]), steps=3, sigma_step=0.05)
    assert torch.allclose(out.video_noisy, inputs.video_noisy, atol=1e-6)
    assert torch.allclose(out.audio_noisy, inputs.audio_noisy, atol=1e-6)


def test_clean_first_frame_tokens_stay_clean_and_at_timestep_zero():
    inputs = one_token_inputs(1.0, 3.0, 0.5, cond=1.0)
    model = ConstantModel(1.0)
    out = rollout(inputs, model, torch.tensor([True]), steps=2, sigma_step=0.1)
    assert out.video_noisy[0, 0, 0].item() == 1.0  # the clean latent
    assert out.video_noisy[0, 1, 0].item() == pytest.approx(2.2)
    assert all(tok[0][0] == 0.0 for _, tok, _ in model.calls)  # its timestep stays 0 in every rollout call


def test_samples_not_drawn_keep_their_input_and_sigma_is_capped_at_one():
    a, b = one_token_inputs(1.0, 3.0, 0.5), one_token_inputs(0.0, 1.0, 0.95)
    both = FlowInputs(**{k: (torch.cat([getattr(a, k), getattr(b, k)]) if isinstance(getattr(a, k), torch.Tensor)
                             else getattr(a, k)) for k in a.__dataclass_fields__})  # fmt: skip
    model = ConstantModel(1.0)
    out = rollout(both, model, torch.tensor([False, True]), steps=1, sigma_step=0.2)
    assert torch.equal(out.video_noisy[0], both.video_noisy[0])
    # σ 0.95 starts at 1.0 (cap): x = 0 + 1 * 1 = 1, then one step of -0.05 with velocity 1: 0.95
    assert out.video_noisy[1, 0, 0].item() == pytest.approx(0.95)


def test_the_mode_draws_its_coins_from_the_training_generator():
    inputs = one_token_inputs(1.0, 3.0, 0.5)
    mode = ScheduledSampling(probability=0.5, steps=1, sigma_step=0.1)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    out1 = mode.prepare(inputs, ConstantModel(1.0), g1)
    out2 = mode.prepare(inputs, ConstantModel(1.0), g2)
    assert torch.equal(out1.video_noisy, out2.video_noisy)
    assert torch.equal(g1.get_state(), g2.get_state())
    never = ScheduledSampling(probability=0.0).prepare(inputs, ConstantModel(1.0), torch.Generator())
    assert never is inputs


# --------------------------------------------------------------------------------------------------------------------
# Config


def test_config_section_defaults_and_mode_built_only_when_enabled():
    cfg, _ = load_config(None, {"model.family": "tiny"})
    assert cfg.scheduled_sampling.enabled is False and build_modes(cfg) == ()
    cfg, _ = load_config(None, {"model.family": "tiny", "scheduled_sampling.enabled": True})
    (mode,) = build_modes(cfg)
    assert mode == ScheduledSampling(probability=0.5, steps=1, sigma_step=0.025)


def test_bad_values_are_refused_in_one_line(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[scheduled_sampling]\nenabled = true\nprobability = 1.5\n")
    with pytest.raises(ConfigError, match="scheduled_sampling.probability"):
        load_config(path)
    path.write_text("[scheduled_sampling]\nenable = true\n")
    with pytest.raises(ConfigError, match="did you mean 'scheduled_sampling.enabled'"):
        load_config(path)


def test_simpletuner_keys_map_to_the_section_and_say_how(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "model_family": "ltxvideo2",
                "scheduled_sampling_max_step_offset": 3,
                "scheduled_sampling_probability": 0.25,
                "scheduled_sampling_sampler": "unipc",
            }
        )
    )
    cfg, notes = load_config(path)
    ss = cfg.scheduled_sampling
    assert (ss.enabled, ss.steps, ss.probability, ss.sigma_step) == (True, 3, 0.25, 0.001)
    assert any("scheduled_sampling_max_step_offset" in n and "exactly 3" in n for n in notes)
    assert any("scheduled_sampling_sampler" in n for n in notes)
    path.write_text(json.dumps({"model_family": "ltxvideo2", "scheduled_sampling_max_step_offset": 0}))
    assert load_config(path)[0].scheduled_sampling.enabled is False


def test_several_gpus_are_refused_in_one_line():
    from lowvram.multi_gpu import check_distributed_supported

    cfg, _ = load_config(None, {"scheduled_sampling.enabled": True})
    with pytest.raises(UsageError, match="scheduled_sampling.enabled = true does not run on 2 GPUs"):
        check_distributed_supported(cfg, 2)


# --------------------------------------------------------------------------------------------------------------------
# In the loop


def _batches():
    from lowvram.train.batches import CachedBatches

    return CachedBatches(tiny_samples(3), batch_size=2, seed=7)


def _config(run_dir, resume=None, probability=1.0):
    from lowvram.config import RunConfig

    return RunConfig.model_validate(
        {
            "model": {"family": "tiny"},
            "lora": {"rank": 4, "dropout": 0.1},
            "optim": {"learning_rate": 1e-3},
            "train": {"batch_size": 2, "max_train_steps": 4, "seed": 7, "mixed_precision": "fp32"},
            "checkpoint": {"every_n_steps": 2, "resume": resume},
            "scheduled_sampling": {"enabled": True, "probability": probability, "steps": 2, "sigma_step": 0.05},
            "output": {"output_dir": str(run_dir)},
        }
    )


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_loop_rolls_out_before_each_step_and_resume_stays_bit_identical(tmp_path):
    from lowvram.train.loop import fit

    straight = tiny_transformer()
    calls = []
    straight.register_forward_pre_hook(lambda m, a: calls.append(torch.is_grad_enabled()))
    fit(_config(tmp_path / "a"), straight, _batches(), run_dir=tmp_path / "a")
    # probability 1: two no-grad rollout calls, then the training forward, per step
    assert calls == [False, False, True] * 4

    first = tiny_transformer()
    fit(_config(tmp_path / "b"), first, _batches(), run_dir=tmp_path / "b", stop_after=2)
    torch.manual_seed(999)
    resumed = tiny_transformer()
    fit(_config(tmp_path / "b", resume="latest"), resumed, _batches(), run_dir=tmp_path / "b")
    a, b = _lora(straight), _lora(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    plain = tiny_transformer()
    cfg = _config(tmp_path / "c").model_copy(deep=True)
    cfg.scheduled_sampling.enabled = False
    fit(cfg, plain, _batches(), run_dir=tmp_path / "c")
    c = _lora(plain)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the rollout changed what was trained


# --------------------------------------------------------------------------------------------------------------------
# The plan


SIM_CASES = {  # (strategy as the offload harness names it, blocks, streamed share)
    "no_offload": ("none", 4, 1.0),
    "streaming_all": ("streaming", 4, 1.0),
    "block_swap_all_but_one": ("block_swap_all_but_one", 4, 1.0),
}


def _tiny_rollout_config():
    from lowvram.config import apply_overrides
    from lowvram.offload.harness import tiny_plan_config

    return apply_overrides(tiny_plan_config("fp32"), {"scheduled_sampling.enabled": True})


def _simulated_rollout_peak(cfg, settings, blocks: int) -> int:
    """A real rollout step (the trainer's `rollout`, one no-grad forward) of the tiny model on the simulated device."""
    from lowvram.device import get_backend
    from lowvram.models.ltx2 import transformer_forward
    from lowvram.offload.harness import flow_inputs_on, planned_model_on

    sim = get_backend("sim")
    transformer, batch = planned_model_on(sim, cfg, settings, num_layers=blocks)
    with sim.session():
        sim.reset_counters()
        b = batch.video.shape[0]
        text, inputs = flow_inputs_on(sim, batch)

        def predict(inp, *, inference=False):
            return transformer_forward(
                transformer, video_tokens=inp.video_noisy, audio_tokens=inp.audio_noisy, text=text,
                video_sigma=inp.video_sigma, audio_sigma=inp.audio_sigma, video_token_sigma=inp.video_token_sigma,
                latent_frames=inp.latent_frames, latent_height=inp.latent_height, latent_width=inp.latent_width,
                fps=25.0,
            )  # fmt: skip

        rollout(inputs, predict, torch.ones(b, dtype=torch.bool), steps=2, sigma_step=0.05)
        return sim.stats().peak_bytes


@pytest.mark.parametrize("case", sorted(SIM_CASES))
def test_the_planned_rollout_peak_matches_the_simulated_device_within_5_percent(case, tmp_path_factory):
    from lowvram.offload.harness import plan_settings
    from lowvram.plan import predict_peak
    from lowvram.plan.budget import ROLLOUT_LABEL
    from lowvram.plan.measure import MeasureCache
    from lowvram.plan.plan import collect_measurements
    from lowvram.profiles import load_profile

    strategy, blocks, share = SIM_CASES[case]
    cache = tmp_path_factory.getbasetemp() / "rollout-plan-cache"
    cfg = _tiny_rollout_config()
    settings = plan_settings(strategy, "fp32", checkpointing=True, num_blocks=blocks, share=share)
    pred = predict_peak(cfg, load_profile("cpu"), settings, num_layers=blocks, cache_dir=cache)
    m = collect_measurements(cfg, load_profile("cpu"), MeasureCache(cache))
    acts = next(k for k in pred.components if k.startswith("activations"))
    # The same resident weights and buffers; the rollout's activations in place of the training step's.
    predicted = pred.step_bytes - pred.components[acts] - pred.components[ROLLOUT_LABEL] + m.rollout.peak_bytes
    # LoRA grads do not exist yet before the first backward (the budget's step includes them in its activations).
    measured = _simulated_rollout_peak(cfg, settings, blocks)
    assert abs(predicted - measured) / measured <= 0.05, (predicted, measured)


def test_the_plan_prices_the_rollout_in_time_and_memory(tmp_path):
    from lowvram.config import apply_overrides
    from lowvram.plan import plan_run
    from lowvram.plan.budget import ROLLOUT_LABEL
    from lowvram.profiles import load_profile

    plain = apply_overrides(_tiny_rollout_config(), {"scheduled_sampling.enabled": False})
    rolled = apply_overrides(plain, {"scheduled_sampling.enabled": True, "scheduled_sampling.probability": 1.0,
                                     "scheduled_sampling.steps": 2})  # fmt: skip
    profile = load_profile("4090")
    a = plan_run(plain, profile, choose=False, cache_dir=tmp_path)
    b = plan_run(rolled, profile, choose=False, cache_dir=tmp_path)
    assert ROLLOUT_LABEL in b.phases["train"].vram and ROLLOUT_LABEL not in a.phases["train"].vram
    assert b.measured["rollout_forwards_per_step"] == 2.0
    # two extra forwards of every block and the head, on top of the plain step
    from dataclasses import replace

    from lowvram.plan.budget import Settings, step_time
    from lowvram.plan.measure import MeasureCache
    from lowvram.plan.plan import collect_measurements

    m = collect_measurements(rolled, profile, MeasureCache(tmp_path))
    with_rollout, without = step_time(m, Settings(), profile), step_time(replace(m, rollout=None), Settings(), profile)
    step = m.step[True]
    rate = profile.bf16_tflops * 1e12 * 0.4
    expected = 2 * (step.flops["head"] + m.num_layers * step.flops["block_fwd"]) / rate
    assert with_rollout.seconds - without.seconds == pytest.approx(expected, rel=1e-9)
    assert any("scheduled sampling: 2.00 no-grad forwards" in line for line in b.explanation)
