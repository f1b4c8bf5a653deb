"""Issue 12, item 2: σ is drawn exactly as the official LTX-2 trainer draws it at every real clip size (no cap at
4096 tokens), and stays finite for any token count.

`official_sigmas` restates the sampler of Lightricks/LTX-2 packages/ltx-trainer/src/ltx_trainer/timestep_samplers.py
(`ShiftedLogitNormalTimestepSampler.sample`, main at 400fd31) step for step, with a generator instead of the global
RNG: the shift is the line through (1024, 0.95) and (4096, 2.05) with no cap.
"""

import pytest
import torch

from lowvram.method.objective import ObjectiveConfig, sample_sigmas


def official_sigmas(batch: int, seq_len: int, g: torch.Generator, std=1.0, eps=1e-3, uniform_prob=0.1):
    m = (2.05 - 0.95) / (4096 - 1024)
    mu = m * seq_len + (0.95 - m * 1024)
    normal = torch.randn((batch,), generator=g) * std + mu
    logit = torch.sigmoid(normal)
    p999 = torch.sigmoid(torch.tensor(mu + 3.0902 * std))
    p005 = torch.sigmoid(torch.tensor(mu + -2.5758 * std))
    raw = (logit - p005) / (p999 - p005)
    stretched = torch.clamp(torch.where(raw >= eps, raw, 2 * eps - raw), 0, 1)
    uniform = (1 - eps) * torch.rand((batch,), generator=g) + eps
    prob = torch.rand((batch,), generator=g)
    return torch.where(prob > uniform_prob, stretched, uniform)


def real_clip_token_counts() -> list[int]:
    """Video token counts of LTX-2 clips (frames 8k+1, sides multiples of 32) between 126 and 24576 tokens."""
    sides = [(w, h) for w in range(192, 1601, 64) for h in range(192, 1025, 64)] + [(832, 480), (960, 544), (1280, 704)]
    counts = {((f - 1) // 8 + 1) * (w // 32) * (h // 32) for w, h in sides for f in range(17, 258, 8)}
    return sorted({126, 24576} | {n for n in counts if 126 <= n <= 24576})


def test_sigma_equals_the_official_sampler_at_every_real_clip_size():
    sizes = real_clip_token_counts()
    assert sizes[0] == 126 and sizes[-1] == 24576 and len(sizes) > 300
    cfg = ObjectiveConfig()
    for n in sizes:
        ours = sample_sigmas(64, n, cfg, torch.Generator().manual_seed(n))
        theirs = official_sigmas(64, n, torch.Generator().manual_seed(n))
        assert torch.equal(ours, theirs), n


@pytest.mark.parametrize(("tokens", "median"), [(6144, 0.861), (9216, 0.898)])
def test_median_sigma_above_4096_tokens_is_the_official_one_not_the_capped_one(tokens, median):
    # Medians the official sampler gives (issue 12: 0.861 at 6144 tokens, e.g. 768x512x121; 0.898 at 9216); a cap at
    # 4096 tokens gave 0.810 for both.
    s = sample_sigmas(200_000, tokens, ObjectiveConfig(), torch.Generator().manual_seed(0))
    assert s.median().item() == pytest.approx(median, abs=3e-3)


@pytest.mark.parametrize("tokens", [30_000, 45_000, 53_248, 100_000, 10**6, 10**9])
def test_sigma_is_finite_and_in_range_where_the_official_float32_arithmetic_breaks_down(tokens):
    s = sample_sigmas(10_000, tokens, ObjectiveConfig(), torch.Generator().manual_seed(1))
    assert torch.isfinite(s).all() and s.min() >= 0 and s.max() <= 1
    # Not collapsed to 1 (the official float32 form at 45000 tokens) nor NaN (from ~53000 on).
    assert 0.85 < s.median().item() < 0.95
    if tokens >= 53_248:
        assert torch.isnan(official_sigmas(16, tokens, torch.Generator().manual_seed(1))).any()


def test_the_exact_guard_and_the_official_form_agree_where_both_are_accurate():
    from lowvram.method.objective import EXACT_STRETCH_ABOVE_TOKENS, stretch_logit_normal, token_count_shift

    assert 24576 <= EXACT_STRETCH_ABOVE_TOKENS < 30_000  # every real clip size takes the official arithmetic

    mu = token_count_shift(8192)
    z = torch.randn(10_000, generator=torch.Generator().manual_seed(2)) + mu
    torch.testing.assert_close(stretch_logit_normal(z, mu, exact=True), stretch_logit_normal(z, mu), rtol=0, atol=2e-6)
