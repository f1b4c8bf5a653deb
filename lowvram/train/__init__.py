"""Training: the loop (the recipe), the flow-matching objective, LoRA injection/export, optimizers, checkpoints.

Importing this package imports nothing heavy; each module imports torch/peft/diffusers where it needs them.
"""
