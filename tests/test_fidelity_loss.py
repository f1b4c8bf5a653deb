"""Issue 12, item 4: the loss is the official trainer's (Lightricks/LTX-2 ltx-trainer flexible strategy
`_compute_modality_loss`): each sample's masked mean over its own tokens, then the mean over the batch. FSDP's rank
shares (train/distributed.py) add up to exactly that loss's gradient, with uneven and empty ranks.
"""

from dataclasses import replace

import pytest
import torch

from lowvram.method.objective import ObjectiveConfig, flow_loss, prepare_inputs
from lowvram.models.ltx2 import TextEmbeddings
from lowvram.train.distributed import DataParallel, DistEnv, rank_rows


def _inputs(b=2, f=2, hw=2, s_a=3, conditioned=(True, False), audio_present=None, seed=0):
    torch.manual_seed(seed)
    video, audio = torch.randn(b, f * hw, 2), torch.randn(b, s_a, 3)
    x = prepare_inputs(
        video,
        audio,
        latent_frames=f,
        latent_height=1,
        latent_width=hw,
        cfg=ObjectiveConfig(first_frame_conditioning_p=0.0),
        generator=torch.Generator().manual_seed(seed),
        audio_present=audio_present,
    )
    # Condition the chosen samples' first frame by hand (the masks are what the loss reads).
    mask = x.video_loss_mask.clone()
    for i, c in enumerate(conditioned):
        if c:
            mask[i, :hw] = 0
    return replace(x, video_loss_mask=mask)


def test_batch_of_two_with_one_conditioned_sample_is_the_mean_of_per_sample_means():
    x = _inputs()
    # Errors per video token (2 channels each, equal): sample 0 conditioned on its first 2 tokens.
    err = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 5.0]])
    video_pred = x.video_target + err.unsqueeze(-1)
    audio_pred = x.audio_target + torch.tensor([[2.0], [0.0]]).view(2, 1, 1)  # audio err² 4 and 0
    parts = flow_loss(video_pred, audio_pred, x, ObjectiveConfig())
    sample0 = (9 + 16) / 2  # its counted tokens only
    sample1 = (1 + 1 + 1 + 25) / 4
    assert parts.video.item() == pytest.approx((sample0 + sample1) / 2)  # 9.75
    assert parts.audio.item() == pytest.approx((4 + 0) / 2)
    assert parts.total.item() == pytest.approx(9.75 + 2.0)
    # Not the batch-wide masked mean (sum of counted err² / counted tokens) of earlier lowvram: 53 / 6.
    assert parts.video.item() != pytest.approx((9 + 16 + 1 + 1 + 1 + 25) / 6)


def test_a_clip_without_audio_contributes_zero_audio_loss_to_the_batch_mean():
    x = _inputs(conditioned=(False, False), audio_present=torch.tensor([True, False]))
    audio_pred = x.audio_target + 3.0
    parts = flow_loss(x.video_target, audio_pred, x, ObjectiveConfig())
    assert parts.audio.item() == pytest.approx((9.0 + 0.0) / 2)


def _text(b):
    return TextEmbeddings(video=torch.randn(b, 4, 16), audio=torch.randn(b, 4, 16), mask=torch.ones(b, 4))


@pytest.mark.parametrize(("batch", "world"), [(3, 2), (2, 2), (1, 2), (5, 3)])
def test_rank_shares_add_up_to_the_per_sample_loss_and_its_gradient(batch, world):
    from lowvram.train.distributed import rank_share

    conditioned = tuple(i % 2 == 0 for i in range(batch))
    x = _inputs(b=batch, conditioned=conditioned, audio_present=torch.tensor([i != 1 for i in range(batch)]))
    text = _text(batch)
    objective = ObjectiveConfig(audio_loss_weight=0.7)
    g = torch.Generator().manual_seed(4)
    v_pred = (x.video_target + torch.randn(x.video_target.shape, generator=g)).requires_grad_()
    a_pred = (x.audio_target + torch.randn(x.audio_target.shape, generator=g)).requires_grad_()

    want = flow_loss(v_pred, a_pred, x, objective)
    want_v, want_a = torch.autograd.grad(want.total, (v_pred, a_pred))

    def local_pred(rank):
        local = DataParallel(DistEnv(rank, world, rank)).take_rows(x, text)
        index = torch.tensor(rank_rows(batch, rank, world)[0])
        return v_pred.index_select(0, index), a_pred.index_select(0, index), local

    # Pass 1 records each rank's statistics; pass 2 hands every rank their sum (what all_reduce does).
    recorded = []
    for rank in range(world):
        v, a, local = local_pred(rank)
        rank_share(v, a, local, objective, world, lambda t: recorded.append(t.clone()))
    summed = torch.stack(recorded).sum(0)
    grads_v, grads_a = torch.zeros_like(v_pred), torch.zeros_like(a_pred)
    for rank in range(world):
        v, a, local = local_pred(rank)
        parts = rank_share(v, a, local, objective, world, lambda t: t.copy_(summed))
        assert parts.total.item() == pytest.approx(want.total.item(), rel=1e-6)
        assert parts.video.item() == pytest.approx(want.video.item(), rel=1e-6)
        assert parts.audio.item() == pytest.approx(want.audio.item(), rel=1e-6)
        gv, ga = torch.autograd.grad(parts.total, (v_pred, a_pred))
        grads_v += gv / world  # FSDP2 averages gradients over ranks
        grads_a += ga / world
    torch.testing.assert_close(grads_v, want_v, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grads_a, want_a, rtol=1e-6, atol=1e-8)
