"""LTX-2, the model family lowvram trains: one package, four rooms that import one way.

- `configs`: constructor kwargs, tiny (per release) and real (the JSON shipped in `lowvram/models/configs/`);
- `build`: the real diffusers / transformers classes from configs, on meta (what the planner measures) or tiny;
- `layout`: the official checkpoint's key names <-> diffusers module names (what LoRA export names keys by);
- `checkpoint`: the official single file and diffusers folders: lazy safetensors reads, loading (quantizing while
  reading) and saving;
- `forward`: text encoding, latent normalize/pack, the training forward.

configs <- build <- checkpoint -> layout; forward imports none of them. This front door re-exports the family's API, so
`from lowvram.models import ltx2; ltx2.transformer_forward(...)` reads as before; code inside the package (and the
training recipe) imports the room it needs directly.
"""

from __future__ import annotations

from lowvram.models.ltx2 import build, checkpoint, configs, forward, layout  # noqa: F401
from lowvram.models.ltx2.build import (  # noqa: F401
    LTX2Components,
    build_component,
    build_on_meta,
    build_text_encoder,
    build_tiny_components,
    build_tiny_tokenizer,
    text_embedding_widths,
    text_encoder_classes,
)
from lowvram.models.ltx2.checkpoint import (  # noqa: F401
    DIFFUSERS_SUBFOLDERS,
    FAMILY_METADATA_KEY,
    PICKLE_SUFFIXES,
    VERSION_METADATA_KEY,
    CheckpointSource,
    ComponentSource,
    TensorRef,
    check_keys,
    check_text_encoder_version,
    gemma_key,
    iter_component_tensors,
    load_component,
    load_component_quantized,
    load_components,
    load_text_encoder,
    load_text_encoder_quantized,
    load_tokenizer,
    open_checkpoint,
    quantize_loaded,
    read_header,
    run_model_version,
    save_diffusers_folder,
    save_single_file,
    save_text_encoder,
    save_tiny_checkpoint,
    text_encoder_model_type,
    text_encoder_plan_config,
)
from lowvram.models.ltx2.configs import (  # noqa: F401
    CHECKPOINT_COMPONENTS,
    FAMILIES,
    FAMILY_ALIASES,
    TINY_MAX_TEXT_TOKENS,
    canonical_family,
    family_configs,
    family_version,
    real_audio_vae_config,
    real_connectors_config,
    real_text_encoder_config,
    real_transformer_config,
    real_video_vae_config,
    real_vocoder_config,
    tiny_configs,
)
from lowvram.models.ltx2.forward import (  # noqa: F401
    TextEmbeddings,
    denormalize_audio_latents,
    denormalize_video_latents,
    encode_prompt_hidden_states,
    encode_text,
    normalize_audio_latents,
    normalize_video_latents,
    pack_audio_latents,
    pack_video_latents,
    run_connectors,
    transformer_forward,
    unpack_audio_latents,
    unpack_video_latents,
)
from lowvram.models.ltx2.layout import (  # noqa: F401
    diffusers_to_official,
    official_module_names,
    official_to_diffusers,
)
