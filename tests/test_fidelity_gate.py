"""Issue 12, the a/v cross-attention gate: LTX-2.0 keeps its release semantics (each modality's own timestep,
diffusers `use_cross_timestep=False`), stated as data of the model family (configs/<family>/forward.json) that the
training forward reads from the loaded transformer, not a branch in the loop.
"""

import torch

from lowvram.models import ltx2, ltx2_checkpoint


def test_ltx_2_0_and_the_tiny_family_use_each_modalitys_own_timestep():
    assert ltx2_checkpoint.family_forward("ltx-2.0") == {"use_cross_timestep": False}
    assert ltx2_checkpoint.family_forward("ltx2") == {"use_cross_timestep": False}
    assert ltx2_checkpoint.family_forward("tiny") == {"use_cross_timestep": False}
    assert ltx2.uses_cross_timestep(ltx2.build_on_meta("transformer", family="tiny")) is False


def test_the_family_data_reaches_the_built_transformer(monkeypatch):
    monkeypatch.setattr(ltx2_checkpoint, "family_forward", lambda family: {"use_cross_timestep": True})
    assert ltx2.uses_cross_timestep(ltx2.build_on_meta("transformer", family="tiny")) is True


def _call(transformer, **direct):
    g = torch.Generator().manual_seed(0)
    video, audio = torch.randn(1, 6, 8, generator=g), torch.randn(1, 3, 4, generator=g)
    text = ltx2.TextEmbeddings(
        video=torch.randn(1, 8, 16, generator=g), audio=torch.randn(1, 8, 16, generator=g), mask=torch.ones(1, 8)
    )
    vs, as_ = torch.tensor([0.2]), torch.tensor([0.9])
    with torch.no_grad():
        if direct:
            return transformer(
                hidden_states=video,
                audio_hidden_states=audio,
                encoder_hidden_states=text.video,
                audio_encoder_hidden_states=text.audio,
                encoder_attention_mask=text.mask,
                audio_encoder_attention_mask=text.mask,
                timestep=vs.view(1, 1).expand(1, 6) * 1000.0,
                audio_timestep=as_ * 1000.0,
                sigma=vs * 1000.0,
                audio_sigma=as_ * 1000.0,
                num_frames=1,
                height=2,
                width=3,
                fps=24.0,
                audio_num_frames=3,
                return_dict=False,
                **direct,
            )
        return ltx2.transformer_forward(
            transformer,
            video_tokens=video,
            audio_tokens=audio,
            text=text,
            video_sigma=vs,
            audio_sigma=as_,
            latent_frames=1,
            latent_height=2,
            latent_width=3,
            fps=24.0,
        )


def test_the_training_forward_passes_the_transformers_own_semantics():
    t = ltx2.build_tiny_components(seed=0).transformer
    release = _call(t)
    for ours, theirs in zip(release, _call(t, use_cross_timestep=False), strict=True):
        assert torch.equal(ours, theirs)
    setattr(t, ltx2.CROSS_TIMESTEP_ATTR, True)  # what a family with forward.json use_cross_timestep=true records
    cross = _call(t)
    for ours, theirs in zip(cross, _call(t, use_cross_timestep=True), strict=True):
        assert torch.equal(ours, theirs)
    assert not torch.allclose(cross[0], release[0])
