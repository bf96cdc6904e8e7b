"""The training job's parts: the per-worker loop and one step, LR schedule,
EMA, the run folder's CSV / loss curve, and sample videos."""
