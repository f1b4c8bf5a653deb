"""lowvram: LoRA training for LTX-2 on one consumer GPU, with a memory manager that proves the run fits."""

__version__ = "0.1.0"
