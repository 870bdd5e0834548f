"""FID-10K evaluation: Inception-v3 features (``eval.inception``) and the Fréchet distance (``eval.fid``).

The command lines run from the repository root as modules: ``python -m eval.evaluate SAMPLES REF`` (FID, sFID,
IS, precision, recall; ``--metrics fid`` for the FID alone), ``python -m eval.sample_fid --run-dir RUN`` (FID-10K
of a run), ``python -m eval.ref_stats`` (reference statistics).
"""
