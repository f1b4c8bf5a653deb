"""Bad input never crashes caching: each bad file is skipped with its reason in one summary (fatal with strict)."""

from __future__ import annotations

import av
import numpy as np
import pytest
from safetensors.torch import load_file

from lowvram.data.build import build_caches
from lowvram.data.spec import DataConfig, folder_dataset
from lowvram.data.synthetic import make_synthetic_dataset
from lowvram.errors import LowvramError
from lowvram.fsutil import TMP_PREFIX
from lowvram.models.ltx2 import TINY_MAX_TEXT_TOKENS, build_tiny_components
from lowvram.vae import VaeOptions

pytestmark = pytest.mark.bad_input


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_components(seed=0)


def audio_only_mp4(path):
    with av.open(str(path), "w", format="mp4") as f:
        s = f.add_stream("aac", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for p in s.encode(frame):
            f.mux(p)
        for p in s.encode():
            f.mux(p)


def late_truncated_mp4(path):
    """A clip whose index (moov first) promises 33 frames but whose data ends early: it passes probing and fails
    only when decoded, mid-way through caching."""
    from lowvram.data import media
    from lowvram.data.synthetic import _render_frames

    source = path.with_suffix(".full")
    with av.open(str(source), "w", format="mp4", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        for f in _render_frames(64, 64, 33, (200, 0, 0), "circle", "left to right"):
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = source.read_bytes()
    source.unlink()
    for cut in range(95, 50, -5):
        path.write_bytes(data[: len(data) * cut // 100])
        if media.probe(path, 25).frames >= 17:
            try:
                media.decode_video(path, fps=25, frames=17, width=64, height=64)
            except media.BadItem:
                return
    raise AssertionError("no cut point gives a clip that probes fine and fails to decode")


@pytest.fixture()
def messy(tmp_path):
    folder = tmp_path / "messy"
    make_synthetic_dataset(folder, n_clips=2)
    good = (folder / "clip_000.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(good[: len(good) // 3])
    (folder / "zero.mp4").write_bytes(b"")
    late_truncated_mp4(folder / "late_truncated.mp4")
    (folder / "garbage.mov").write_bytes(b"\x00garbage" * 500)
    audio_only_mp4(folder / "no_video.mp4")
    (folder / "no_caption.mp4").write_bytes(good)
    (folder / "empty_caption.mp4").write_bytes(good)
    (folder / "empty_caption.txt").write_text("  \n")
    for name in ("truncated", "late_truncated", "zero", "garbage", "no_video"):
        (folder / f"{name}.txt").write_text("a red circle")
    return folder


@pytest.mark.parametrize("vae_batch_size", [1, 3])
def test_every_bad_item_is_skipped_with_its_reason_and_good_ones_cached(tiny, messy, tmp_path, vae_batch_size):
    data = DataConfig((folder_dataset(messy, resolution=(64, 64), frames=17),))
    options = VaeOptions(batch_size=vae_batch_size)  # a bad clip inside a VAE batch must not sink its neighbours
    summary = build_caches(data, tiny, tmp_path / "cache", max_text_tokens=TINY_MAX_TEXT_TOKENS, vae_options=options)
    reasons = {s.path.name: s.reason for s in summary.skipped}
    assert sorted(i.latent_path.name.split("-")[0] for i in summary.items) == ["clip_000", "clip_001"]
    assert reasons["zero.mp4"] == "zero-byte file"
    assert reasons["garbage.mov"].startswith("cannot decode")
    assert reasons["no_video.mp4"] == "no video stream"
    assert reasons["no_caption.mp4"] == "missing caption file no_caption.txt"
    assert reasons["empty_caption.mp4"] == "empty caption file empty_caption.txt"
    assert "truncated.mp4" in reasons  # cut mid-stream: undecodable or too short, either way listed
    assert reasons["late_truncated.mp4"].startswith("cannot decode")  # found only while encoding, still skipped
    text = summary.format()
    assert all(f"{name}: {reason}" in text for name, reason in reasons.items())
    files = list((tmp_path / "cache").rglob("*"))
    assert not [f for f in files if f.name.startswith(TMP_PREFIX)]
    for f in files:
        if f.suffix == ".safetensors":
            load_file(str(f))


def test_strict_makes_the_first_bad_item_fatal_in_one_line(tiny, messy, tmp_path):
    data = DataConfig((folder_dataset(messy, resolution=(64, 64), frames=17),))
    with pytest.raises(LowvramError, match=r"bad dataset item .*: .*\(and \d+ more\); fix or remove it") as err:
        build_caches(data, tiny, tmp_path / "cache", max_text_tokens=TINY_MAX_TEXT_TOKENS, strict=True)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache" / "latents").exists()


def test_unreadable_folder_is_reported_not_raised_as_a_traceback(tiny, tmp_path):
    missing = tmp_path / "nope"
    data = DataConfig((folder_dataset(missing, resolution=(64, 64)),))
    with pytest.raises(LowvramError, match="no usable dataset items .*cannot read folder"):
        build_caches(data, tiny, tmp_path / "cache", max_text_tokens=TINY_MAX_TEXT_TOKENS)
    notdir = tmp_path / "file.txt"
    notdir.write_text("x")
    good = tmp_path / "good"
    make_synthetic_dataset(good, n_clips=1)
    data = DataConfig((folder_dataset(notdir, resolution=(64, 64)), folder_dataset(good, resolution=(64, 64))))
    summary = build_caches(data, tiny, tmp_path / "cache", max_text_tokens=TINY_MAX_TEXT_TOKENS)
    assert len(summary.items) == 1 and summary.skipped[0].path == notdir
    assert summary.skipped[0].reason.startswith("cannot read folder")
