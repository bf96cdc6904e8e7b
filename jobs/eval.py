"""`dheads eval generated=URI reference=URI out=URI [generated_b=URI]`: score
generated clips against references (matched by file stem; `generated_b`, a
second run with another seed, for the variety measures), write
`out/metrics.json` and the HTML report `out/index.html`, and print one JSON
line of the averages.

Metric definitions: jobs/evaluation/report.py (METHODS), also in the report.
"""
from __future__ import annotations

import json

from dheads.jobs.evaluation import evaluate
from dheads.platform.config import EvalJob


def run(cfg: EvalJob) -> int:
    averages = evaluate(cfg.generated, cfg.reference, cfg.out, cfg.storage, fps=cfg.fps,
                        max_lag=cfg.max_lag, report=cfg.report, generated_b_uri=cfg.generated_b)
    print(json.dumps(averages), flush=True)
    return 0
