"""The pipeline stages behind the CLI: train-teacher, cache-teacher, distill, evaluate.

Each stage builds a Lightning Trainer from ``cfg.trainer`` (so DDP, precision and devices are
Trainer flags, never code changes) and saves the resolved config beside its outputs.
"""

from __future__ import annotations

import json
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from data_modules.datamodule import FundusDataModule, SampleList
from data_modules.io import atomic_write_bytes
from mtkd.config import ConfigError, save_config, to_container
from mtkd.derived import parse_derived
from mtkd.kd.cache import (
    FEATURE_DTYPE,
    CacheShardWriter,
    TeacherCache,
    check_fingerprint,
    check_replaceable,
    file_sha256,
    fingerprint,
    merge_shards,
    read_fingerprint,
    recorded_teachers,
    remove_orphans,
    run_token,
    stored_storage,
)
from mtkd.kd.ensemble import (
    TeacherEnsemble,
    announce,
    configured_teachers,
    distill_teachers,
    teacher_provenance,
)
from mtkd.kd.storage import cache_storage
from mtkd.kd.teacher_source import build_teacher_source, reads_cache
from mtkd.locks import directory_lock
from mtkd.modules.checkpoint import (
    RngState,
    SafeCheckpointIO,
    check_same_network,
    read_checkpoint,
    without_pretrained,
)
from mtkd.modules.common import MultiTaskModule
from mtkd.modules.student import StudentModule
from mtkd.modules.sync_batchnorm import TimmSyncBatchNorm
from mtkd.modules.teacher import TeacherModule
from mtkd.run_config import apply_overrides
from mtkd.status import status_logger
from mtkd.tasks import build_tasks
from mtkd.threads import ThreadBudget
from mtkd.tracking.loggers import logger_callbacks, make_logger

log = status_logger(__name__)

STAGE_MODULES = {"teacher": TeacherModule, "distill": StudentModule}


def make_trainer(cfg: DictConfig, run_dir: Path | None, callbacks: list, logger: Any) -> L.Trainer:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if run_dir is not None:
        kwargs.setdefault("default_root_dir", str(run_dir))
    plugins = [*kwargs.pop("plugins", []), SafeCheckpointIO()]
    if kwargs.pop("sync_batchnorm", False):
        plugins.append(TimmSyncBatchNorm())
    # A checkpoint's config from before run.threads has no such key.
    budget = ThreadBudget(cfg.run.get("threads"))
    return L.Trainer(callbacks=[*callbacks, budget], logger=logger, plugins=plugins, **kwargs)


def monitor_of(cfg: DictConfig, tasks: dict) -> tuple[str, str]:
    """The checkpoint metric: ``run.monitor`` (``<stage>/<task>/<metric>``, ``<stage>/loss`` or
    ``<stage>/score``, its mode from ``Task.higher_is_better``), else
    val/score: the tasks' main metrics, so the best checkpoint is where the heads predict best,
    not where a summed loss that hides a stuck head is lowest."""
    key = cfg.run.monitor or "val/score"
    parts = key.split("/")
    if parts[-1] == "loss":
        return key, "min"
    if len(parts) == 2 and parts[-1] == "score":
        return key, "max"
    if len(parts) == 3 and parts[1] in tasks:
        with suppress(LookupError):
            return key, "max" if tasks[parts[1]].higher_is_better(parts[-1]) else "min"
    valid = [f"val/{n}/{m}" for n, t in tasks.items() for m in t.metrics()]
    raise ConfigError(
        f"run.monitor={key!r} is not a metric with a direction; choose val/score, val/loss, "
        f"val/<task>/loss or one of {valid}"
    )


#: what a command that chains the stages (demo, study) sets itself for each one: where it writes,
#: and the teacher and cache it reads
PIPELINE_KEYS = (
    "stage",
    "run.dir",
    "run.resume",
    "run.overwrite",
    "kd",
    "kd.mode",
    "kd.cache_dir",
    "kd.teacher",
    "cache.teacher",
)


def pipeline_keys_taken(overrides: list[str], also: tuple[str, ...] = ()) -> list[str]:
    """The overrides that set a key of ``PIPELINE_KEYS`` (or ``also``), which such a command
    refuses: its own value would silently win or be silently lost."""
    return sorted({o.split("=", 1)[0] for o in overrides} & {*PIPELINE_KEYS, *also})


def held_checkpoints(run_dir: Path) -> list[str]:
    """The checkpoints a run left in ``run_dir`` (finished or not): what a new run would replace."""
    return sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))


def check_run_dir(cfg: DictConfig) -> None:
    """Refuse a run directory that holds checkpoints (a finished or an interrupted run) unless
    ``run.resume`` continues it or ``run.overwrite`` replaces it: Lightning would replace its
    best.ckpt and last.ckpt with a mere warning."""
    run_dir = Path(cfg.run.dir)
    found = held_checkpoints(run_dir)
    if not found or cfg.run.resume or cfg.run.overwrite:
        return
    finished = (run_dir / "metrics_val.json").is_file()
    held = "a finished run" if finished else "an unfinished run (no metrics_val.json)"
    resume = run_dir / "checkpoints" / ("last.ckpt" if "last.ckpt" in found else found[0])
    raise ConfigError(
        f"{run_dir} holds {held}: checkpoints/{', checkpoints/'.join(found)}. Continue it with "
        f"run.resume={resume}, replace it with run.overwrite=true, or give another run.dir"
    )


def refuse_fast_dev_run(cfg: DictConfig, command: str) -> None:
    """For commands whose next stage reads the checkpoint that ``trainer.fast_dev_run`` does
    not write (demo, study): refuse it before the first stage instead of after it."""
    if cfg.trainer.get("fast_dev_run", False):
        raise ConfigError(
            f"{command}: trainer.fast_dev_run writes no checkpoint for the next stage to read; "
            "for a quick pass use trainer.max_epochs=1 trainer.limit_train_batches=1 "
            "trainer.limit_val_batches=1"
        )


class SaveConfig(Callback):
    """Saves the resolved config as ``checkpoints/config.yaml`` when training starts: after the
    data checks, so a refused rerun leaves the old one, and after ModelCheckpoint looked at the
    folder (written before, it made every fresh run warn that the folder was not empty)."""

    def __init__(self, cfg: DictConfig, path: Path) -> None:
        self.cfg = cfg
        self.path = path

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            save_config(self.cfg, self.path)


class EpochLog(Callback):
    """One status line per training epoch when the progress bar is off, so that a long run
    without one says how it goes: epoch, epoch-mean training loss, the monitored metric and
    the epoch's seconds (validation included)."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.progress_bar_callback is not None:
            return
        metrics = trainer.callback_metrics
        shown = {"train/loss": "train/loss_epoch", self.monitor: self.monitor}
        values = [f"{n} {float(metrics[k]):.4f}" for n, k in shown.items() if k in metrics]
        total = f"/{trainer.max_epochs}" if (trainer.max_epochs or 0) > 0 else ""
        seconds = time.perf_counter() - self.start
        log.info(f"epoch {trainer.current_epoch + 1}{total}: {', '.join(values)}, {seconds:.1f} s")


def fit(cfg: DictConfig) -> Path | None:
    """Train the teacher (cfg.stage == "teacher") or the student ("distill"); returns the best
    checkpoint after printing its per-task validation metrics.

    ``last.ckpt`` is written (atomically) at every epoch end whatever the monitored metric does,
    with optimizer, scheduler, loop and RNG state: ``run.resume=.../last.ckpt`` continues at the
    next epoch as if never interrupted. A run directory that holds checkpoints is refused unless
    ``run.resume`` or ``run.overwrite`` says what to do with it (``check_run_dir``), and nothing
    is written into it (config, logs, W&B files) before the data and the teacher cache have
    passed their checks. ``trainer.fast_dev_run`` (Lightning then saves no checkpoint and logs
    nothing) writes nothing at all and returns None."""
    run_dir = Path(cfg.run.dir)
    smoke = bool(cfg.trainer.get("fast_dev_run", False))
    with directory_lock(run_dir, f"mtkd {cfg.stage} run"):
        if not smoke:
            check_run_dir(cfg)
        if cfg.run.resume:
            # Lightning would fail later on, with a dump of the state_dict keys.
            saved = read_checkpoint(cfg.run.resume)["hyper_parameters"]["config"]
            check_same_network(saved, cfg, f"run.resume={cfg.run.resume}")
        module, dm = build_run(cfg, None if smoke else run_dir)
        monitor, mode = monitor_of(cfg, module.tasks)
        dm.setup("fit")  # the label and image checks, before the logger writes anything
        best_ckpt = ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="best",
            monitor=monitor,
            mode=mode,
            auto_insert_metric_name=False,
            enable_version_counter=False,  # run.overwrite replaces best.ckpt, no best-v1
        )
        # ModelCheckpoint(save_last=True) refreshes last.ckpt only when best.ckpt improves.
        last_ckpt = ModelCheckpoint(
            dirpath=run_dir / "checkpoints", filename="last", enable_version_counter=False
        )
        logger = False if smoke else make_logger(cfg, run_dir, cfg.stage, cfg.run.resume)
        callbacks: list = [best_ckpt, last_ckpt, RngState(), EpochLog(monitor)]
        callbacks += logger_callbacks(cfg, logger)
        if not smoke:
            callbacks.append(SaveConfig(cfg, run_dir / "checkpoints" / "config.yaml"))
        if logger:
            callbacks.append(LearningRateMonitor(logging_interval="epoch"))
        trainer = make_trainer(cfg, run_dir, callbacks, logger)
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.run.resume, weights_only=True)
        best = None if smoke else Path(best_ckpt.best_model_path or last_ckpt.best_model_path)
        results = trainer.validate(
            module,
            datamodule=dm,
            ckpt_path=None if best is None else str(best),
            verbose=False,
            weights_only=True,
        )
        metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
        if trainer.is_global_zero:
            where = best or "trainer.fast_dev_run: the model as trained, no checkpoint written"
            print_metrics(metrics, f"{cfg.stage} validation ({where})")
            if best is not None:
                write_metrics(run_dir / "metrics_val.json", str(best), "val", metrics)
        return best


def build_run(
    cfg: DictConfig, run_dir: Path | None = None
) -> tuple[MultiTaskModule, FundusDataModule]:
    """The LightningModule and DataModule of ``cfg``'s stage, and what they share built once
    and handed to their constructors: the tasks, the samples (read and pre-scanned once), and
    for a student the teacher cache, checked against those samples, inside its teacher source.
    ``run_dir``: where the data module saves the splits (None: nowhere). ``run.seed`` is set
    right before the network is made."""
    config = to_container(cfg)
    tasks = build_tasks(config["tasks"], config.get("kd", {}).get("tasks", {}))
    samples = SampleList(cfg.data)
    student = STAGE_MODULES[cfg.stage] is StudentModule
    cache = None
    if student and reads_cache(cfg.kd.mode):
        cache = open_checked_cache(cfg, tasks, samples.train_digests())
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    if student:
        module = StudentModule(config, build_teacher_source(cfg.kd.mode, cache), tasks)
    else:
        module = TeacherModule(config, tasks)
    return module, FundusDataModule(cfg.data, tasks, cache, run_dir, samples=samples)


def open_checked_cache(
    cfg: DictConfig, tasks: dict, train: dict[str, str] | None = None
) -> TeacherCache:
    """Open the teacher cache and refuse it unless it describes this run's teachers and data:
    the teachers the run names (kd.teachers, or kd.teacher: their checkpoints' saved configs and
    file hashes, no network built), else the files the cache recorded, hashed again, and the
    training images' contents; then its files (``TeacherCache``: sizes and .npy headers, every
    byte with ``cache.verify=full``). Logs which teachers teach which task. ``train``: the run's
    training ids and image digests when its samples were read already
    (``SampleList.train_digests``)."""
    found = read_fingerprint(cfg.kd.cache_dir)
    named = distill_teachers(cfg.kd)
    if named:
        run_tasks = to_container(cfg)["tasks"]
        taught, notes = teacher_provenance(named, run_tasks, cfg.data, list(tasks))
    else:
        taught, notes = recorded_teachers(found, cfg.kd.cache_dir), []
    expected = fingerprint(
        {n: taught.get(n, []) for n in tasks},
        tasks,
        cfg.data,
        SampleList(cfg.data).train_digests() if train is None else train,
        stored_storage(found),
        int(found["storage"]["views"]),
    )
    check_fingerprint(found, expected, cfg.kd.cache_dir)
    maps = float(cfg.kd.features.map_weight) > 0
    cache = TeacherCache(cfg.kd.cache_dir, tasks, cfg.cache.verify == "full", found, maps)
    announce(expected["task_teachers"], notes)
    return cache


def map_stride(cfg: DictConfig) -> int | None:
    """The stride of the teacher feature maps a run caches and matches (``kd.features.map_weight``
    > 0), else None."""
    features = cfg.kd.features
    return int(features.map_stride) if float(features.map_weight) > 0 else None


def cached_features(cfg: DictConfig, ensemble: TeacherEnsemble) -> dict[str, Any] | None:
    """What the cache records of the teacher embeddings (``kd.features.weight`` > 0) and feature
    maps (``kd.features.map_weight`` > 0) it stores, else None. Views are refused: a batch does
    not say which cached view it drew, so a view's embedding could not be matched to it."""
    weight, stride = float(cfg.kd.features.weight), map_stride(cfg)
    if weight <= 0 and stride is None:
        return None
    if int(cfg.cache.views):
        raise ConfigError(
            f"kd.features.weight={weight} and kd.features.map_weight={cfg.kd.features.map_weight} "
            "need cache.views=0: the features of a replayed view cannot be matched to the view a "
            "batch drew"
        )
    found: dict[str, Any] = {
        "dtype": FEATURE_DTYPE,
        "teachers": [file_sha256(e.path) for e in ensemble.entries],
    }
    if weight > 0:
        found["dims"] = ensemble.feature_dims
    if stride is not None:
        found.update(map_stride=stride, map_shapes=ensemble.map_shapes(int(cfg.data.image_size)))
    if any(e.sources is not None for e in ensemble.entries):
        found["sources"] = [e.sources for e in ensemble.entries]
    return found


def cache_teacher(cfg: DictConfig) -> Path:
    """Predict every training sample (labeled and unlabeled) with the teachers (kd.teachers, else
    cache.teacher) and write the cache: per task, the teachers that have it; a task none has is
    left out (the student trains it on labels only). Under DDP each rank writes shards; rank 0
    merges after a barrier. With ``kd.features.weight`` > 0 it also stores each teacher's image
    embedding (``features_<i>.npy``), with ``kd.features.map_weight`` > 0 its encoder feature map
    (``feature_map_<i>.npy``), for feature-level KD."""
    run_tasks = to_container(cfg)["tasks"]
    ensemble = TeacherEnsemble(
        configured_teachers(cfg.kd.teachers, cfg.cache.teacher),
        run_tasks,
        cfg.data,
        map_stride(cfg),
    )
    tasks = ensemble.tasks
    taught = ensemble.provenance(list(run_tasks))
    announce(taught, ensemble.notes)
    storage = cache_storage(cfg)
    views = int(cfg.cache.views)
    features = cached_features(cfg, ensemble)
    dm = FundusDataModule(cfg.data, tasks, predict_views=views)
    cache_dir = Path(cfg.kd.cache_dir)
    check_replaceable(cache_dir)  # before the lock creates the folder and before any prediction
    with directory_lock(cache_dir, "mtkd cache-teacher"):
        if rank_zero_only.rank == 0:
            for orphan in remove_orphans(cache_dir):
                log.info(f"removed {orphan}, left by an interrupted cache-teacher")
        shard_dir = cache_dir.parent / f".{cache_dir.name}.partial-{run_token()}"
        writer = CacheShardWriter(shard_dir, tasks, storage, features is not None)
        trainer = make_trainer(cfg, None, [writer], logger=False)
        trainer.predict(ensemble, datamodule=dm, return_predictions=False)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            train_ids = dm.train_digests()
            fp = fingerprint(
                taught, build_tasks(run_tasks), cfg.data, train_ids, storage, views, features
            )
            merge_shards(shard_dir, cache_dir, tasks, fp, train_ids)
            summary = TeacherCache(cache_dir, tasks).nbytes_per_sample()
            sizes = "".join(f"\n  {n:<16} {b:>8} bytes/sample" for n, b in summary.items())
            log.info(
                f"teacher cache written to {cache_dir}: {len(train_ids)} samples x "
                f"{max(views, 1)} view(s){sizes}"
            )
        trainer.strategy.barrier()
    return cache_dir


def evaluate(
    ckpt: str,
    split: str,
    overrides: list[str],
    out: str | None = None,
    resolution: str = "working",
    joint: list[str] | None = None,
    bootstrap: int | None = None,
    sources: list[str] | None = None,
) -> dict[str, float]:
    """Test a teacher or student checkpoint on a split; print a table and write metrics JSON.

    ``sources`` scores the split's images of those data sources only (a model trained on the
    union of several datasets, per dataset: ``metrics_<split>-<source>.json``).

    ``resolution="original"`` scores segmentation on the original photographs' pixels inside the
    field of view (into ``metrics_<split>_original.json``); ``joint`` names classification task
    groups for joint accuracy (default: IDRiD's DR + DME when present). ``bootstrap`` resamples
    of the split's images (default ``BOOTSTRAP_RESAMPLES``, 0: none) give each metric a 95 %
    interval, computed in the rank-0 process over the whole split. Each ``derived:`` entry with a
    ``label`` is scored against it (``mtkd.derived``). See ``mtkd.evaluation``."""
    from mtkd.evaluation import (
        BOOTSTRAP_RESAMPLES,
        BOOTSTRAP_SEED,
        LEVEL,
        RESOLUTIONS,
        SplitRecorder,
        joint_groups,
    )
    from mtkd.outputs import check_output_file, check_saved_paths, default_output

    if split not in ("val", "test"):
        raise ValueError(f"split={split!r}: evaluate takes split=val or split=test")
    if resolution not in RESOLUTIONS:
        raise ValueError(
            f"resolution={resolution!r}: evaluate takes resolution=working or resolution=original"
        )
    resamples = BOOTSTRAP_RESAMPLES if bootstrap is None else bootstrap
    if resamples < 0:
        raise ValueError(f"bootstrap={resamples}: give a number of resamples >= 0 (0: none)")
    saved = read_checkpoint(ckpt)["hyper_parameters"]["config"]
    working = resolution == "working"
    only = f"-{'+'.join(sources)}" if sources else ""
    name = f"metrics_{split}{'' if working else '_original'}{only}.json"
    target = Path(out) if out else default_output(ckpt, name)
    check_output_file(target, ckpt)  # before any work: a bad out= used to fail after all of it
    cfg = apply_overrides(OmegaConf.create(saved), overrides)
    check_saved_paths(cfg.data, overrides, ckpt)
    check_same_network(saved, cfg, f"checkpoint {ckpt}")
    unknown = sorted(set(sources or []) - set(cfg.data.sources))
    if unknown:
        raise ValueError(
            f"sources={','.join(sources)}: {unknown} are not data sources of checkpoint {ckpt}; "
            f"it has {sorted(cfg.data.sources)}"
        )
    cls = STAGE_MODULES[cfg.stage]
    module = cls.load_from_checkpoint(
        ckpt, map_location="cpu", weights_only=True, config=to_container(without_pretrained(cfg))
    )
    groups = joint_groups(module.tasks, joint)
    derived = parse_derived(to_container(cfg.derived), module.tasks)
    scored = {name: entry for name, entry in derived.items() if entry.label}
    dm = FundusDataModule(cfg.data, module.tasks, scored_sources=sources)
    logger = make_logger(cfg, target.parent, job_type="evaluate")  # logs beside the metrics
    keep = bool(resamples or groups)
    recorder = SplitRecorder(module.tasks, dm, split, resolution, keep, scored)
    trainer = make_trainer(cfg, None, [*logger_callbacks(cfg, logger), recorder], logger)
    run = trainer.validate if split == "val" else trainer.test
    results = run(module, datamodule=dm, verbose=False)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    if trainer.is_global_zero:
        challenge, ci = recorder.results(split, groups, resamples)
        metrics.update(challenge)
        drawn = {"resamples": resamples, "seed": BOOTSTRAP_SEED, "level": LEVEL}
        bootstrap_info = None if ci is None else drawn
        where = (split if working else f"{split}, original resolution") + (
            f", {', '.join(sources)} images only" if sources else ""
        )
        print_metrics(metrics, f"{cfg.stage} on {where} ({ckpt})", ci)
        if ci:
            pixels = "" if working else " (segmentation on the original pixels)"
            print(
                f"  [lo, hi]: {LEVEL:.0%} percentile bootstrap interval over the {split} images "
                f"labeled for each task{pixels} ({resamples} resamples, seed {BOOTSTRAP_SEED})"
            )
        write_metrics(target, str(ckpt), split, metrics, ci, bootstrap_info, sources)
        log.info(f"metrics written to {target}")
    return metrics


def write_metrics(
    path: Path,
    ckpt: str,
    split: str,
    metrics: dict[str, float],
    ci: dict[str, list[float]] | None = None,
    bootstrap: dict[str, Any] | None = None,
    sources: list[str] | None = None,
) -> None:
    """Metrics JSON beside a run: {"checkpoint", "split", "metrics": {"<split>/<task>/<metric>": v}},
    with intervals "ci": {key: [lo, hi]} and "bootstrap": how they were drawn, and with
    ``sources`` "sources": the data sources scored (all when absent)."""
    payload: dict[str, Any] = {"checkpoint": ckpt, "split": split, "metrics": metrics}
    if ci is not None:
        payload.update(ci=ci, bootstrap=bootstrap)
    if sources:
        payload["sources"] = list(sources)
    atomic_write_bytes(path, json.dumps(payload, indent=1).encode())


@rank_zero_only
def print_metrics(
    metrics: dict[str, Any], title: str, ci: dict[str, list[float]] | None = None
) -> None:
    """Per-task table: one row per task (``<split>/<task>/<metric>``) or derived measure
    (``<split>/derived/<name>/<metric>``), one column per metric (with ``[lo, hi]`` from ``ci``)."""
    rows: dict[str, dict[str, str]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) >= 3:
            lo_hi = (ci or {}).get(key)
            interval = f" [{lo_hi[0]:.4f}, {lo_hi[1]:.4f}]" if lo_hi else ""
            row = "/".join(parts[1:-1])
            rows.setdefault(row, {})[parts[-1]] = f"{float(value):.4f}{interval}"
    print(f"\n{title}")
    for task, values in rows.items():
        cells = "  ".join(f"{k}={v}" for k, v in sorted(values.items()))
        print(f"  {task:<14} {cells}")
