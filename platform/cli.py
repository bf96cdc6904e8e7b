"""`dheads <job> [key=value ...]`: compose the job's config, then run the job.

Each job is `dheads.jobs.<module>.run(cfg)` taking its typed config. Unknown
jobs and config errors exit with status 2 and one clear line on stderr.
"""
from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path

from dheads.platform.config import ConfigError, compose

# job name -> module holding `run(cfg)`
JOBS = {
    "info": "dheads.jobs.info",
    "synth": "dheads.jobs.synth",
    "preprocess": "dheads.jobs.preprocess",
    "train": "dheads.jobs.train",
    "export": "dheads.jobs.export",
    "dub": "dheads.jobs.dub",
    "serve": "dheads.serve.app",
    "eval": "dheads.jobs.eval",
}

USAGE = f"""usage: dheads <job> [key=value ...]
       dheads submit <job> [key=value ...]   send the job to cluster.dashboard_address
       dheads submit status|logs|stop JOB_ID
       dheads bench <name> [args]            run bench/<name>.py (repo checkout)
       dheads <job> --cfg                    print the composed config and exit
jobs: {', '.join(JOBS)}"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    job, rest = argv[0], argv[1:]
    if job == "submit":
        from dheads.platform.submit import main as submit_main

        return submit_main(rest)
    if job == "bench":
        return _bench(rest)
    if job not in JOBS:
        print(f"dheads: unknown job {job!r}\n{USAGE}", file=sys.stderr)
        return 2
    show_cfg = "--cfg" in rest
    overrides = [a for a in rest if a != "--cfg"]
    try:
        cfg = compose(job, overrides)
    except ConfigError as e:
        print(f"dheads: {e}", file=sys.stderr)
        return 2
    if show_cfg:
        from dheads.platform.config import to_yaml

        print(to_yaml(cfg))
        return 0
    result = importlib.import_module(JOBS[job]).run(cfg)
    return int(result) if isinstance(result, int) else 0


def _bench(args: list[str]) -> int:
    if not args:
        print("usage: dheads bench <preprocess|train|dub|model> [args]", file=sys.stderr)
        return 2
    script = Path(__file__).resolve().parents[1] / "bench" / f"{args[0]}.py"
    if not script.exists():
        print(f"dheads: no benchmark {script} (benchmarks run from a repo checkout)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args[1:]]
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
