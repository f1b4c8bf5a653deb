"""CREPA: the term on a hand-computed tiny case, the total loss and its gradients, the hidden-state capture under
checkpointing and offload, the head in checkpoints (not in the exported LoRA), DINOv2 features in the latent cache,
config keys and SimpleTuner mapping, refusals, and the planner's cost of it against the simulated device."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from lowvram.config import apply_overrides, load_config
from lowvram.errors import ConfigError, UsageError
from lowvram.method.modes import build_modes
from lowvram.method.modes.crepa import Crepa
from lowvram.models.crepa import attach_head, crepa_term, frame_similarity

DINO_DIM = 12


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    """A tiny DINOv2 (transformers' Dinov2Model) saved as safetensors, as a user's local folder would hold it."""
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dinov2-tiny")
    config = Dinov2Config(hidden_size=DINO_DIM, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                          patch_size=4, image_size=16)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Dinov2Model(config).save_pretrained(folder, safe_serialization=True)
    return folder


# --------------------------------------------------------------------------------------------------------------------
# The term, by hand


def test_the_term_is_the_decay_weighted_cosine_over_adjacent_frames():
    # 3 frames, 1 token, 2 channels; magnitudes differ so the normalization is under test too.
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    h = torch.stack([2 * e1, 3 * e1, 5 * e2]).view(1, 3, 1, 2)
    y = torch.stack([7 * e1, 0.5 * e2, 4 * e2]).view(1, 3, 1, 2)
    w = math.exp(-1.0)
    # own frame: 1, 0, 1; f0 with y1: 0; f1 with y2: 0 and y0: 1; f2 with y1: 1
    assert frame_similarity(h, y, 1, 1.0)[0].tolist() == pytest.approx([1.0, w, 1.0 + w])
    assert crepa_term(h, y, 1, 1.0).item() == pytest.approx(-(2 + 2 * w) / 3)
    assert crepa_term(h, y, 0, 1.0).item() == pytest.approx(-2 / 3)  # per-frame REPA
    # d = 2, tau = 0.5: f0 with y2 (cos 0), f2 with y0 (cos 0), f1 has no neighbour at distance 2
    assert frame_similarity(h, y, 2, 0.5)[0].tolist() == pytest.approx([1.0, 0.0, 1.0])
    # a diagonal token of 45 degrees, averaged over 2 tokens of a frame and 2 samples
    h2 = torch.tensor([[1.0, 1.0], [1.0, 0.0]]).view(1, 1, 2, 2).expand(2, 1, 2, 2)
    y2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(1, 1, 2, 2).expand(2, 1, 2, 2)
    assert crepa_term(h2, y2, 1, 1.0).item() == pytest.approx(-(math.sqrt(0.5) + 1) / 2)


# --------------------------------------------------------------------------------------------------------------------
# In the step


def _tiny_transformer(num_layers: int = 2) -> torch.nn.Module:
    from lowvram.models.ltx2 import build_component, tiny_configs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = {**tiny_configs()["transformer"], "num_layers": num_layers}
        return build_component("transformer", cfg).eval().requires_grad_(False)


def _samples(n: int = 3, features: bool = True):
    from lowvram.train.batches import CachedSample

    g = torch.Generator().manual_seed(123)
    return [
        CachedSample(
            video=torch.randn(12, 8, generator=g), audio=torch.randn(5, 4, generator=g),
            text_video=torch.randn(8, 16, generator=g), text_audio=torch.randn(8, 16, generator=g),
            text_mask=torch.ones(8, dtype=torch.long), latent_frames=3, latent_height=2, latent_width=2, fps=25.0,
            crepa_features=torch.randn(3, 4, DINO_DIM, generator=g) if features else None,
        )  # fmt: skip
        for _ in range(n)
    ]


def _config(run_dir, dino_dir, resume=None, **crepa):
    from lowvram.config import RunConfig

    return RunConfig.model_validate(
        {
            "model": {"family": "tiny"},
            "lora": {"rank": 4},
            "optim": {"learning_rate": 1e-3},
            "train": {"batch_size": 2, "max_train_steps": 4, "seed": 7, "mixed_precision": "fp32"},
            "checkpoint": {"every_n_steps": 2, "resume": resume},
            "crepa": {"enabled": True, "block_index": 0, "encoder": str(dino_dir), **crepa},
            "output": {"output_dir": str(run_dir)},
        }
    )


def _context(transformer, cfg, checkpointing: bool = False):
    from lowvram.method.modes import attach_mode_modules
    from lowvram.method.objective import ObjectiveConfig
    from lowvram.train.loop import TrainContext, inject_lora

    torch.manual_seed(0)
    inject_lora(transformer, cfg)
    for name, p in transformer.named_parameters():
        if ".lora_B." in name:
            p.data.normal_(0.0, 0.05)  # non-zero B: the A weights get gradients too
    attach_mode_modules(transformer, cfg)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    return TrainContext(
        transformer=transformer, params=[p for p in transformer.parameters() if p.requires_grad], optimizer=None,
        scheduler=None, batches=None, objective=ObjectiveConfig.from_train_section(cfg.train),
        generator=torch.Generator().manual_seed(5), audio_channels=4, video_channels=8,
        modes=build_modes(cfg, transformer),
    )  # fmt: skip


@pytest.mark.parametrize("checkpointing", [False, True])
def test_total_is_flow_loss_plus_weight_times_the_term_and_its_grads_reach_the_head_and_the_lora(
    checkpointing, dino_dir, tmp_path
):
    from lowvram.train.batches import collate
    from lowvram.train.loop import forward_loss

    batch = collate(_samples(2))
    cfg = _config(tmp_path, dino_dir, weight=0.5, block_index=0)
    transformer = _tiny_transformer()
    ctx = _context(transformer, cfg, checkpointing)
    seen = []
    hook = transformer.transformer_blocks[0].register_forward_hook(lambda m, a, o: seen.append(o[0]))
    parts = forward_loss(ctx, batch)
    hook.remove()
    hidden = seen[0]  # the training forward's block-0 output (a recompute would come later, in backward)
    head = transformer.crepa_head
    projected = head(hidden).view(2, 3, 4, DINO_DIM)
    term = crepa_term(projected, batch.crepa_features, 1, 1.0)
    flow = parts.video + ctx.objective.audio_loss_weight * parts.audio
    assert parts.total.item() == pytest.approx(flow.item() + 0.5 * term.item(), rel=1e-6)

    # the term's gradient reaches the head and the LoRA up to block 0, and nothing in block 1 after it: the same
    # step with weight 0 (same init, same draws) differs from it only there
    parts.total.backward()
    other = _tiny_transformer()
    zero = _context(other, _config(tmp_path, dino_dir, weight=0.0, block_index=0), checkpointing)
    forward_loss(zero, batch).total.backward()
    a = {n: p.grad for n, p in transformer.named_parameters() if p.requires_grad}
    b = {n: p.grad for n, p in other.named_parameters() if p.requires_grad}
    head_grads = [a[n] for n in a if n.startswith("crepa_head.")]
    assert len(head_grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in head_grads)
    block0 = [n for n in a if n.startswith("transformer_blocks.0.") and "lora" in n]
    block1 = [n for n in a if n.startswith("transformer_blocks.1.") and "lora" in n]
    assert block0 and any(not torch.allclose(a[n], b[n], atol=1e-7) for n in block0)
    assert block1 and all(torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-9) for n in block1)


def test_weight_zero_leaves_the_flow_loss_and_a_missing_feature_cache_is_refused(dino_dir, tmp_path):
    from lowvram.errors import LowvramError
    from lowvram.train.batches import collate
    from lowvram.train.loop import forward_loss

    ctx = _context(_tiny_transformer(), _config(tmp_path, dino_dir, weight=0.0))
    parts = forward_loss(ctx, collate(_samples(2)))
    assert parts.total.item() == pytest.approx((parts.video + parts.audio).item(), rel=1e-6)
    with pytest.raises(LowvramError, match="no DINOv2 features"):
        forward_loss(ctx, collate(_samples(2, features=False)))


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_head_trains_is_checkpointed_resumes_bit_identically_and_is_not_exported(dino_dir, tmp_path):
    from safetensors import safe_open

    from lowvram.train.batches import CachedBatches
    from lowvram.train.checkpoint import list_checkpoints
    from lowvram.train.loop import export_lora, fit

    straight = _tiny_transformer()
    fit(_config(tmp_path / "a", dino_dir), straight, CachedBatches(_samples(), 2, 7), run_dir=tmp_path / "a")
    first = _tiny_transformer()
    fit(_config(tmp_path / "b", dino_dir), first, CachedBatches(_samples(), 2, 7), run_dir=tmp_path / "b",
        stop_after=2)  # fmt: skip
    ckpt = list_checkpoints(tmp_path / "b")[0]
    with safe_open(str(ckpt / "lora.safetensors"), framework="pt") as f:  # the trainable state
        assert any(k.startswith("crepa_head.") for k in f.keys())
    torch.manual_seed(999)
    resumed = _tiny_transformer()
    fit(_config(tmp_path / "b", dino_dir, resume="latest"), resumed, CachedBatches(_samples(), 2, 7),
        run_dir=tmp_path / "b")  # fmt: skip
    a, b = _lora(straight), _lora(resumed)
    assert any(k.startswith("crepa_head.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(0)
    fresh = attach_head(_tiny_transformer(), DINO_DIM)
    assert not torch.equal(fresh[1].weight, a["crepa_head.1.weight"].to(fresh[1].weight.dtype))  # it trained

    cfg = _config(tmp_path / "b", dino_dir)
    out = export_lora(resumed, tmp_path / "lora.safetensors", cfg)
    with safe_open(str(out), framework="pt") as f:
        assert f.keys() and not any("crepa" in k for k in f.keys())  # inference never runs the head


# --------------------------------------------------------------------------------------------------------------------
# The latent cache


def test_latent_entries_hold_dinov2_features_of_the_frames_on_the_latent_grid(dino_dir, tmp_path):
    from safetensors.torch import load_file

    from lowvram.data import media
    from lowvram.data.batches import load_batch
    from lowvram.data.build import build_caches
    from lowvram.data.crepa_features import CrepaFeatureEncoder, feature_bytes_per_item, load_encoder
    from lowvram.data.latent_cache import latent_cache_disk_bytes_per_item
    from lowvram.data.spec import DataConfig, folder_dataset
    from lowvram.data.synthetic import make_synthetic_dataset
    from lowvram.models.ltx2 import TINY_MAX_TEXT_TOKENS, build_tiny_components

    make_synthetic_dataset(tmp_path / "clips", n_clips=2, width=64, height=64, frames=17)
    data = DataConfig((folder_dataset(tmp_path / "clips", resolution=(64, 64), frames=17),))
    tiny = build_tiny_components(seed=0)
    plain = build_caches(data, tiny, tmp_path / "cache", max_text_tokens=TINY_MAX_TEXT_TOKENS)
    assert "crepa_features" not in load_file(str(plain.items[0].latent_path))

    encoder = CrepaFeatureEncoder.build(load_encoder(str(dino_dir)), image_size=16)
    parts = SimpleNamespace(**{k: getattr(tiny, k) for k in ("video_vae", "audio_vae", "text_encoder", "tokenizer",
                                                             "connectors")}, crepa_encoder=encoder)  # fmt: skip
    summary = build_caches(data, parts, tmp_path / "cache", max_text_tokens=TINY_MAX_TEXT_TOKENS)
    assert summary.latents_rebuilt == {"stale": 2}  # turning CREPA on re-keys the entries
    item = summary.items[0]
    stored = load_file(str(item.latent_path))
    assert stored["crepa_features"].shape == (3, 4, DINO_DIM)  # 3 latent frames x the 2x2 latent grid
    # latent frame k is pixel frame 0, 8, 16: each equals the features of that frame encoded alone
    from pathlib import Path

    from safetensors import safe_open

    with safe_open(str(item.latent_path), framework="pt") as f:
        source = Path(f.metadata()["source"])
    video = media.decode_video(source, fps=25, frames=17, width=64, height=64)
    for k, frame in enumerate((0, 8, 16)):
        alone = encoder.encode(video[None, :, frame : frame + 1], 1, 2, 2)[0, 0]
        assert torch.allclose(stored["crepa_features"][k], alone, atol=1e-5)
    assert load_batch(summary.items[:1]).crepa_features.shape == (1, 3, 4, DINO_DIM)
    predicted = latent_cache_disk_bytes_per_item(64, 64, 17, latent_channels=8, audio_channels=2,
                                                 audio_mel_latent_bins=2, dtype_bytes=4)  # fmt: skip
    predicted += feature_bytes_per_item(3, 2, 2, DINO_DIM, dtype_bytes=4)  # the plan's per-clip disk figure
    assert abs(item.latent_path.stat().st_size - predicted) <= 1024


@pytest.mark.bad_input
def test_a_missing_encoder_is_one_line_and_no_pickle_is_read(tmp_path):
    from lowvram.data.crepa_features import feature_dim, load_encoder
    from lowvram.errors import LowvramError

    with pytest.raises(LowvramError, match=r"crepa.encoder '.*nowhere'.*hf download"):
        feature_dim(str(tmp_path / "nowhere"))
    (tmp_path / "pickled").mkdir()
    from transformers import Dinov2Config

    Dinov2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "pickled")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(LowvramError, match="no DINOv2 safetensors"):
        load_encoder(str(tmp_path / "pickled"))


# --------------------------------------------------------------------------------------------------------------------
# Config, SimpleTuner, refusals


def test_config_defaults_are_simpletuners_and_the_mode_is_built_only_when_enabled():
    cfg, _ = load_config(None, {"model.family": "tiny"})
    c = cfg.crepa
    assert (c.enabled, c.block_index, c.weight, c.adjacent_distance, c.temporal_decay, c.image_size) == (
        False, 8, 0.5, 1, 1.0, 518)  # fmt: skip
    assert c.encoder == "facebook/dinov2-giant" and build_modes(cfg) == ()


@pytest.mark.bad_input
def test_bad_values_and_impossible_combinations_are_refused_in_one_line(tmp_path, dino_dir):
    path = tmp_path / "run.toml"
    path.write_text("[crepa]\nenabled = true\nadjacent_distance = -1\n")
    with pytest.raises(ConfigError, match="crepa.adjacent_distance"):
        load_config(path)
    path.write_text("[crepa]\nenabled = true\ntemporal_decay = 0\n")
    with pytest.raises(ConfigError, match="crepa.temporal_decay"):
        load_config(path)
    path.write_text('[train]\nmode = "audio"\n[crepa]\nenabled = true\n')
    with pytest.raises(ConfigError, match="crepa.enabled = true needs video"):
        load_config(path)

    from lowvram.method.modes.crepa import check_crepa
    from lowvram.plan.modes import check_crepa_for_run

    cfg, _ = load_config(None, {"crepa.enabled": True, "crepa.block_index": 48})
    with pytest.raises(ConfigError, match=r"crepa.block_index = 48 is out of range: LTX-2.0 has 48 blocks \(0..47\)"):
        check_crepa_for_run(cfg)
    routed = apply_overrides(cfg, {"crepa.block_index": 8, "train.tread_routes": [
        {"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]})  # fmt: skip
    with pytest.raises(ConfigError, match="lies in the TREAD route over blocks 2..46"):
        check_crepa(routed, 48)
    with pytest.raises(ConfigError, match="not a released DINOv2"):
        check_crepa_for_run(apply_overrides(cfg, {"crepa.block_index": 8, "crepa.encoder": "someone/vit"}))

    from lowvram.train.distributed import check_distributed_supported

    with pytest.raises(UsageError, match="crepa.enabled = true does not run on 2 GPUs"):
        check_distributed_supported(apply_overrides(cfg, {"crepa.block_index": 8}), 2)


def test_simpletuner_crepa_keys_map_to_the_section(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "model_family": "ltxvideo2", "crepa_enabled": True, "crepa_block_index": 10, "crepa_lambda": 0.3,
        "crepa_adjacent_distance": 2, "crepa_adjacent_tau": 0.5, "crepa_encoder": "dinov2_vits14",
        "crepa_encoder_image_size": 224, "crepa_cumulative_neighbors": True,
    }))  # fmt: skip
    cfg, notes = load_config(path)
    c = cfg.crepa
    assert (c.enabled, c.block_index, c.weight, c.adjacent_distance, c.temporal_decay) == (True, 10, 0.3, 2, 0.5)
    assert (c.encoder, c.image_size) == ("facebook/dinov2-small", 224)
    assert any("crepa_cumulative_neighbors" in n for n in notes)


# --------------------------------------------------------------------------------------------------------------------
# The plan


SIM_CASES = {  # (strategy as the offload harness names it, blocks)
    "no_offload": ("none", 4),
    "streaming_all": ("streaming", 4),
    "block_swap_all_but_one": ("block_swap_all_but_one", 4),
}


def _plan_config(dino_dir):
    from lowvram.offload.harness import tiny_plan_config

    return apply_overrides(tiny_plan_config("fp32"), {"crepa.enabled": True, "crepa.block_index": 1,
                                                      "crepa.encoder": str(dino_dir), "crepa.image_size": 16})


def _simulated_crepa_step(cfg, settings, blocks: int):
    """One LoRA step with the CREPA term (the trainer's mode: hook, head, term) on the simulated device: its peak,
    and the head's and the LoRA's gradients."""
    from lowvram.device import get_backend
    from lowvram.models.ltx2 import TextEmbeddings, transformer_forward
    from lowvram.offload import apply_memory_plan
    from lowvram.offload.harness import plan_batch, tiny_lora_transformer

    transformer = tiny_lora_transformer("fp32", num_layers=blocks, rank=cfg.lora.rank)
    torch.manual_seed(3)
    attach_head(transformer, DINO_DIM)
    sim = get_backend("sim")
    memory = {k.split(".", 1)[1]: v for k, v in settings.dotted().items() if k.startswith("memory.")}
    apply_memory_plan(transformer, SimpleNamespace(**memory), sim)
    mode = Crepa(transformer, block_index=cfg.crepa.block_index, weight=cfg.crepa.weight, adjacent_distance=1,
                 temporal_decay=1.0)  # fmt: skip
    batch = plan_batch(transformer, cfg)
    b, t, n = batch.video.shape[0], batch.frames, batch.height * batch.width
    features = torch.randn(b, t, n, DINO_DIM, generator=torch.Generator().manual_seed(4))
    for p in transformer.parameters():
        p.grad = None
    with sim.session():
        sim.reset_counters()
        d = sim.to_device
        text = TextEmbeddings(video=d(batch.text_video), audio=d(batch.text_audio), mask=d(batch.mask))
        mode.prepare(None, None, None)
        video_pred, audio_pred = transformer_forward(
            transformer, video_tokens=d(batch.video), audio_tokens=d(batch.audio), text=text,
            video_sigma=d(batch.sigma), audio_sigma=d(batch.sigma), latent_frames=t, latent_height=batch.height,
            latent_width=batch.width, fps=25.0,
        )  # fmt: skip
        flow = (video_pred - d(batch.target_video)).pow(2).mean() + (audio_pred - d(batch.target_audio)).pow(2).mean()
        from lowvram.method.objective import LossParts

        parts = LossParts(total=flow, video=flow.detach(), audio=flow.detach())
        inputs = SimpleNamespace(latent_frames=t, train_video=True)
        lb = SimpleNamespace(video=batch.video, crepa_features=d(features))
        total = mode.finish(parts, inputs, lb).total
        total.backward()
        peak = sim.stats().peak_bytes
    grads = {k: p.grad.detach().to("cpu").clone() for k, p in transformer.named_parameters() if p.grad is not None}
    return peak, grads


@pytest.fixture(scope="module")
def no_offload_grads(dino_dir):
    from lowvram.offload.harness import plan_settings

    cfg = _plan_config(dino_dir)
    return _simulated_crepa_step(cfg, plan_settings("none", "fp32", checkpointing=True, num_blocks=4), 4)[1]


@pytest.mark.parametrize("case", sorted(SIM_CASES))
def test_the_planned_step_peak_with_crepa_matches_the_simulated_device_within_5_percent(
    case, dino_dir, no_offload_grads, tmp_path_factory
):
    from lowvram.offload.harness import plan_settings
    from lowvram.plan import predict_peak
    from lowvram.plan.budget import CREPA_ACTS_LABEL, CREPA_HEAD_LABEL
    from lowvram.profiles import load_profile

    strategy, blocks = SIM_CASES[case]
    cache = tmp_path_factory.getbasetemp() / "crepa-plan-cache"
    cfg = _plan_config(dino_dir)
    settings = plan_settings(strategy, "fp32", checkpointing=True, num_blocks=blocks)
    pred = predict_peak(cfg, load_profile("cpu"), settings, num_layers=blocks, cache_dir=cache)
    assert pred.components[CREPA_HEAD_LABEL] > 0 and pred.components[CREPA_ACTS_LABEL] > 0
    measured, grads = _simulated_crepa_step(cfg, settings, blocks)
    print(f"\n{case}: predicted {pred.step_bytes} measured {measured} ({(pred.step_bytes - measured) / measured:+.2%})")
    assert abs(pred.step_bytes - measured) / measured <= 0.05, (pred.step_bytes, measured)
    # the hook and the term work under the offload strategy: the same gradients as without offload
    assert grads.keys() == no_offload_grads.keys() and any(k.startswith("crepa_head.") for k in grads)
    for k in grads:
        assert torch.allclose(grads[k], no_offload_grads[k], rtol=1e-4, atol=1e-6), k


def test_the_planned_term_peak_matches_the_term_run_on_the_simulated_device(dino_dir, tmp_path):
    """The CREPA component alone: the term's forward + backward (features on the device, head, grads) on `sim`."""
    from lowvram.device import get_backend
    from lowvram.plan.measure import MeasureCache
    from lowvram.plan.plan import collect_measurements
    from lowvram.profiles import load_profile

    cfg = _plan_config(dino_dir)
    m = collect_measurements(cfg, load_profile("cpu"), MeasureCache(tmp_path))
    sim = get_backend("sim")
    from lowvram.models.crepa import CrepaHead

    head = CrepaHead(16, DINO_DIM)
    head = head.to(sim.device) if hasattr(sim, "device") else head
    sim.place_module(head)
    hidden_cpu = torch.randn(1, 8, 16)
    with sim.session():
        hidden = sim.to_device(hidden_cpu).requires_grad_(True)
        sim.reset_counters()
        base = sim.stats().peak_bytes
        features = sim.to_device(torch.randn(1, 2, 4, DINO_DIM))
        out = head(hidden).view(1, 2, 4, DINO_DIM)
        crepa_term(out, features, 1, 1.0).backward()
        del out, features
        measured = sim.stats().peak_bytes - base
    print(f"\nCREPA term: predicted {m.crepa.head_peak_bytes} measured {measured}")
    assert abs(m.crepa.head_peak_bytes - measured) / measured <= 0.05, (m.crepa.head_peak_bytes, measured)


def test_the_plan_prices_crepa_in_every_phase_it_touches(dino_dir, tmp_path):
    from dataclasses import replace

    from lowvram.plan import plan_run
    from lowvram.plan.budget import CREPA_ACTS_LABEL, CREPA_HEAD_LABEL, Settings, step_time
    from lowvram.plan.measure import MeasureCache
    from lowvram.plan.plan import collect_measurements
    from lowvram.profiles import load_profile

    on = _plan_config(dino_dir)
    off = apply_overrides(on, {"crepa.enabled": False})
    profile = load_profile("4090")
    a = plan_run(off, profile, choose=False, cache_dir=tmp_path)
    b = plan_run(on, profile, choose=False, cache_dir=tmp_path)
    assert CREPA_HEAD_LABEL in b.phases["train"].vram and CREPA_HEAD_LABEL not in a.phases["train"].vram
    assert CREPA_ACTS_LABEL in b.phases["train"].vram
    m = collect_measurements(on, profile, MeasureCache(tmp_path))
    assert m.crepa.head_params == 2 * 16 + 16 * DINO_DIM + DINO_DIM  # LayerNorm(16) + Linear(16 -> 12)
    assert b.phases["train"].vram[CREPA_HEAD_LABEL] == 2 * m.crepa.head_params * 4  # fp32 weights + grads
    lat_a, lat_b = a.phases["latent_cache"], b.phases["latent_cache"]
    assert lat_b.disk_bytes_per_item - lat_a.disk_bytes_per_item == 2 * 4 * DINO_DIM * 2  # [F', H'W', D] bf16
    assert lat_b.vram["DINOv2 weights (CREPA)"] == m.crepa.encoder_params * 4 > 0  # this tiny run computes in fp32
    assert lat_b.vram["DINOv2 activations (CREPA)"] > 0
    assert b.measured["crepa_feature_bytes_per_item"] == m.crepa.feature_item_bytes
    with_head, without = step_time(m, Settings(), profile), step_time(replace(m, crepa=None), Settings(), profile)
    rate = profile.bf16_tflops * 1e12 * 0.4
    assert with_head.seconds - without.seconds == pytest.approx(m.crepa.head_flops / rate, rel=1e-9)
    assert m.crepa.head_flops > 0


def test_a_tiny_run_caches_the_features_with_dinov2_and_trains_the_head(dino_dir, tmp_path):
    """The whole run (lowvram train's path): DINOv2 loads in the latent-cache phase, the entries hold the features,
    the loop trains the head, the checkpoint holds it and the exported LoRA does not."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lowvram.data.build import read_index
    from lowvram.demo import default_demo_config
    from lowvram.train.checkpoint import list_checkpoints
    from lowvram.train.run import run_train

    threads = torch.get_num_threads()
    out = tmp_path / "out"
    cfg = apply_overrides(default_demo_config(out), {
        "train.max_train_steps": 2, "validation.enabled": False, "crepa.enabled": True, "crepa.block_index": 1,
        "crepa.encoder": str(dino_dir), "crepa.image_size": 16})  # fmt: skip
    try:
        assert run_train(cfg) == 0
    finally:
        torch.set_num_threads(threads)
    items = read_index(out / "cache")
    assert items and all(load_file(str(i.latent_path))["crepa_features"].shape[-1] == DINO_DIM for i in items)
    with safe_open(str(list_checkpoints(out)[-1] / "lora.safetensors"), framework="pt") as f:
        assert any(k.startswith("crepa_head.") for k in f.keys())
    with safe_open(str(out / "lora.safetensors"), framework="pt") as f:
        assert f.keys() and not any("crepa" in k for k in f.keys())


def test_with_ic_lora_reference_tokens_appended_the_term_aligns_the_clips_own_tokens_only():
    """IC-LoRA appends clean control tokens after the clip's (modes/ic_lora.py): CREPA aligns the first F'*H'*W'."""
    from lowvram.method.objective import LossParts

    transformer = _tiny_transformer()
    attach_head(transformer, DINO_DIM)
    mode = Crepa(transformer, block_index=0, weight=1.0, adjacent_distance=1, temporal_decay=1.0)
    g = torch.Generator().manual_seed(0)
    width = mode.head[1].in_features  # the block width the head projects from
    own = torch.randn(2, 3 * 4, width, generator=g)
    reference = torch.randn(2, 3 * 4, width, generator=g)
    features = torch.randn(2, 3, 4, DINO_DIM, generator=g)
    batch = SimpleNamespace(video=torch.zeros(1), crepa_features=features)
    inputs = SimpleNamespace(latent_frames=3, train_video=True)
    zero = LossParts(total=torch.tensor(0.0), video=torch.tensor(0.0), audio=torch.tensor(0.0))

    def term(hidden):
        mode.capture.hidden = hidden
        return mode.finish(zero, inputs, batch).total

    with torch.no_grad():
        alone = term(own)
        torch.testing.assert_close(term(torch.cat([own, reference], dim=1)), alone)
        assert alone == pytest.approx(crepa_term(mode.head(own).view(2, 3, 4, DINO_DIM), features, 1, 1.0).item())
