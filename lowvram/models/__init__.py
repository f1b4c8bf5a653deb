"""Model families lowvram can train: their components, configs, loaders and the training forward.

Only LTX-2 today (`lowvram.models.ltx2`); importing this package imports nothing heavy.
"""
