"""Offline evaluation of generated talking-head clips (`dheads eval`).

`evaluate(generated_uri, reference_uri, out_uri, storage)` is the one entry
for jobs, the demo and benchmarks; `scoring.score_clip` scores one pair of
frame arrays; `mouth` measures mouth opening and blinks; `headmotion` the
head track, pose-aligned blinks, identity, flicker, sharpness and variety;
`metrics` holds PSNR / SSIM / flow / lag correlation; `report` writes the HTML.
"""
from dheads.jobs.evaluation.evaluate import UNAVAILABLE, EvalError, evaluate

__all__ = ["evaluate", "EvalError", "UNAVAILABLE"]
