"""Models by name: `model.checkpoint` / `model.text_encoder_path` as Hugging Face hub ids, resolved to local files.

Only the files a run needs are fetched (one official file chosen by repo + flavour, or a diffusers layout's
component folders), through huggingface_hub into its standard cache (resumable, with its progress bar);
`HF_HUB_OFFLINE=1` reads the cache only. `download_estimate` says what a run would fetch without fetching it.
It does not load weights (models/ does) and never unpickles: only .safetensors and json/tokenizer files are fetched.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lowvram.errors import LowvramError, UsageError

# The official single files, keyed by (repo the user names, model.flavour) -> (repo holding it, file name).
# LTX-2.0 names from the Lightricks/LTX-2 model card (and SimpleTuner's LTX2_FLAVOUR_FILENAMES for dev/fp8/fp4);
# LTX-2.3's bf16 files live in Lightricks/LTX-2.3 and its fp8 file in the separate Lightricks/LTX-2.3-fp8 repo.
# Extend here when a version or flavour is added: nothing else needs to change.
OFFICIAL_FILES: dict[tuple[str, str], tuple[str, str]] = {
    ("Lightricks/LTX-2", "dev"): ("Lightricks/LTX-2", "ltx-2-19b-dev.safetensors"),
    ("Lightricks/LTX-2", "dev-fp8"): ("Lightricks/LTX-2", "ltx-2-19b-dev-fp8.safetensors"),
    ("Lightricks/LTX-2", "dev-fp4"): ("Lightricks/LTX-2", "ltx-2-19b-dev-fp4.safetensors"),
    ("Lightricks/LTX-2", "distilled"): ("Lightricks/LTX-2", "ltx-2-19b-distilled.safetensors"),
    ("Lightricks/LTX-2", "distilled-fp8"): ("Lightricks/LTX-2", "ltx-2-19b-distilled-fp8.safetensors"),
    ("Lightricks/LTX-2.3", "dev"): ("Lightricks/LTX-2.3", "ltx-2.3-22b-dev.safetensors"),
    ("Lightricks/LTX-2.3", "distilled"): ("Lightricks/LTX-2.3", "ltx-2.3-22b-distilled.safetensors"),
    ("Lightricks/LTX-2.3", "dev-fp8"): ("Lightricks/LTX-2.3-fp8", "ltx-2.3-22b-dev-fp8.safetensors"),
    ("Lightricks/LTX-2.3-fp8", "dev-fp8"): ("Lightricks/LTX-2.3-fp8", "ltx-2.3-22b-dev-fp8.safetensors"),
}
# The release each official repo holds: before anything is downloaded (plan, probe) the repo is the evidence of the
# version a hub id trains. Lightricks/LTX-2.5 ships its weights as separate component files (diffusion_models/,
# vae/, text_encoders/ per its model card's `hf download` lines, file names left as placeholders there), not one
# combined file lowvram's single-file loader reads, so it has no OFFICIAL_FILES row: name its file as repo:file.
RELEASE_REPOS: dict[str, str] = {
    "Lightricks/LTX-2": "2.0",
    "Lightricks/LTX-2.3": "2.3",
    "Lightricks/LTX-2.3-fp8": "2.3",
    "Lightricks/LTX-2.5": "2.5",
}
# The repo a version's official files are looked up in when the config names the family repo Lightricks/LTX-2 with
# another model.version (a pasted SimpleTuner config keeps `pretrained_model_name_or_path: Lightricks/LTX-2` and
# names the release in `model_flavour: 2.3-distilled`, which config.py maps to version 2.3 + flavour distilled).
VERSION_REPOS: dict[str, str] = {"2.0": "Lightricks/LTX-2", "2.3": "Lightricks/LTX-2.3"}
# The text encoder the official trainer and SimpleTuner use for LTX-2 (probe's estimate assumes it).
DEFAULT_TEXT_ENCODER = "google/gemma-3-12b-it-qat-q4_0-unquantized"
DEFAULT_CHECKPOINT = "Lightricks/LTX-2"

# A diffusers-layout repo: only the component folders lowvram loads, weights as safetensors.
_DIFFUSERS_PARTS = ("transformer", "vae", "audio_vae", "vocoder", "connectors")
_TEXT_PARTS = ("text_encoder", "tokenizer")
_TEXT_ENCODER_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]
_WEIGHT_SUFFIXES = (".safetensors", ".sft")
_LOCAL_SUFFIXES = (*_WEIGHT_SUFFIXES, ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".json", ".gguf")
_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HUB_ID = re.compile(rf"^(?P<repo>{_REPO_PART}/{_REPO_PART})(?:@(?P<rev>[^:@\s]+))?(?::(?P<file>[^@\s]+))?$")


@dataclass(frozen=True)
class HubRef:
    """`org/name[@revision][:path/in/repo.safetensors]`, and the config key it came from (for messages)."""

    repo_id: str
    revision: str | None
    filename: str | None
    key: str
    text: str


@dataclass(frozen=True)
class Needed:
    """What one hub reference needs: one file, or the files of a snapshot matching `patterns`."""

    ref: HubRef
    repo_id: str
    filename: str | None = None
    patterns: tuple[str, ...] = ()
    folders: tuple[str, ...] = ()  # a snapshot is complete when each of these holds a config and weights

    @property
    def label(self) -> str:
        return f"{self.repo_id}:{self.filename}" if self.filename else f"{self.repo_id} ({', '.join(self.patterns)})"


def parse_ref(value: str | None, key: str) -> HubRef | None:
    """A hub reference, or None when `value` is a local path (one that exists, or that looks like a file path)."""
    if value is None:
        return None
    text = str(value).strip()
    if not text or Path(text).expanduser().exists() or text.startswith(("/", ".", "~", "\\")):
        return None
    m = _HUB_ID.match(text)
    if m is None:
        return None
    if m.group("file") is None and m.group("repo").lower().endswith(_LOCAL_SUFFIXES):
        return None  # `models/ltx.safetensors` that does not exist: a missing local file, reported as such
    return HubRef(m.group("repo"), m.group("rev"), m.group("file"), key, text)


def needed_files(
    ref: HubRef, *, flavour: str = "dev", with_text_encoder: bool = False, version: str | None = None
) -> Needed:
    """Which files of `ref` a run needs: an explicit file; the official file for (repo, version, flavour); else a
    diffusers layout's component folders (with text_encoder/ and tokenizer/ when no separate text encoder is named).

    `version` is model.version: the family repo Lightricks/LTX-2 then means that release's repo; a release's repo
    that `version` contradicts, and a release with no known single file (2.5), are refused in one line.
    """
    if ref.key == "model.text_encoder_path":
        if ref.filename is not None:
            raise UsageError(f"{ref.key} '{ref.text}': a text encoder is a whole repo: drop ':{ref.filename}'")
        return Needed(ref, ref.repo_id, patterns=tuple(_TEXT_ENCODER_PATTERNS), folders=("",))
    repo = _release_repo(ref, version)
    if ref.filename is not None:
        if not ref.filename.endswith(_WEIGHT_SUFFIXES):
            raise UsageError(f"{ref.key} '{ref.text}': lowvram loads .safetensors files only; name one after ':'")
        return Needed(ref, repo, filename=ref.filename)
    official = OFFICIAL_FILES.get((repo, flavour))
    if official is not None:
        return Needed(ref, official[0], filename=official[1])
    known = sorted({f for (r, f) in OFFICIAL_FILES if r == repo})
    if known:
        raise UsageError(
            f"{ref.key} '{ref.text}' has no '{flavour}' file{'' if repo == ref.repo_id else ' in ' + repo}: set "
            f"model.flavour to one of {', '.join(known)}, or name the file as {repo}:FILE.safetensors"
        )
    if RELEASE_REPOS.get(repo) is not None:  # a release with no known single file (LTX-2.5)
        raise UsageError(
            f"{ref.key} '{ref.text}': no LTX-{RELEASE_REPOS[repo]} single file is known (known: "
            f"{_known_files()}): name the file as {repo}:PATH.safetensors"
        )
    parts = _DIFFUSERS_PARTS + (_TEXT_PARTS if with_text_encoder else ())
    patterns = ["model_index.json"] + [f"{p}/*{s}" for p in parts for s in (".json", ".safetensors")]
    if with_text_encoder:
        patterns.append("tokenizer/tokenizer.model")
    return Needed(ref, ref.repo_id, patterns=tuple(patterns), folders=parts)


def _release_repo(ref: HubRef, version: str | None) -> str:
    """The repo `ref`'s files come from for model.version `version` (checked against the release the repo holds)."""
    holds = RELEASE_REPOS.get(ref.repo_id)
    if version is None or holds is None or holds == version:
        return ref.repo_id
    family = ref.repo_id == DEFAULT_CHECKPOINT and ref.filename is None and ref.revision is None
    if family and version in VERSION_REPOS:
        return VERSION_REPOS[version]
    if family:
        raise UsageError(
            f"{ref.key} '{ref.text}' with model.version {version}: no LTX-{version} single file is known (known: "
            f"{_known_files()}): name the file as REPO:PATH.safetensors"
        )
    raise UsageError(
        f"{ref.key} '{ref.text}' is an LTX-{holds} repo but model.version is {version}: set model.version = "
        f'"{holds}", or name an LTX-{version} checkpoint'
    )


def _known_files() -> str:
    by_version: dict[str, list[str]] = {}
    for repo, name in sorted(set(OFFICIAL_FILES.values())):
        by_version.setdefault(RELEASE_REPOS[repo], []).append(f"{repo}:{name}")
    return "; ".join(f"LTX-{v}: {', '.join(files)}" for v, files in sorted(by_version.items()))


def checkpoint_version(model) -> str | None:
    """The version a run trains by what `model.checkpoint`'s hub id names, when it is one: model.version (checked
    against the repo), else the release of the repo its file comes from; None for a local path or another repo.
    Nothing is downloaded: at plan time the repo is the only evidence (the weights are checked when loaded)."""
    ref = parse_ref(model.checkpoint, "model.checkpoint")
    if ref is None:
        return None
    need = needed_files(ref, flavour=model.flavour, version=model.version, with_text_encoder=True)
    return model.version or RELEASE_REPOS.get(need.repo_id)


def model_refs(cfg) -> list[Needed]:
    """Every hub reference of a run config (checkpoint, text encoder), with the files each needs."""
    m = cfg.model
    out = []
    ckpt = parse_ref(m.checkpoint, "model.checkpoint")
    if ckpt is not None:
        out.append(
            needed_files(ckpt, flavour=m.flavour, with_text_encoder=m.text_encoder_path is None, version=m.version)
        )
    te = parse_ref(m.text_encoder_path, "model.text_encoder_path")
    if te is not None:
        out.append(needed_files(te))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Resolving (downloads unless offline)


def offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once at import; a test or wrapper may set it later)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def cache_dir_of(cfg) -> Path:
    from huggingface_hub import constants

    chosen = getattr(cfg.model, "cache_dir", None)
    return Path(chosen).expanduser() if chosen else Path(constants.HF_HUB_CACHE)


def resolve_model_paths(cfg, console=None):
    """A copy of `cfg` whose hub ids are local paths in the HF cache (downloading what is missing unless offline).

    Bad references, gated repos without access, and files missing offline raise one line (what to do).
    """
    updates = {}
    version = checkpoint_version(cfg.model) if cfg.model.version is None else None
    if version is not None:
        updates["version"] = version  # what the plan assumed from the repo; the loader checks the weights against it
    for need in model_refs(cfg):
        if console is not None:
            console.print(f"{need.ref.key}: {need.label}" + (" (offline: cache only)" if offline() else ""))
        updates[need.ref.key.split(".", 1)[1]] = str(fetch(need, cache_dir=getattr(cfg.model, "cache_dir", None)))
    if not updates:
        return cfg
    return cfg.model_copy(update={"model": cfg.model.model_copy(update=updates)})


def fetch(need: Needed, *, cache_dir: str | None = None) -> Path:
    """The local path of what `need` names: a file, or a snapshot folder holding the needed files."""
    import huggingface_hub

    local_only = offline()
    ref = need.ref
    try:
        if need.filename is not None:
            return Path(
                huggingface_hub.hf_hub_download(
                    need.repo_id, need.filename, revision=ref.revision, cache_dir=cache_dir, local_files_only=local_only
                )
            )
        folder = Path(
            huggingface_hub.snapshot_download(
                need.repo_id, revision=ref.revision, cache_dir=cache_dir, local_files_only=local_only,
                allow_patterns=list(need.patterns),
            )
        )  # fmt: skip
    except Exception as e:  # huggingface_hub's errors, and network errors it lets through
        raise _hub_error(need, e, cache_dir) from None
    missing = _incomplete_folders(folder, need)
    if missing:
        # An offline snapshot folder exists as soon as one file of the repo was cached: check what this run needs.
        if not local_only and not (folder / "model_index.json").is_file() and need.folders != ("",):
            raise UsageError(
                f"{ref.key} '{ref.text}' is not a diffusers layout (no model_index.json): name its combined file "
                f"as {need.repo_id}:FILE.safetensors"
            )
        raise LowvramError(
            f"{ref.key} '{ref.text}': {', '.join(missing)} not in the cache ({folder}); fetch it with: "
            f"{download_command(need, cache_dir)}"
        )
    return folder


def _incomplete_folders(folder: Path, need: Needed) -> list[str]:
    """The parts of a snapshot this run needs that are not there (a config and weights each; Gemma's tokenizer)."""
    if need.folders == ("",):  # a text encoder repo: weights, config and tokenizer at its root
        ok = (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
        ok = ok and ((folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file())
        return [] if ok else ["the text encoder (config.json, .safetensors, tokenizer)"]
    # Audio parts and a bundled text encoder are optional; when present they must be whole.
    optional = {*_TEXT_PARTS, "audio_vae", "vocoder"}
    wanted = [p for p in need.folders if p not in optional or (folder / p).is_dir()]
    missing = []
    for part in wanted:
        sub = folder / part
        if part == "tokenizer":
            ok = any(sub.glob("tokenizer*"))
        else:
            ok = (sub / "config.json").is_file() and any(sub.glob("*.safetensors"))
        if not ok:
            missing.append(f"{part}/")
    return missing


def download_command(need: Needed, cache_dir: str | None = None) -> str:
    """The exact shell command that fetches `need` with the CLI the installed huggingface_hub provides."""
    import importlib.util

    cli = "hf download" if importlib.util.find_spec("huggingface_hub.cli.hf") else "huggingface-cli download"
    parts = [cli, need.repo_id]
    if need.filename is not None:
        parts.append(need.filename)
    else:
        parts += [f'--include "{p}"' for p in need.patterns]
    if need.ref.revision:
        parts.append(f"--revision {need.ref.revision}")
    if cache_dir:
        parts.append(f"--cache-dir {cache_dir}")
    return " ".join(parts)


def _hub_error(need: Needed, e: Exception, cache_dir: str | None) -> LowvramError:
    from huggingface_hub import errors, get_token

    ref = need.ref
    where = f"{ref.key} '{ref.text}'"
    page = f"https://huggingface.co/{need.repo_id}"
    if isinstance(e, errors.GatedRepoError):
        if get_token() is None:
            return LowvramError(
                f"{where}: {need.repo_id} is gated and no Hugging Face token is set: accept its license at {page}, "
                "then run `hf auth login` (or set HF_TOKEN) and retry"
            )
        return LowvramError(
            f"{where}: {need.repo_id} is gated and your token has no access yet: accept its license at {page} "
            "(logged in as the token's owner) and retry"
        )
    if isinstance(e, errors.LocalEntryNotFoundError) and offline():
        return LowvramError(
            f"{where}: {need.label} is not in the cache and HF_HUB_OFFLINE=1 forbids downloading; fetch it with: "
            f"{download_command(need, cache_dir)}"
        )
    if isinstance(e, errors.RevisionNotFoundError):
        return UsageError(f"{where}: revision '{ref.revision}' does not exist in {need.repo_id}: check the '@...' part")
    local_miss = isinstance(e, errors.LocalEntryNotFoundError)  # online: the hub did not answer (generic below)
    if not local_miss and isinstance(e, errors.RemoteEntryNotFoundError | errors.EntryNotFoundError):
        return UsageError(f"{where}: {need.repo_id} has no file {need.filename}: check the name or model.flavour")
    if isinstance(e, errors.RepositoryNotFoundError):
        hint = "" if get_token() else " (a private repo needs `hf auth login` or HF_TOKEN)"
        return UsageError(
            f"{where}: no model repo {need.repo_id} on the hub{hint}: check the id (no local path of that name "
            "exists either)"
        )
    if isinstance(e, errors.HFValidationError):
        return UsageError(f"{where}: not a valid hub id or path: {str(e).splitlines()[0]}")
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return LowvramError(
        f"{where}: cannot download {need.label} ({detail}); check the connection, or set HF_HUB_OFFLINE=1 to use "
        f"the cache (fetch elsewhere with: {download_command(need, cache_dir)})"
    )


# --------------------------------------------------------------------------------------------------------------------
# Estimating (never downloads)


@dataclass
class DownloadEstimate:
    """What a run would download into the cache, and whether the cache's disk has room. None = cannot know."""

    cache_dir: Path
    free_bytes: int | None
    items: list[dict] = field(default_factory=list)  # {label, cached_bytes, download_bytes (None: unknown), note}
    offline: bool = False
    unreachable: bool = False  # online, but the hub did not answer: only the cache was read

    @property
    def download_bytes(self) -> int | None:
        sizes = [i["download_bytes"] for i in self.items]
        return None if any(s is None for s in sizes) else sum(sizes)

    @property
    def has_room(self) -> bool | None:
        need = self.download_bytes
        return None if need is None or self.free_bytes is None else need <= self.free_bytes

    def lines(self) -> list[str]:
        if not self.items:
            return []
        out = []
        for i in self.items:
            size = "size unknown" if i["download_bytes"] is None else f"{i['download_bytes'] / 1e9:.1f} GB to download"
            cached = f", {i['cached_bytes'] / 1e9:.1f} GB cached" if i["cached_bytes"] else ""
            out.append(f"{i['label']}: {size}{cached}" + (f" ({i['note']})" if i.get("note") else ""))
        free = "unknown" if self.free_bytes is None else f"{self.free_bytes / 1e9:.1f} GB free"
        total = self.download_bytes
        if total is None:
            verdict = "cannot know the download size " + ("(hub unreachable)" if self.unreachable else "offline")
        elif self.has_room:
            verdict = f"downloads {total / 1e9:.1f} GB: the disk has room"
        else:
            verdict = f"downloads {total / 1e9:.1f} GB: NOT enough room, free {(total - self.free_bytes) / 1e9:.1f} GB"
        out.append(f"model downloads into {self.cache_dir} ({free}): {verdict}")
        return out

    def to_json(self) -> dict:
        return {
            "cache_dir": str(self.cache_dir), "free_bytes": self.free_bytes, "offline": self.offline,
            "hub_unreachable": self.unreachable,
            "download_bytes": self.download_bytes, "has_room": self.has_room, "items": list(self.items),
        }  # fmt: skip


def download_estimate(cfg=None, needs: list[Needed] | None = None, cache_dir: str | Path | None = None):
    """What `cfg`'s hub ids would download (sizes from the hub's metadata online; only what is cached offline)."""
    if needs is None:
        needs = model_refs(cfg)
    cache = Path(cache_dir).expanduser() if cache_dir else (cache_dir_of(cfg) if cfg is not None else _default_cache())
    est = DownloadEstimate(cache_dir=cache, free_bytes=_free_bytes(cache), offline=offline())
    if needs and not est.offline and not hub_reachable():
        # huggingface_hub retries an unreachable hub for ~25 s per file; plan and probe answer from the cache now.
        est.offline = True
        est.unreachable = True
    for need in needs:
        est.items.append(_estimate_one(need, str(cache), est.offline))
    return est


def default_model_needs() -> list[Needed]:
    """The hub files a run of the default real model needs (for `probe`, which has no config)."""
    ckpt = needed_files(parse_ref(DEFAULT_CHECKPOINT, "model.checkpoint"), flavour="dev")
    te = needed_files(parse_ref(DEFAULT_TEXT_ENCODER, "model.text_encoder_path"))
    return [ckpt, te]


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub's host accepts a TCP connection now (a plain socket: no request is made)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _default_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _free_bytes(path: Path) -> int | None:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _estimate_one(need: Needed, cache_dir: str | None, is_offline: bool) -> dict:
    import huggingface_hub

    item = {"label": need.label, "cached_bytes": 0, "download_bytes": None, "note": ""}
    rev = need.ref.revision
    try:
        if need.filename is not None:
            info = huggingface_hub.hf_hub_download(
                need.repo_id, need.filename, revision=rev, cache_dir=cache_dir, local_files_only=is_offline,
                dry_run=True,
            )  # fmt: skip
            infos = [info]
        elif is_offline:
            return _estimate_cached_snapshot(need, cache_dir, item)
        else:
            infos = huggingface_hub.snapshot_download(
                need.repo_id, revision=rev, cache_dir=cache_dir, allow_patterns=list(need.patterns), dry_run=True
            )
    except Exception as e:
        from huggingface_hub import errors

        if isinstance(e, errors.LocalEntryNotFoundError):
            item["note"] = "not cached; the size is known only online"
        elif isinstance(e, errors.GatedRepoError):
            item["note"] = "gated: accept the license on the hub and log in to download"
        else:
            item["note"] = f"hub unreachable: {(str(e).strip().splitlines() or [type(e).__name__])[0][:80]}"
        return item
    item["cached_bytes"] = sum(i.file_size or 0 for i in infos if i.is_cached)
    unknown = any(i.file_size is None for i in infos if i.will_download)
    item["download_bytes"] = None if unknown else sum(i.file_size or 0 for i in infos if i.will_download)
    return item


def _estimate_cached_snapshot(need: Needed, cache_dir: str | None, item: dict) -> dict:
    import huggingface_hub

    try:
        folder = Path(
            huggingface_hub.snapshot_download(
                need.repo_id, revision=need.ref.revision, cache_dir=cache_dir, local_files_only=True
            )
        )
    except Exception:
        item["note"] = "not cached; the size is known only online"
        return item
    files = [p for p in folder.rglob("*") if p.is_file()]
    rel = [p.relative_to(folder).as_posix() for p in files]
    wanted = [p for p, r in zip(files, rel, strict=True) if any(fnmatch.fnmatch(r, pat) for pat in need.patterns)]
    item["cached_bytes"] = sum(p.stat().st_size for p in wanted)
    if _incomplete_folders(folder, need):
        item["note"] = "partly cached; the rest's size is known only online"
    else:
        item["download_bytes"] = 0
    return item
