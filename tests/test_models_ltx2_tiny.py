"""The tiny LTX-2 family member and the helpers every training path uses (text, latents, the transformer call)."""

import pytest
import torch

from lowvram.errors import LowvramError
from lowvram.models import ltx2


@pytest.fixture(scope="module")
def tiny():
    return ltx2.build_tiny_components(seed=0)


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_tiny_build_is_deterministic_per_seed_and_leaves_global_rng_alone(tiny):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    again = ltx2.build_tiny_components(seed=0)
    after = torch.rand(3)
    assert torch.equal(before, after)
    for name in ("transformer", "video_vae", "audio_vae", "vocoder", "text_encoder", "connectors"):
        a, b = _state(getattr(tiny, name)), _state(getattr(again, name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    other = ltx2.build_tiny_components(seed=1)
    w0 = tiny.transformer.proj_in.weight
    assert not torch.equal(w0, other.transformer.proj_in.weight)


def test_tiny_tokenizer_pads_left_and_knows_the_demo_words(tiny):
    tok = tiny.tokenizer
    captions = [
        "A red circle moves left across a black background.",
        "Two small blue squares bounce up and down; a 440 Hz tone plays.",
        "A yellow triangle spins clockwise in the center of the screen",
    ]
    enc = tok(captions, padding="max_length", max_length=32, return_tensors="pt")
    assert tok.unk_token_id not in enc.input_ids[enc.attention_mask.bool()].tolist()
    # Left padding: the mask is 0...0 1...1 and the first real token is <bos>.
    for row_ids, row_mask in zip(enc.input_ids, enc.attention_mask, strict=True):
        n = int(row_mask.sum())
        assert row_mask[-n:].all() and not row_mask[:-n].any()
        assert row_ids[-n] == tok.bos_token_id
        assert (row_ids[:-n] == tok.pad_token_id).all()


def test_encode_text_gives_both_connector_streams_and_refuses_bad_lengths(tiny):
    text = ltx2.encode_text(tiny, ["a red circle", "a green star falls slowly"], max_length=32)
    assert text.video.shape == (2, 32, 16) and text.audio.shape == (2, 32, 16)
    assert text.mask.shape == (2, 32)
    assert not torch.equal(text.video[0], text.video[1])
    with pytest.raises(LowvramError, match="multiple of the connectors' 4 registers: use 32"):
        ltx2.encode_text(tiny, ["a red circle"], max_length=30)


def test_encode_text_matches_the_diffusers_pipeline_prompt_path(tiny):
    from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline

    captions = ["a pink ring drifts right", "a white box"]
    pipe = LTX2Pipeline.__new__(LTX2Pipeline)  # only the prompt method is used; no scheduler needed
    pipe.tokenizer, pipe.text_encoder = tiny.tokenizer, tiny.text_encoder
    with torch.no_grad():
        ref_embeds, ref_mask = pipe._get_gemma_prompt_embeds(
            captions, max_sequence_length=32, device=torch.device("cpu"), dtype=torch.float32
        )
        ref_v, ref_a, ref_m = tiny.connectors(ref_embeds, ref_mask, padding_side="left")
    ours = ltx2.encode_text(tiny, captions, max_length=32)
    assert torch.equal(ours.video, ref_v) and torch.equal(ours.audio, ref_a) and torch.equal(ours.mask, ref_m)


def test_pack_and_normalize_match_diffusers_and_invert(tiny):
    from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline

    video = torch.randn(2, 8, 3, 2, 4)
    packed = ltx2.pack_video_latents(video)
    assert torch.equal(packed, LTX2Pipeline._pack_latents(video))
    assert torch.equal(ltx2.unpack_video_latents(packed, 3, 2, 4), video)

    audio = torch.randn(2, 2, 5, 2)
    packed_a = ltx2.pack_audio_latents(audio)
    assert packed_a.shape == (2, 5, 4)
    assert torch.equal(packed_a, LTX2Pipeline._pack_audio_latents(audio))
    assert torch.equal(ltx2.unpack_audio_latents(packed_a, 2), audio)

    vae = tiny.video_vae
    norm = ltx2.normalize_video_latents(video, vae)
    ref = LTX2Pipeline._normalize_latents(video, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    assert torch.equal(norm, ref) and not torch.equal(norm, video)
    torch.testing.assert_close(ltx2.denormalize_video_latents(norm, vae), video)

    avae = tiny.audio_vae
    norm_a = ltx2.normalize_audio_latents(packed_a, avae)
    assert torch.equal(norm_a, LTX2Pipeline._normalize_audio_latents(packed_a, avae.latents_mean, avae.latents_std))
    torch.testing.assert_close(ltx2.denormalize_audio_latents(norm_a, avae), packed_a)


def _inputs(tiny, b=2):
    g = torch.Generator().manual_seed(0)
    text = ltx2.encode_text(tiny, ["a red circle", "a blue square"][:b], max_length=32)
    return dict(
        video_tokens=torch.randn(b, 2 * 2 * 3, 8, generator=g),
        audio_tokens=torch.randn(b, 5, 4, generator=g),
        text=text,
        video_sigma=torch.tensor([0.3, 0.8])[:b],
        audio_sigma=torch.tensor([0.6, 0.1])[:b],
        latent_frames=2,
        latent_height=2,
        latent_width=3,
        fps=24.0,
    )


def test_transformer_forward_is_the_documented_ltx2_0_call(tiny):
    kw = _inputs(tiny)
    token_sigma = kw["video_sigma"][:, None].repeat(1, 12)
    token_sigma[:, :6] = 0.0  # first latent frame clean, as image-to-video conditioning does
    with torch.no_grad():
        v, a = ltx2.transformer_forward(tiny.transformer, video_token_sigma=token_sigma, **kw)
        ref_v, ref_a = tiny.transformer(
            hidden_states=kw["video_tokens"],
            audio_hidden_states=kw["audio_tokens"],
            encoder_hidden_states=kw["text"].video,
            audio_encoder_hidden_states=kw["text"].audio,
            encoder_attention_mask=kw["text"].mask,
            audio_encoder_attention_mask=kw["text"].mask,
            timestep=token_sigma * 1000,
            audio_timestep=kw["audio_sigma"] * 1000,
            sigma=kw["video_sigma"] * 1000,
            num_frames=2,
            height=2,
            width=3,
            fps=24.0,
            audio_num_frames=5,
            use_cross_timestep=False,
            return_dict=False,
        )
        plain_v, _ = ltx2.transformer_forward(tiny.transformer, **kw)
    assert v.shape == (2, 12, 8) and a.shape == (2, 5, 4)
    assert torch.equal(v, ref_v) and torch.equal(a, ref_a)
    assert not torch.equal(v, plain_v)  # per-token sigmas reach the model


def test_isolated_video_output_ignores_the_audio_dummy(tiny):
    kw = _inputs(tiny)
    with torch.no_grad():
        v1, _ = ltx2.transformer_forward(
            tiny.transformer, **{**kw, "audio_tokens": torch.zeros(2, 1, 4)}, isolate_modalities=True
        )
        v2, _ = ltx2.transformer_forward(
            tiny.transformer, **{**kw, "audio_tokens": torch.randn(2, 1, 4)}, isolate_modalities=True
        )
        v3, _ = ltx2.transformer_forward(tiny.transformer, **{**kw, "audio_tokens": torch.randn(2, 1, 4)})
    assert torch.equal(v1, v2)
    assert not torch.equal(v1, v3)


def test_transformer_forward_refuses_empty_modality_and_shape_mismatch(tiny):
    kw = _inputs(tiny)
    with pytest.raises(LowvramError, match="1-token dummy"):
        ltx2.transformer_forward(tiny.transformer, **{**kw, "audio_tokens": torch.zeros(2, 0, 4)})
    with pytest.raises(LowvramError, match="video tokens"):
        ltx2.transformer_forward(tiny.transformer, **{**kw, "latent_width": 4})
