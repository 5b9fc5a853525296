"""The pipeline's stages as plain functions and small classes over batches (dicts of numpy arrays).

Nothing here imports Ray: `jobs.pipeline` assembles these stages into a Ray Data pipeline, and every
stage can be called directly in a test. Depends on `models`, never on `jobs`.
"""
