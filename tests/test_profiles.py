import pytest

from lowvram.errors import UsageError
from lowvram.profiles import builtin_profile_names, load_profile

REQUIRED = {"7900xtx", "3090", "4090", "5090", "4070", "a100-40g", "a100-80g", "h100", "cpu"}


def test_required_profiles_exist_and_validate():
    assert REQUIRED <= set(builtin_profile_names())
    for name in REQUIRED:
        p = load_profile(name)
        assert p.name == name and p.usable_vram_bytes > 0 and p.h2d_pinned_gbps >= p.h2d_pageable_gbps


def test_every_figure_in_a_builtin_profile_names_its_source():
    from lowvram.profiles import profile_dirs

    for path in profile_dirs()[0].glob("*.toml"):
        for line in path.read_text().splitlines():
            if "=" in line and not line.startswith(("#", "description", "vendor", "[")):
                assert "#" in line, f"{path.name}: '{line}' has no source comment"


def test_amd_profile_refuses_what_rdna3_lacks():
    p = load_profile("7900xtx")
    assert p.vendor == "amd" and not p.supports.fp8 and not p.supports.bitsandbytes
    assert not load_profile("3090").supports.fp8 and load_profile("4090").supports.fp8


def test_unknown_profile_lists_valid_names():
    with pytest.raises(UsageError) as e:
        load_profile("3080")
    msg = str(e.value)
    assert "unknown profile '3080'" in msg and "3090" in msg and "7900xtx" in msg and "\n" not in msg


def test_custom_profile_path_and_malformed_fields(tmp_path):
    good = tmp_path / "mine.toml"
    text = load_profile("3090").model_dump()
    from lowvram.hardware import profile_to_toml

    good.write_text(profile_to_toml(load_profile("3090").model_copy(update={"name": "mine"}), "test"))
    assert load_profile(str(good)).vram_bytes == text["vram_bytes"]
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace("vram_bytes = 25769803776", 'vram_bytes = "lots"'))
    with pytest.raises(UsageError, match=r"bad.toml: field 'vram_bytes'"):
        load_profile(str(bad))
    broken = tmp_path / "broken.toml"
    broken.write_text("vendor = \n")
    with pytest.raises(UsageError, match=r"broken.toml: malformed TOML: .*line 1"):
        load_profile(str(broken))
    missing = tmp_path / "missing.toml"
    missing.write_text(good.read_text().replace("bf16_tflops", "#"))
    with pytest.raises(UsageError, match="field 'bf16_tflops': Field required"):
        load_profile(str(missing))
