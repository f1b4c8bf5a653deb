"""The dataset pipeline: specs (folder or multidatabackend.json), PyAV decoding, buckets, text and latent caches.

Entry points: `build.build_caches(...)` fills the caches and returns the items; `batches.iterate_batches(...)`
serves them bucket by bucket, seeded and resumable. Nothing is imported here, so `import lowvram.data` stays cheap.
"""
