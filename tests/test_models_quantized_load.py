"""Quantized checkpoint loads: `ltx2.load_components(precision=...)` streams the official single file or a diffusers
folder into quantized modules, bit for bit what load-then-quantize gives, without ever holding the unquantized model."""

from __future__ import annotations

import weakref

import pytest
import torch

from lowvram.errors import LowvramError
from lowvram.models import ltx2
from lowvram.models import ltx2 as ck
from lowvram.profiles import load_profile
from lowvram.quant import EXCLUDES, allocated_bytes, get_backend, quantize_model
from lowvram.quant.stream import SafetensorsSource
from lowvram.quant.tiny import run_transformer, text_encoder_hidden_states, transformer_inputs

BOTH = ("transformer", "text_encoder")
PRECISIONS = ["int8-quanto", "int8-torchao", "nf4-bnb", "fp8-torchao"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny family on disk twice: the official single file + Gemma folder, and a diffusers folder."""
    folder = tmp_path_factory.mktemp("tiny")
    single = ck.save_tiny_checkpoint(folder, seed=0)
    diffusers = folder / "diffusers"
    ck.save_diffusers_folder(ltx2.build_tiny_components(seed=0), diffusers)
    return {"single": (single, folder / "gemma"), "diffusers": (diffusers, None)}


def _load_then_quantize(checkpoint, gemma, precision):
    """The old path (bf16/fp32 load, then quantize in memory), the reference the streaming load must equal."""
    ref = ltx2.load_components(checkpoint, gemma, dtype=torch.float32, components=BOTH)
    for name in BOTH:
        quantize_model(getattr(ref, name), precision, EXCLUDES[name])
    return ref


def _assert_identical(a: torch.nn.Module, b: torch.nn.Module, precision: str) -> None:
    backend = get_backend(precision)
    modules_a, modules_b = dict(a.named_modules()), dict(b.named_modules())
    assert modules_a.keys() == modules_b.keys()
    quantized = 0
    for name, ma in modules_a.items():
        mb = modules_b[name]
        assert type(ma) is type(mb), name
        if backend.owns(ma):
            quantized += 1
            assert backend.owns(mb), name
            (pa, meta_a), (pb, meta_b) = backend.export(ma), backend.export(mb)
            assert meta_a == meta_b and pa.keys() == pb.keys(), name
            for part in pa:
                assert torch.equal(pa[part], pb[part]), f"{name}: {part}"
            if ma.bias is not None:
                assert torch.equal(ma.bias, mb.bias), f"{name}.bias"
            continue
        for pname, pa in ma.named_parameters(recurse=False):
            pb = getattr(mb, pname)
            assert pa.dtype == pb.dtype and torch.equal(pa, pb), f"{name}.{pname}"
            assert not pb.requires_grad
        for bname, ba in ma.named_buffers(recurse=False):
            bb = getattr(mb, bname)
            if type(ba) is torch.Tensor:  # quantized modules' helper buffers are compared through export
                assert torch.equal(ba, bb), f"{name}.{bname}"
    assert quantized > 0


@pytest.mark.parametrize("layout", ["single", "diffusers"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_streamed_quantized_load_equals_load_then_quantize(tiny, layout, precision):
    checkpoint, gemma = tiny[layout]
    ref = _load_then_quantize(checkpoint, gemma, precision)
    got = ltx2.load_components(
        checkpoint,
        gemma,
        dtype=torch.float32,
        components=BOTH,
        precision=precision,
        text_encoder_precision=precision,
    )
    for name in BOTH:
        _assert_identical(getattr(ref, name), getattr(got, name), precision)
        result = got.quant_loads[name]
        assert result.source == "checkpoint" and result.cache_status == "off"
        # Exactly the Linears the exclude list spares were quantized: none of proj_in/out, norms, embeddings, lm_head.
        assert set(result.quantized_modules) == {
            n for n, m in getattr(got, name).named_modules() if get_backend(precision).owns(m)
        }
    assert not any(
        n.startswith(("proj_in", "proj_out", "time_embed")) for n in got.quant_loads["transformer"].quantized_modules
    )
    te = got.text_encoder
    assert te.lm_head.weight is te.model.language_model.embed_tokens.weight  # the tie survives
    # In train mode: bitsandbytes' CPU eval path repacks nf4 weights and needs sizes the tiny model lacks.
    for model in (ref.transformer, got.transformer, ref.text_encoder, te):
        model.train()
    assert torch.equal(
        run_transformer(ref.transformer, transformer_inputs()), run_transformer(got.transformer, transformer_inputs())
    )
    assert torch.equal(text_encoder_hidden_states(ref.text_encoder), text_encoder_hidden_states(te))


def test_bf16_streamed_load_equals_bf16_load_then_quantize(tiny):
    """Training's dtype: Gemma3 is built as from_pretrained(dtype=bf16) builds it, so its computed buffers agree."""
    checkpoint, gemma = tiny["single"]
    ref = ltx2.load_components(checkpoint, gemma, dtype=torch.bfloat16, components=BOTH)
    for name in BOTH:
        quantize_model(getattr(ref, name), "int8-quanto", EXCLUDES[name])
    got = ltx2.load_components(
        checkpoint,
        gemma,
        dtype=torch.bfloat16,
        components=BOTH,
        precision="int8-quanto",
        text_encoder_precision="int8-quanto",
    )
    for name in BOTH:
        _assert_identical(getattr(ref, name), getattr(got, name), "int8-quanto")
    assert torch.equal(text_encoder_hidden_states(ref.text_encoder), text_encoder_hidden_states(got.text_encoder))


def test_unquantized_precisions_keep_the_plain_path(tiny):
    checkpoint, gemma = tiny["single"]
    got = ltx2.load_components(
        checkpoint, gemma, dtype=torch.float32, components=BOTH, precision="fp32", text_encoder_precision="no_change"
    )
    ref = ltx2.load_components(checkpoint, gemma, dtype=torch.float32, components=BOTH)
    assert got.quant_loads == {}
    for name in BOTH:
        sa, sb = getattr(ref, name).state_dict(), getattr(got, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_second_load_hits_the_quantized_cache(tiny, tmp_path, monkeypatch):
    checkpoint, gemma = tiny["single"]
    kwargs = dict(
        dtype=torch.float32,
        components=BOTH,
        precision="int8-torchao",
        text_encoder_precision="int8-quanto",
        quant_cache_dir=tmp_path / "qcache",
    )
    first = ltx2.load_components(checkpoint, gemma, **kwargs)
    assert {first.quant_loads[n].cache_status for n in BOTH} == {"written"}
    assert len(list((tmp_path / "qcache").glob("*.safetensors"))) == 2

    def no_quantizing(*args, **kw):
        raise AssertionError("a cache hit must not quantize")

    for precision in ("int8-torchao", "int8-quanto"):
        monkeypatch.setattr(type(get_backend(precision)), "_quantize_whole", no_quantizing)
    second = ltx2.load_components(checkpoint, gemma, **kwargs)
    for name, precision in (("transformer", "int8-torchao"), ("text_encoder", "int8-quanto")):
        result = second.quant_loads[name]
        assert result.source == "cache" and result.cache_status == "hit"
        assert result.cache_path == first.quant_loads[name].cache_path
        monkeypatch.undo()
        _assert_identical(getattr(first, name), getattr(second, name), precision)
    te = second.text_encoder
    assert te.lm_head.weight is te.model.language_model.embed_tokens.weight


def test_a_refused_precision_fails_before_the_checkpoint_is_opened(tiny, monkeypatch):
    checkpoint, gemma = tiny["single"]

    def opened(*args, **kwargs):
        raise AssertionError("the checkpoint was opened before the precision was checked")

    monkeypatch.setattr(ck, "open_checkpoint", opened)
    monkeypatch.setattr(SafetensorsSource, "__init__", opened)
    with pytest.raises(LowvramError, match="fp8-torchao .*'3090'") as err:
        ltx2.load_components(checkpoint, gemma, components=BOTH, precision="fp8-torchao", profile=load_profile("3090"))
    assert "\n" not in str(err.value)
    with pytest.raises(LowvramError, match="fp8-torchao"):
        ltx2.load_components(
            checkpoint,
            gemma,
            components=BOTH,
            precision="int8-quanto",
            text_encoder_precision="fp8-torchao",
            profile=load_profile("3090"),
        )


def test_lora_injects_on_a_streamed_quantized_transformer(tiny):
    from lowvram.method.lora import inject_lora, lora_layers

    checkpoint, _ = tiny["single"]
    for precision in ("int8-quanto", "nf4-bnb"):
        transformer = ltx2.load_components(
            checkpoint, dtype=torch.float32, components=("transformer",), precision=precision
        ).transformer
        names = inject_lora(transformer, rank=2)
        transformer.train()  # bitsandbytes' CPU eval path needs sizes the tiny model lacks
        assert names and lora_layers(transformer)
        out = run_transformer(transformer, transformer_inputs())
        out.square().mean().backward()
        trained = [n for n, p in transformer.named_parameters() if p.grad is not None]
        assert trained and all("lora_" in n for n in trained)


def _medium_diffusers_folder(folder, layers: int):
    """A diffusers-layout transformer whose blocks dominate its weights, as in the real 19B model (random fp32)."""
    config = {
        **ltx2.tiny_configs()["transformer"],
        "num_layers": layers,
        "attention_head_dim": 64,
        "audio_attention_head_dim": 32,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ltx2.build_component("transformer", config)
    parts = ltx2.LTX2Components(model, None, None, None, None, None, None)
    ck.save_diffusers_folder(parts, folder)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_streaming_never_holds_the_unquantized_transformer(tmp_path, monkeypatch):
    """Every tensor read from the file is tracked until freed: the peak of what is alive at once stays far below the
    unquantized transformer (load-then-quantize holds all of it), near what the final quantized model keeps."""
    total_bytes = _medium_diffusers_folder(tmp_path / "medium", layers=8)
    live = {"now": 0, "peak": 0, "largest": 0, "read": 0}
    original = SafetensorsSource._read

    def tracked(self, entry, begin, end):
        tensor = original(self, entry, begin, end)
        size = end - begin
        live["now"] += size
        live["peak"] = max(live["peak"], live["now"])
        live["largest"] = max(live["largest"], size)
        live["read"] += size
        # Storages keep their Python object while alive, so this fires when the last view (or Parameter) goes.
        weakref.finalize(tensor.untyped_storage(), _freed, live, size)
        return tensor

    monkeypatch.setattr(SafetensorsSource, "_read", tracked)
    got = ltx2.load_components(
        tmp_path / "medium", dtype=torch.float32, components=("transformer",), precision="int8-torchao"
    )
    kept_bytes = allocated_bytes(got.transformer)
    assert live["read"] == total_bytes  # every byte of the model went through the tracked reads, once
    # int8 weights + fp32 excluded layers: well under half of the fp32 model...
    assert kept_bytes < 0.45 * total_bytes
    # ...and the reads alive at any moment never exceed the unquantized tensors the model keeps plus one weight.
    assert live["peak"] < 0.25 * total_bytes
    assert live["peak"] <= (total_bytes - _quantized_weight_bytes(got)) + live["largest"]


def _quantized_weight_bytes(components) -> int:
    result = components.quant_loads["transformer"]
    model = components.transformer
    return sum(
        model.get_submodule(n).out_features * model.get_submodule(n).in_features * 4 for n in result.quantized_modules
    )


def _freed(live, size):
    live["now"] -= size
