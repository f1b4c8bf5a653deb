"""CLI behaviour in real processes: exit codes, one-line errors, fast help, probe JSON on a machine without a GPU."""

import json

import pytest


def test_help_lists_every_command(cli):
    r = cli("--help")
    assert r.returncode == 0
    for command in ("probe", "plan", "train", "cache", "report", "profiles"):
        assert command in r.stdout


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, lowvram.cli; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.parametrize("command", ["probe", "plan", "train", "cache", "report", "profiles"])
def test_every_command_explains_its_options(cli, command):
    r = cli(command, "--help")
    assert r.returncode == 0 and "Usage:" in r.stdout


def test_profiles_table(cli):
    r = cli("profiles")
    assert r.returncode == 0 and "7900xtx" in r.stdout and "a100-80g" in r.stdout
    data = json.loads(cli("profiles", "--json").stdout)
    assert {p["name"] for p in data} >= {"3090", "4070", "cpu"}


def test_probe_json_on_cpu_machine(cli):
    r = cli("probe", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["gpus"] == [] and data["profile"] == "cpu"
    assert data["ram_total_bytes"] > data["ram_available_bytes"] > 0 and data["cpu_count"] >= 1


def test_probe_writes_profile_toml(cli, tmp_path):
    out = tmp_path / "mine.toml"
    r = cli("probe", "--write", str(out))
    assert r.returncode == 0, r.stderr
    assert "No GPU found" in r.stdout
    from lowvram.profiles import load_profile

    assert load_profile(str(out)).vendor == "cpu"


def test_unknown_profile_is_one_line_exit_2(cli):
    r = cli("plan", "--profile", "3080")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown profile '3080'" in lines[0] and "4090" in lines[0]
    assert "Traceback" not in r.stderr


def test_unknown_option_is_usage_error(cli):
    r = cli("plan", "--frobnicate")
    assert r.returncode == 2 and "No such option" in r.stderr


def test_bad_config_is_one_line_exit_2(cli, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[optim]\nlerning_rate = 1e-4\n")
    r = cli("plan", "--config", str(cfg), "--profile", "3090")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    expected = f"lowvram: error: {cfg}: unknown key 'optim.lerning_rate' (did you mean 'optim.learning_rate'?)"
    assert r.stderr.strip() == expected


def test_report_without_memory_file(cli, tmp_path):
    r = cli("report", str(tmp_path))
    assert r.returncode == 2 and "has no memory.jsonl" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cache_builds_the_caches_only_and_a_train_run_reuses_them(cli, tmp_path):
    out = tmp_path / "run"
    r = cli("cache", "--output-dir", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "cache" / "index.json").is_file() and not (out / "lora.safetensors").exists()
    phases = [line for line in (out / "memory.jsonl").read_text().splitlines() if '"type": "phase"' in line]
    assert ['"text_cache"' in phases[0], '"latent_cache"' in phases[1]] == [True, True]
    r = cli("train", "--output-dir", str(out), "--max-steps", "2")
    assert r.returncode == 0, r.stderr
    assert "latents 0 written, 8 reused" in r.stdout and (out / "lora.safetensors").is_file()
