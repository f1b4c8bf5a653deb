"""Streaming load: a meta skeleton filled tensor by tensor from safetensors, Linears quantized as they arrive."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lowvram.errors import LowvramError
from lowvram.quant import (
    GEMMA3_EXCLUDE,
    LTX2_TRANSFORMER_EXCLUDE,
    Precision,
    SafetensorsSource,
    allocated_bytes,
    build_empty,
    load_quantized,
    predicted_module_bytes,
    quantize_model,
)
from lowvram.quant.tiny import (
    run_transformer,
    text_encoder_hidden_states,
    tiny_text_encoder,
    tiny_text_encoder_factory,
    tiny_transformer,
    tiny_transformer_factory,
    transformer_inputs,
)

QUANTIZED = [p for p in Precision if p.quantized]


class Toy(nn.Module):
    """Tied embedding/head, a norm, a computed non-persistent buffer, Linears with and without bias."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 64)
        self.up = nn.Linear(64, 192)
        self.norm = nn.LayerNorm(192)
        self.down = nn.Linear(192, 64, bias=False)
        self.head = nn.Linear(64, 11, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 64), persistent=False)

    def forward(self, ids):
        h = self.embed(ids) * self.scale
        return self.head(self.down(self.norm(self.up(h))))


IDS = torch.tensor([[1, 4, 9, 2]])


@pytest.fixture
def toy_checkpoint(tmp_path):
    torch.manual_seed(0)
    reference = Toy().requires_grad_(False)
    path = tmp_path / "toy.safetensors"
    # On disk with a prefix, as official checkpoints name keys differently from the model.
    save_file({f"net.{k}": v for k, v in reference.state_dict().items() if k != "head.weight"}, path)
    return reference, path


def _strip(key: str) -> str:
    return key.removeprefix("net.")


def test_build_empty_puts_parameters_on_meta_and_keeps_buffers():
    model = build_empty(Toy)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.scale, torch.linspace(0.5, 1.5, 64))


def test_unquantized_streaming_load_reproduces_the_model_exactly(toy_checkpoint):
    reference, path = toy_checkpoint
    model = build_empty(Toy)
    result = load_quantized(model, path, "fp32", key_map=_strip)
    assert result.source == "checkpoint" and result.quantized_modules == ()
    assert torch.equal(model(IDS), reference(IDS))
    assert model.head.weight is model.embed.weight  # tie survives, loaded once
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("precision", QUANTIZED, ids=lambda p: p.value)
def test_streaming_quantization_equals_quantizing_in_memory(toy_checkpoint, precision):
    reference, path = toy_checkpoint
    in_memory = copy.deepcopy(reference)
    names = quantize_model(in_memory, precision, exclude=("head",))
    model = build_empty(Toy)
    # 3 KiB slices: the 192-row `up` weight is read and quantized in several row slices
    result = load_quantized(
        model, path, precision, dtype=torch.float32, exclude=("head",), key_map=_strip, chunk_bytes=3 * 1024
    )
    assert result.quantized_modules == tuple(sorted(names)) == ("down", "up")
    assert torch.equal(model(IDS), in_memory(IDS))
    assert result.weight_bytes == allocated_bytes(model) == allocated_bytes(in_memory)


def test_missing_weights_are_refused_before_reading(tmp_path):
    torch.manual_seed(0)
    state = {k: v for k, v in Toy().state_dict().items() if not k.startswith(("up.", "head."))}
    path = tmp_path / "partial.safetensors"
    save_file(state, path)
    with pytest.raises(LowvramError, match=r"lacks 2 weight\(s\).*up\.(weight|bias)"):
        load_quantized(build_empty(Toy), path, "int8-quanto")


def test_foreign_tensors_are_refused_when_strict_and_dropped_by_key_map(tmp_path):
    torch.manual_seed(0)
    state = {k: v for k, v in Toy().state_dict().items() if k != "head.weight"} | {"extra.weight": torch.zeros(2)}
    path = tmp_path / "extra.safetensors"
    save_file(state, path)
    with pytest.raises(LowvramError, match="does not use.*extra.weight"):
        load_quantized(build_empty(Toy), path, "fp32")
    load_quantized(build_empty(Toy), path, "fp32", key_map=lambda k: None if k.startswith("extra.") else k)
    load_quantized(build_empty(Toy), path, "fp32", strict=False)


def test_truncated_checkpoint_is_refused_in_one_line(toy_checkpoint, tmp_path):
    _, path = toy_checkpoint
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LowvramError, match="truncated") as err:
        load_quantized(build_empty(Toy), cut, "int8-quanto", key_map=_strip)
    assert "\n" not in str(err.value)


def test_rows_are_read_without_reading_the_whole_tensor(toy_checkpoint):
    reference, path = toy_checkpoint
    source = SafetensorsSource([path], _strip)
    try:
        assert torch.equal(source.get_rows("up.weight", 5, 9), reference.up.weight[5:9])
        assert torch.equal(source.get("norm.bias"), reference.norm.bias)
    finally:
        source.close()


@pytest.fixture(scope="module")
def tiny_transformer_checkpoint(tmp_path_factory):
    reference = tiny_transformer(3).requires_grad_(False)
    path = tmp_path_factory.mktemp("ltx2") / "transformer.safetensors"
    save_file(reference.state_dict(), path)
    return reference, path


def test_tiny_ltx2_transformer_streams_exactly_in_fp32(tiny_transformer_checkpoint):
    reference, path = tiny_transformer_checkpoint
    model = build_empty(tiny_transformer_factory())
    load_quantized(model, path, "fp32")
    inputs = transformer_inputs(0)
    with torch.no_grad():
        assert torch.equal(run_transformer(model, inputs), run_transformer(reference, inputs))


def test_tiny_ltx2_transformer_streams_quantized_like_in_memory(tiny_transformer_checkpoint):
    reference, path = tiny_transformer_checkpoint
    in_memory = copy.deepcopy(reference)
    quantize_model(in_memory, "int8-torchao", LTX2_TRANSFORMER_EXCLUDE)
    model = build_empty(tiny_transformer_factory())
    result = load_quantized(model, path, "int8-torchao", dtype=torch.float32, exclude=LTX2_TRANSFORMER_EXCLUDE)
    assert all(name.startswith("transformer_blocks.") for name in result.quantized_modules)
    assert not any("proj_in" in n or "time_embed" in n for n in result.quantized_modules)
    inputs = transformer_inputs(0)
    with torch.no_grad():
        assert torch.equal(run_transformer(model, inputs), run_transformer(in_memory, inputs))


def test_tiny_gemma3_streams_quantized_with_its_tie_and_buffers(tmp_path):
    reference = tiny_text_encoder(2).requires_grad_(False)
    path = tmp_path / "gemma.safetensors"
    save_file({k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}, path)
    model = build_empty(tiny_text_encoder_factory())
    result = load_quantized(model, path, "int8-quanto", dtype=torch.float32, exclude=GEMMA3_EXCLUDE)
    assert "lm_head" not in result.quantized_modules
    assert any(".mlp.down_proj" in n for n in result.quantized_modules)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    with torch.no_grad():
        expected = text_encoder_hidden_states(reference)
        error = (text_encoder_hidden_states(model) - expected).norm() / expected.norm()
    assert 0 < error < 0.03


@pytest.mark.parametrize("precision", list(Precision), ids=lambda p: p.value)
def test_planner_prediction_equals_the_loaded_tiny_transformer(tiny_transformer_checkpoint, precision):
    _, path = tiny_transformer_checkpoint
    skeleton = build_empty(tiny_transformer_factory())
    predicted = predicted_module_bytes(skeleton, precision, LTX2_TRANSFORMER_EXCLUDE, dtype=torch.bfloat16)
    block = skeleton.transformer_blocks[1]
    block_predicted = predicted_module_bytes(
        block, precision, LTX2_TRANSFORMER_EXCLUDE, dtype=torch.bfloat16, prefix="transformer_blocks.1."
    )
    result = load_quantized(skeleton, path, precision, dtype=torch.bfloat16, exclude=LTX2_TRANSFORMER_EXCLUDE)
    assert result.weight_bytes == predicted
    assert allocated_bytes(skeleton.transformer_blocks[1]) == block_predicted


def test_tied_linear_is_never_quantized(toy_checkpoint):
    _, path = toy_checkpoint
    model = build_empty(Toy)
    result = load_quantized(model, path, "int8-quanto", dtype=torch.float32, key_map=_strip)  # no exclude list
    assert "head" not in result.quantized_modules and model.head.weight is model.embed.weight


def test_a_state_dict_or_any_tensor_source_can_be_loaded(toy_checkpoint, tmp_path):
    reference, path = toy_checkpoint
    expected = copy.deepcopy(reference)
    quantize_model(expected, "int8-quanto", exclude=("head",))
    from_dict = build_empty(Toy)
    load_quantized(from_dict, reference.state_dict(), "int8-quanto", dtype=torch.float32, exclude=("head",))
    assert torch.equal(from_dict(IDS), expected(IDS))

    class Doubling:
        """A models-side reader that transforms tensors as it reads them (like an fp8 dequantizer would)."""

        def __init__(self):
            self.inner = SafetensorsSource([path], _strip)
            self.files = self.inner.files

        def keys(self):
            return self.inner.keys()

        def get(self, key):
            return self.inner.get(key) * 2

        def mapping(self):
            return self.inner.mapping()

    doubled = build_empty(Toy)
    first = load_quantized(doubled, Doubling(), "fp32", cache_dir=tmp_path / "cache")
    assert torch.equal(doubled.up.weight, reference.up.weight * 2)
    assert first.cache_status == "off"  # unquantized: nothing to cache
    quantized = build_empty(Toy)
    result = load_quantized(quantized, Doubling(), "int8-torchao", dtype=torch.float32, cache_dir=tmp_path / "cache")
    assert result.cache_status == "written" and result.quantized_modules == ("down", "up")
