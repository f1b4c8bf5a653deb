"""Model families lowvram can train: their components, configs, loaders and the training forward.

Only LTX-2 today (`lowvram.models.ltx2`), in three releases (`lowvram.models.versions`: 2.0, 2.3, 2.5); importing
this package imports nothing heavy.
"""
