"""Score: the second step of read -> score -> prune -> train -> report.

Image decoding and CLIP image-text consistency scoring as plain batch stages
(``scorer.py``), the CLIP models and their configs (``clip_models.py``), how
well a score separates noise (``quality.py``), the Ray Data job that runs
the stages over a dataset and writes the scores the pruner reads (``job.py``),
and the pre-training of the offline reference model (``pretrain.py``).
"""

# The open_clip configs mmdp ships (pipeline/score/model_configs/): named here, where importing them
# costs nothing, so that job configs can default to them without importing open_clip.
TINY_MODEL, REFERENCE_MODEL = "mmdp-tiny", "mmdp-ref"
