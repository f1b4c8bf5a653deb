"""Validation adapters (issue 19): LoRA files stacked on the LoRA being trained for the validation render only.

An adapter changes the sampler's output exactly as the same delta merged into the weights would; the model being
trained is untouched after (and a run validating with adapters trains the same LoRA as one without); each adapter
set renders with its own guidance and steps into its own folder; bad adapter input is one line at startup.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from lowvram.config import apply_overrides, from_simpletuner, load_config
from lowvram.errors import ConfigError, UsageError

# Modules the tiny model's adapter touches: trained ones (to_q, to_v of every block), one the training LoRA leaves
# alone (a feed-forward Linear) and a top-level one (proj_in, official name `patchify_proj`).
ADAPTED = ("transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn1.to_v", "transformer_blocks.0.ff.net.2",
           "proj_in")  # fmt: skip


def _tiny_cfg(**overrides):
    from test_validation_run import _tiny_plan_cfg  # tests/ is on sys.path (rootdir conftest)

    return _tiny_plan_cfg(**{"validation.num_frames": 9, **overrides})


def _write_adapter(path, *, rank=2, seed=0, alpha_on=None, names=ADAPTED, fmt="comfy", bad_shape=False):
    """A LoRA file for the tiny transformer in the official (comfy) or diffusers naming; `alpha_on` gets an alpha."""
    from lowvram.method.lora import export_names
    from lowvram.models.ltx2 import build_tiny_components

    t = build_tiny_components(seed=0).transformer
    prefix = export_names(list(names), fmt)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in names:
        layer = t.get_submodule(name)
        fan_in = layer.in_features + (1 if bad_shape else 0)
        tensors[f"{prefix[name]}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * 0.3
        tensors[f"{prefix[name]}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.3
        if name == alpha_on:
            tensors[f"{prefix[name]}.alpha"] = torch.tensor(float(rank) / 2)
    save_file(tensors, str(path))
    return path


def _trained_model():
    """The tiny transformer with a LoRA whose B is non-zero (as after some training)."""
    from lowvram.method.lora import inject_lora
    from lowvram.models.ltx2 import build_tiny_components

    parts = build_tiny_components(seed=0)
    inject_lora(parts.transformer, rank=4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in parts.transformer.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return parts


def _sample(transformer, parts, cfg, *, steps=2, guidance=3.0):
    from lowvram.models.ltx2 import encode_text
    from lowvram.models.sampling import denoise
    from lowvram.train.validation import sample_shape_for

    text = encode_text(parts, ["a cat"], 8)
    negative = encode_text(parts, ["noise"], 8)
    shape = sample_shape_for(cfg, transformer, parts)
    transformer.eval()
    with torch.no_grad():
        return denoise(transformer, shape, text, negative, steps=steps, guidance=guidance,
                       generator=torch.Generator().manual_seed(7), device=torch.device("cpu"),
                       dtype=torch.float32)  # fmt: skip


def test_a_stacked_adapter_changes_the_output_as_its_merged_delta_and_leaves_the_model_untouched(tmp_path):
    from lowvram.method.lora import lora_state_dict
    from lowvram.models.adapter_files import adapter_sets
    from lowvram.train.validation_adapters import stacked

    file = _write_adapter(tmp_path / "camera.safetensors", alpha_on="proj_in")
    cfg = _tiny_cfg(**{"validation.adapters": [{"path": str(file), "scale": 0.7}]})
    (adapter_set,) = adapter_sets(cfg)
    assert adapter_set.label == "camera" and [a.scale for a in adapter_set.adapters] == [0.7]
    assert sorted(m.module for m in adapter_set.adapters[0].modules) == sorted(ADAPTED)

    parts = _trained_model()
    t = parts.transformer
    before = {k: v.clone() for k, v in t.state_dict().items()}
    modules_before = [n for n, _ in t.named_modules()]
    plain = _sample(t, parts, cfg)
    with stacked(t, adapter_set):
        adapted = _sample(t, parts, cfg)

    # The fused copy: W += scale * (alpha / rank) * B @ A on each base Linear (the trained LoRA stays on top).
    fused = copy.deepcopy(t)
    from safetensors.torch import load_file

    raw = load_file(str(file))
    with torch.no_grad():
        for m in adapter_set.adapters[0].modules:
            alpha = raw[m.alpha_key].item() / m.rank if m.alpha_key else 1.0
            layer = fused.get_submodule(m.module)
            layer = getattr(layer, "base_layer", layer)
            layer.weight += 0.7 * alpha * raw[m.b_key] @ raw[m.a_key]
    merged = _sample(fused, parts, cfg)
    for got, want, base in zip(adapted, merged, plain, strict=True):
        error = (got - want).abs().max().item()
        effect = (want - base).abs().max().item()
        assert error < 1e-5 and effect > 1e-2, (error, effect)  # equal up to fp32 rounding; the adapter matters

    # Nothing of the model being trained changed: every tensor bit-identical, no module added, no hook left.
    after = t.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [n for n, _ in t.named_modules()] == modules_before
    assert not any(m._forward_hooks for m in t.modules())
    assert lora_state_dict(t).keys() and all(".lora_" in k for k in lora_state_dict(t))
    for got, want in zip(_sample(t, parts, cfg), plain, strict=True):
        assert torch.equal(got, want)


def test_diffusers_names_and_a_folder_with_weight_name_load_too(tmp_path):
    from lowvram.models.adapter_files import adapter_sets

    folder = tmp_path / "repo"
    folder.mkdir()
    _write_adapter(folder / "a.safetensors", fmt="diffusers")
    _write_adapter(folder / "b.safetensors", seed=1)
    cfg = _tiny_cfg(**{"validation.adapter_sets": [
        {"label": "both", "adapters": [{"path": str(folder), "weight_name": "a.safetensors", "label": "a"},
                                       {"path": str(folder / "b.safetensors"), "scale": -0.5}]},
    ]})  # fmt: skip
    (s,) = adapter_sets(cfg)
    assert s.label == "both" and [a.label for a in s.adapters] == ["a", "b"]
    assert [sorted(m.module for m in a.modules) for a in s.adapters] == [sorted(ADAPTED)] * 2
    assert s.sidecar()["adapters"][1]["scale"] == -0.5


def test_an_adapter_in_the_hub_cache_is_read_offline(tmp_path):
    from lowvram.models.adapter_files import adapter_sets

    # huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/<file>}.
    commit = "a" * 40
    repo = tmp_path / "hub" / "models--someone--ltx2-camera-lora"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    _write_adapter(snapshot / "camera.safetensors")
    for path, weight in (("someone/ltx2-camera-lora", "camera.safetensors"),
                         ("someone/ltx2-camera-lora:camera.safetensors", None), ("someone/ltx2-camera-lora", None)):
        cfg = _tiny_cfg(**{"model.cache_dir": str(tmp_path / "hub"),
                           "validation.adapters": [{"path": path, "weight_name": weight}]})  # fmt: skip
        (s,) = adapter_sets(cfg)
        assert s.adapters[0].file == snapshot / "camera.safetensors" and s.label == "camera"
    cfg = _tiny_cfg(**{"model.cache_dir": str(tmp_path / "hub"),
                       "validation.adapters": [{"path": "someone/other-lora", "weight_name": "x.safetensors"}]})
    with pytest.raises(UsageError, match=r"someone/other-lora:x.safetensors is not in the hub cache .*download") as e:
        adapter_sets(cfg)
    assert "\n" not in str(e.value) and e.value.exit_code == 2


def _bad(tmp_path, **overrides):
    from lowvram.models.adapter_files import adapter_sets

    with pytest.raises(UsageError) as e:
        adapter_sets(_tiny_cfg(**overrides))
    assert "\n" not in str(e.value) and e.value.exit_code == 2
    return str(e.value)


@pytest.mark.bad_input
def test_each_bad_adapter_input_is_one_line(tmp_path):
    good = _write_adapter(tmp_path / "good.safetensors")
    folder = tmp_path / "folder"
    folder.mkdir()
    _write_adapter(folder / "one.safetensors")
    msg = _bad(tmp_path, **{"validation.adapters": [{"path": str(tmp_path / "missing.safetensors")}]})
    assert msg.startswith("validation.adapters[0].path: ") and "missing.safetensors does not exist" in msg
    msg = _bad(tmp_path, **{"validation.adapters": [{"path": str(folder), "weight_name": "two.safetensors"}]})
    assert msg.startswith("validation.adapters[0].weight_name: 'two.safetensors' is not in ")
    assert "one.safetensors" in msg
    # Another model's adapter: keys naming layers this transformer lacks, or shapes its layers do not take.
    other = tmp_path / "other.safetensors"
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(2, 8),
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(8, 2)}, str(other))
    msg = _bad(tmp_path, **{"validation.adapters": [{"path": str(other)}]})
    assert "does not have" in msg and "another model" in msg and "double_blocks.0.img_attn.qkv" in msg
    wide = tmp_path / "wide.safetensors"
    _write_adapter(wide, bad_shape=True)
    msg = _bad(tmp_path, **{"validation.adapters": [{"path": str(wide)}]})
    assert "does not fit this model's transformer" in msg and "lora_A" in msg
    msg = _bad(tmp_path, **{"validation.adapter_sets": [{"label": "x", "adapters": [{"path": str(good)}]},
                                                        {"label": "x"}]})  # fmt: skip
    assert msg.startswith("validation.adapter_sets[1]: its label 'x' is already validation.adapter_sets[0]'s")
    msg = _bad(tmp_path, **{"validation.adapters": [{"path": str(good)}, {"path": str(good), "scale": 0.5}]})
    assert "label 'good' is already" in msg
    msg = _bad(tmp_path, **{"validation.adapter_sets": [{"label": "../up"}]})
    assert "names the output folder" in msg
    pickle = tmp_path / "lora.bin"
    pickle.write_bytes(b"x")
    assert "safetensors only" in _bad(tmp_path, **{"validation.adapters": [{"path": str(pickle)}]})
    for value in ("strong", True, None):
        with pytest.raises(ConfigError, match=r"'validation.adapters.0.scale': ") as e:
            _tiny_cfg(**{"validation.adapters": [{"path": str(good), "scale": value}]})
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="not both"):
        _tiny_cfg(**{"validation.adapters": [{"path": str(good)}], "validation.adapter_sets": [{"label": "a"}]})


def test_a_block_index_past_the_models_depth_is_another_model(tmp_path):
    file = tmp_path / "deep.safetensors"
    save_file({"diffusion_model.transformer_blocks.7.attn1.to_q.lora_A.weight": torch.zeros(2, 32),
               "diffusion_model.transformer_blocks.7.attn1.to_q.lora_B.weight": torch.zeros(32, 2)}, str(file))
    assert "does not have" in _bad(tmp_path, **{"validation.adapters": [{"path": str(file)}]})


@pytest.mark.bad_input
def test_a_missing_adapter_stops_the_run_before_caching(tmp_path):
    from lowvram.demo import default_demo_config
    from lowvram.train import run as loop

    cfg = apply_overrides(default_demo_config(tmp_path / "run"), {
        "train.max_train_steps": 2, "validation.enabled": True,
        "validation.adapters": [{"path": str(tmp_path / "nowhere.safetensors")}],
    })  # fmt: skip
    threads = torch.get_num_threads()
    try:
        with pytest.raises(UsageError, match="nowhere.safetensors does not exist"):
            loop.run_train(cfg)
    finally:
        torch.set_num_threads(threads)
    assert not (tmp_path / "run" / "cache").exists()


def test_the_plan_budgets_the_adapter(tmp_path):
    from lowvram.plan import plan_run
    from lowvram.profiles import load_profile

    file = _write_adapter(tmp_path / "camera.safetensors", rank=8)
    profile = load_profile("cpu")
    plain = plan_run(_tiny_cfg(), profile, choose=False, cache_dir=tmp_path / "pc")
    cfg = _tiny_cfg(**{"validation.adapter_sets": [{"label": "fast", "adapters": [{"path": str(file)}],
                                                    "guidance": 1.0, "steps": 8}]})  # fmt: skip
    plan = plan_run(cfg, profile, choose=False, cache_dir=tmp_path / "pc")
    phase = plan.phases["validation"]
    assert phase.ram["validation adapter weights (largest set)"] == file.stat().st_size - _header_bytes(file)
    from lowvram.plan.measure import model_configs
    from lowvram.plan.validation import guidance_values, validation_shape

    assert guidance_values(cfg) == [1.0]  # the set's guidance: one row, no negative prompt in the sampler batch
    assert validation_shape(cfg, model_configs("tiny")).rows == 1
    below = _tiny_cfg(**{"validation.adapter_sets": [{"label": "a", "guidance": 0.5}, {"label": "b", "guidance": 1.0}]})
    assert validation_shape(below, model_configs("tiny")).rows == 2  # any set with guidance != 1 runs two rows
    assert phase.ram_peak_bytes > plain.phases["validation"].ram_peak_bytes
    bad = _tiny_cfg(**{"validation.adapters": [{"path": str(tmp_path / "gone.safetensors")}]})
    with pytest.raises(UsageError, match="gone.safetensors does not exist"):
        plan_run(bad, profile, choose=False, cache_dir=tmp_path / "pc")


def _header_bytes(file) -> int:
    with open(file, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _demo(out, **overrides):
    from lowvram.demo import default_demo_config

    return apply_overrides(default_demo_config(out), {"train.max_train_steps": 4, "checkpoint.every_n_steps": 0,
                                                      **overrides})  # fmt: skip


def test_adapter_sets_render_with_their_own_guidance_and_steps_and_the_lora_trains_the_same(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from lowvram.models import sampling
    from lowvram.train import run as loop

    file = _write_adapter(tmp_path / "distilled.safetensors")
    rows = []
    real = sampling.transformer_forward

    def counting(transformer, **kw):
        rows.append(kw["video_tokens"].shape[0])  # 2 rows: guidance (negative + prompt); 1: none
        return real(transformer, **kw)

    monkeypatch.setattr(sampling, "transformer_forward", counting)
    threads = torch.get_num_threads()
    try:
        assert loop.run_train(_demo(tmp_path / "plain")) == 0
        assert rows == []
        validated = _demo(tmp_path / "val", **{
            "validation.enabled": True, "validation.every_n_steps": 2, "validation.resolution": "64x64",
            "validation.num_frames": 9, "validation.num_inference_steps": 2, "validation.guidance": 3.0,
            "validation.negative_prompt": "noise", "validation.prompts": ["a red circle", "a blue square"],
            "validation.adapter_sets": [{"label": "lora"},
                                        {"label": "fast", "adapters": [{"path": str(file), "scale": 0.8}],
                                         "guidance": 1.0, "steps": 3}],
        })  # fmt: skip
        assert loop.run_train(validated) == 0
    finally:
        torch.set_num_threads(threads)
    plain = load_file(str(tmp_path / "plain" / "lora.safetensors"))
    val = load_file(str(tmp_path / "val" / "lora.safetensors"))
    assert plain.keys() == val.keys() and all(torch.equal(plain[k], val[k]) for k in plain)
    # Per validation (steps 2 and 4), two prompts each: "lora" 2 steps with guidance, then "fast" 3 without.
    assert rows == [2] * 4 + [1] * 6 + [2] * 4 + [1] * 6
    step = tmp_path / "val" / "validation" / "step-4"
    assert sorted(p.name for p in step.iterdir()) == ["fast", "lora"]
    assert sorted(p.name for p in (step / "fast").iterdir()) == ["00.json", "00.mp4", "01.json", "01.mp4"]
    assert json.loads((step / "fast" / "01.json").read_text())["prompt"] == "a blue square"
    fast = json.loads((step / "fast" / "00.json").read_text())
    assert fast["set"] == "fast" and fast["guidance"] == 1.0 and fast["num_inference_steps"] == 3
    assert [(a["label"], a["path"], a["scale"]) for a in fast["adapters"]] == [("distilled", str(file), 0.8)]
    lora = json.loads((step / "lora" / "00.json").read_text())
    assert lora["set"] == "lora" and lora["adapters"] == [] and lora["guidance"] == 3.0
    assert lora["num_inference_steps"] == 2


def test_simpletuner_adapter_keys_are_mapped(tmp_path):
    nested, notes = from_simpletuner({"validation_adapter_path": "org/lora:camera.safetensors",
                                      "validation_adapter_name": "cam", "validation_adapter_strength": 0.6})
    assert nested["validation"]["adapter_sets"] == [
        {"label": "cam", "adapters": [{"path": "org/lora:camera.safetensors", "scale": 0.6, "label": "cam"}]}
    ] and notes == []  # adapter_only (SimpleTuner's default): the adapter's render alone
    nested, _ = from_simpletuner({"validation_adapter_path": "a.safetensors", "validation_adapter_mode": "comparison"})
    assert [s.get("label") for s in nested["validation"]["adapter_sets"]] == ["lora", None]
    nested, _ = from_simpletuner({"validation_adapter_path": "a.safetensors", "validation_adapter_mode": "none"})
    assert "validation" not in nested
    runs = {"runs": [{"label": "style", "path": "s.safetensors", "strength": 0.5},
                     {"label": "combo", "adapters": [{"path": "c.safetensors", "adapter_name": "cam"}, "d.safetensors"],
                      "strength": 0.9}]}  # fmt: skip
    config = tmp_path / "adapters.json"
    config.write_text(json.dumps(runs))
    for value in (runs, json.dumps(runs), str(config)):
        nested, _ = from_simpletuner({"validation_adapter_config": value})
        assert nested["validation"]["adapter_sets"] == [
            {"label": "lora", "adapters": []},
            {"label": "style", "adapters": [{"path": "s.safetensors", "scale": 0.5}]},
            {"label": "combo", "adapters": [{"path": "c.safetensors", "scale": 0.9, "label": "cam"},
                                            {"path": "d.safetensors", "scale": 0.9}]},
        ]  # fmt: skip
    st = tmp_path / "config.json"
    st.write_text(json.dumps({"model_family": "ltxvideo2", "validation_adapter_config": runs}))
    cfg, notes = load_config(st)
    assert [s.label for s in cfg.validation.adapter_sets] == ["lora", "style", "combo"]
    assert not any("adapter" in n for n in notes)
    for bad, match in (({"validation_adapter_mode": "both", "validation_adapter_path": "a"}, "adapter_mode"),
                       ({"validation_adapter_path": "a", "validation_adapter_config": runs}, "exclude each other"),
                       ({"validation_adapter_config": [{"lable": "x", "path": "a"}]}, "run 0: unknown")):
        st.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=match) as e:
            load_config(st)
        assert "\n" not in str(e.value)


def test_the_readme_adapter_example_is_a_valid_config(tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"```\n(\[validation\]\n.*?)```", readme, re.S).group(1)
    (tmp_path / "run.toml").write_text(block)
    cfg, _ = load_config(tmp_path / "run.toml")
    sets = cfg.validation.adapter_sets
    assert [(s.label, s.guidance, s.steps, len(s.adapters)) for s in sets] == [("lora", None, None, 0),
                                                                                ("distilled", 1.0, 8, 1)]


def test_trackers_get_each_sets_clips_as_their_own_series(tmp_path):
    from lowvram.tracking import RunMirror

    class Recorder:
        def __init__(self):
            self.videos = []

        def log(self, metrics, step):
            pass

        def summary(self, metrics, step):
            pass

        def video(self, path, step, tag):
            self.videos.append((path.relative_to(tmp_path / "validation").as_posix(), step, tag))

    for rel in ("step-2/lora/00.mp4", "step-2/fast/00.mp4", "step-4/fast/01.mp4", "step-4/00.mp4", "step-6.mp4"):
        (tmp_path / "validation" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "validation" / rel).write_bytes(b"")
    recorder = Recorder()
    mirror = RunMirror(tmp_path, [recorder])
    mirror.sync()
    mirror.sync()  # each clip is sent once
    assert sorted(recorder.videos) == [("step-2/fast/00.mp4", 2, "validation/fast/00"),
                                       ("step-2/lora/00.mp4", 2, "validation/lora/00"),
                                       ("step-4/00.mp4", 4, "validation/00"),
                                       ("step-4/fast/01.mp4", 4, "validation/fast/01"),
                                       ("step-6.mp4", 6, "validation")]  # fmt: skip


def test_under_block_swap_the_adapter_streams_to_the_device_one_layer_call_at_a_time(tmp_path):
    """The simulated device, the transformer under block swap as in training: each denoising step copies every
    adapted layer's A and B once (no resident copy of the adapter), and the sampling peak grows by no more than the
    plan's per-call transient (`ResolvedSet.delta_bytes`)."""
    from types import SimpleNamespace

    from lowvram.device import get_backend
    from lowvram.models.adapter_files import adapter_sets
    from lowvram.models.ltx2 import TextEmbeddings
    from lowvram.models.sampling import SampleShape, denoise
    from lowvram.offload import apply_memory_plan
    from lowvram.offload.harness import tiny_lora_transformer
    from lowvram.plan import Settings
    from lowvram.train.validation_adapters import stacked

    file = _write_adapter(tmp_path / "camera.safetensors", rank=4)
    (adapter_set,) = adapter_sets(_tiny_cfg(**{"validation.adapters": [{"path": str(file)}]}))
    t = tiny_lora_transformer("fp32", num_layers=6, rank=4)
    sim = get_backend("sim")
    settings = Settings(precision="fp32", offload="block_swap", blocks_to_swap=3)
    memory = {k.split(".", 1)[1]: v for k, v in settings.dotted().items() if k.startswith("memory.")}
    apply_memory_plan(t, SimpleNamespace(**memory), sim)
    t.eval()
    shape = SampleShape(latent_frames=2, latent_height=2, latent_width=2, audio_tokens=4,
                        video_channels=t.config.in_channels, audio_channels=t.config.audio_in_channels, fps=25.0)
    g = torch.Generator().manual_seed(0)
    caption = t.config.caption_channels

    def text():
        return TextEmbeddings(video=torch.randn(1, 8, caption, generator=g),
                              audio=torch.randn(1, 8, caption, generator=g), mask=torch.ones(1, 8, dtype=torch.int64))

    prompt, negative = text(), text()
    steps = 2

    def sample():
        with sim.session(), torch.no_grad():
            on = [TextEmbeddings(video=sim.to_device(e.video), audio=sim.to_device(e.audio), mask=sim.to_device(e.mask))
                  for e in (prompt, negative)]  # fmt: skip
            sim.reset_counters()
            out = denoise(t, shape, on[0], on[1], steps=steps, guidance=3.0, generator=torch.Generator().manual_seed(1),
                          device=sim.device, dtype=torch.float32)  # fmt: skip
            stats = sim.stats()
        return out, stats

    plain, before = sample()
    with stacked(t, adapter_set, sim):
        adapted, after = sample()
    per_step = sum(m.rank * (m.in_features + m.out_features) * 4 for m in adapter_set.adapters[0].modules)
    assert after.h2d_bytes - before.h2d_bytes == steps * per_step
    tokens = max(shape.video_tokens, shape.audio_tokens, 8)
    print(f"\nadapter under block swap: h2d +{after.h2d_bytes - before.h2d_bytes} B ({steps} steps x {per_step} B), "
          f"peak +{after.peak_bytes - before.peak_bytes} B (bound {adapter_set.delta_bytes(2, tokens, 4)} B)")
    assert 0 <= after.peak_bytes - before.peak_bytes <= adapter_set.delta_bytes(2, tokens, 4)
    assert not torch.equal(plain[0], adapted[0])
