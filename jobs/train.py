"""`dheads train ...`: Ray Train TorchTrainer over FSDP2 workers.

Parse (done by the CLI) -> build the dataset and the trainer -> fit. The
per-worker loop is `dheads.jobs.training.loop.train_loop_per_worker`. The run
folder is `<trainer.storage_path>/<trainer.name>` (local or s3://); running the
same command again resumes from its latest checkpoint.
"""
from __future__ import annotations

import json

from dheads.platform.config import TrainJob


def build_trainer(job: TrainJob, dataset):
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    from dheads.jobs.training.loop import TRAIN_DATASET, train_loop_per_worker
    from dheads.jobs.training.storage import run_storage
    from dheads.platform.storage import s3_env

    tc = job.trainer
    storage_path, filesystem = run_storage(tc.storage_path, job.storage)
    # preserve_order makes the split of blocks over workers deterministic:
    # the data side of exact resume.
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=tc.name, storage_path=storage_path, storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            worker_runtime_env={"env_vars": s3_env(job.storage)}),
        datasets={TRAIN_DATASET: dataset},
        dataset_config=ray.train.DataConfig(execution_options=ingest),
    )


def pin_paths(cfg: TrainJob) -> TrainJob:
    """Local paths made absolute here, in the driver: Ray workers run in their
    own working directory, where a relative run folder or val path would
    silently point somewhere else."""
    from dataclasses import replace

    from dheads.platform import media, storage
    from dheads.platform.config import ConfigError

    def pin(uri: str | None) -> str | None:
        return uri if uri is None or storage.is_s3(uri) else str(storage.resolve(uri)[1])

    cfg = replace(cfg, val=pin(cfg.val),
                  data=replace(cfg.data, shards=pin(cfg.data.shards), source=pin(cfg.data.source)),
                  trainer=replace(cfg.trainer, storage_path=pin(cfg.trainer.storage_path)))
    if cfg.trainer.sample_every > 0 and cfg.val and \
            not storage.list_files(cfg.val, media.VIDEO_EXTS, cfg.storage):
        raise ConfigError(f"val={cfg.val}: no videos there for the sample clips "
                          f"(or set trainer.sample_every=0)")
    return cfg


def ensure_shards(cfg: TrainJob) -> None:
    """Shards at `data.shards`, preprocessed first from `data.source` (a
    folder or prefix of videos) when there are none yet: a recipe is then one
    command. Without a source, no shards is a clear error before Ray starts."""
    from dheads.jobs import preprocess
    from dheads.jobs.reader import require_shards
    from dheads.platform import storage
    from dheads.platform.config import PreprocessJob
    from dheads.platform.errors import UserError

    try:
        require_shards(cfg.data.shards, cfg.storage)
        return
    except FileNotFoundError:
        if not cfg.data.source:
            raise
    tasks = preprocess.list_clips(cfg.data.source, cfg.storage)
    if not tasks:
        raise UserError(f"data.source={cfg.data.source}: no videos there to preprocess")
    job = PreprocessJob(input=cfg.data.source, output=cfg.data.shards, model=cfg.model, data=cfg.data,
                        storage=cfg.storage, cluster=cfg.cluster)
    print(f"[train] no shards at {cfg.data.shards}: preprocessing {len(tasks)} clips of "
          f"{cfg.data.source} first", flush=True)
    summary = preprocess.preprocess(job, tasks=tasks)
    print(summary.line(), flush=True)
    if not summary.ok:
        raise UserError(f"data.source={cfg.data.source}: no clip could be preprocessed "
                        f"(see {storage.join(cfg.data.shards, 'errors.parquet')})")


def with_motion_prior(cfg: TrainJob) -> TrainJob:
    """The job's model with its motion prior fitted on the shards
    (`jobs/training/prior.py`; deterministic, so a resumed run fits the same)."""
    from dataclasses import replace

    from dheads.jobs.training.prior import fit_from_shards

    return replace(cfg, model=fit_from_shards(cfg.data.shards, cfg.model, cfg.storage))


def run(cfg: TrainJob) -> int:
    import ray.data

    from dheads.jobs.reader import TENSOR_COLUMNS, require_shards, training_dataset
    from dheads.jobs.training.loop import run_folder
    from dheads.platform.cluster import connect

    cfg = pin_paths(cfg)
    if not cfg.data.source:
        require_shards(cfg.data.shards, cfg.storage)  # none there: a clear error before Ray starts
    tc = cfg.trainer
    # workers' CPUs + room for the Ray Data tasks that feed them
    connect(cfg.cluster, cfg.storage, min_cpus=tc.num_workers * tc.cpus_per_worker + 2)
    ensure_shards(cfg)
    cfg = with_motion_prior(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False  # one log line per step is enough
    # Only tensor columns travel to the workers (clip_id is a string).
    dataset = training_dataset(cfg.data.shards, cfg.model, cfg.data, cfg.storage) \
        .select_columns(list(TENSOR_COLUMNS))
    result = build_trainer(cfg, dataset).fit()
    metrics = result.metrics or {}
    print(json.dumps({"run": run_folder(cfg), "step": metrics.get("step"),
                      "loss": metrics.get("loss"),
                      "checkpoint": result.checkpoint.path if result.checkpoint else None}))
    return 0
