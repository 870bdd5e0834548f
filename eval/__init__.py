"""FID-10K evaluation: Inception-v3 features (``eval.inception``) and the Fréchet distance (``eval.fid``).

See DESIGN.md section 8. ``python eval/fid.py A B`` computes the FID between two image sets or statistics files.
"""
