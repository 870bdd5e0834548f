"""FID-10K evaluation: Inception-v3 features (``eval.inception``) and the Fréchet distance (``eval.fid``).

``python eval/fid.py A B`` computes the FID between two image sets or statistics files.
"""
