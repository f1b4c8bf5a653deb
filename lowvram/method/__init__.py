"""The training method: what is trained and how its loss is computed, as functions of modules and tensors.

- `lora`: the LoRA adapters (peft): which modules, injection, official names, export;
- `objective`: LTX-2's flow-matching objective (sigmas, noise, first-frame conditioning, the masked loss);
- `tread`: TREAD token routing through a span of blocks;
- `modes`: training modes that prepare a step's inputs (scheduled sampling).

Both the planner (which measures them on fake tensors at the real shapes) and the recipe (`train/loop.py`, which
runs them) import these; they import neither, nor any loader.
"""
