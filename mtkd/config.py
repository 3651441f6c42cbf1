"""Structured configuration: dataclass schema, YAML groups on a search path, key=value overrides.

A run's config is ``<stage>.yaml`` whose ``defaults`` pick one YAML per group (``data/``,
``model/``, ``tasks/``, ``trainer/``, ``logger/``, ``kd/``, ``profile/``), merged onto the schema
below, then command-line overrides: ``group=option`` swaps a group (``option`` a name or a YAML file
path), ``a.b=value`` sets a value, ``~a.b`` removes a map entry (e.g. ``~tasks.cdr`` drops a task);
values and removals apply in the order given, so ``~tasks.cdr tasks.cdr={...}`` replaces a task.
Files are looked up on the search path: ``config_dir=DIR`` folders, ``MTKD_CONFIG_PATH``, then the
built-in configs shipped in the package (``mtkd/configs/``). Unknown keys and wrong types fail
before any work, listing what is valid.

``experiment=NAME[:SECTION]`` applies a recipe, ``experiments/NAME.yaml`` (or a YAML file path):
an override set that may pick group options (``defaults:``, as a stage file does) and set
values, with optional ``sections:`` for the several runs of one pipeline. Precedence, lowest
first: the stage file's group choices, the profile's, the experiment's, the command line's; then
the values of the groups, the stage file, the profile, the experiment (top level, then the
section), the command line (read_experiment).

This module needs nothing above the project's small helpers: it composes a config and runs the
checks the config alone can answer (``check``). ``mtkd.run_config`` gives a stage its config:
composed here, then its normalisation filled in from the encoder and its choices checked against
the registries of the layers that define them.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

GROUPS = ("profile", "data", "model", "tasks", "trainer", "logger", "kd")


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who typed it."""


@dataclass
class SourceConfig:
    kind: str = "manifest"
    root: str = "data"
    options: dict[str, Any] = field(default_factory=dict)
    label_map: dict[str, str] = field(default_factory=dict)
    unlabeled: bool = False
    #: side its images are FOV-cropped, enhanced and cached at before one resize to the working
    #: size data.image_size, which every batch has (null: data.image_size itself; see
    #: data_modules.preprocess.source_sizes)
    preprocess_size: int | None = None


@dataclass
class PreprocessConfig:
    fov_crop: bool = True
    clahe: bool = False
    local_mean: bool = False
    cache_dir: str | None = "data/.preprocessed"


@dataclass
class DataConfig:
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    image_size: int = 128
    batch_size: int = 16
    eval_batch_size: int = 32
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    split_file: str | None = None
    stratify_on: str | None = None
    label_fraction: float = 1.0
    augment: list[dict[str, Any]] = field(default_factory=list)
    #: input normalisation; null follows the encoder's pretraining (mtkd.run_config fills it in)
    mean: list[float] | None = None
    std: list[float] | None = None
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    #: an image that cannot be decoded: "error" lists every bad one before work, "skip" drops them
    on_bad_image: str = "error"


@dataclass
class ModelConfig:
    encoder: str = "resnet18"
    encoder_weights: str | None = None
    encoder_depth: int = 5
    decoder_channels: list[int] = field(default_factory=lambda: [128, 64, 32, 16, 16])
    head_dropout: float = 0.0
    #: standardise the pooled features the global heads read (BatchNorm, ``PooledNorm``); false
    #: for checkpoints from before it existed, true in model=student
    pooled_norm: bool = False
    #: run the convolutions in channels-last (NHWC) layout: on this 2-core CPU a training step is
    #: ~1.2x faster for the ResNet-18 teacher and ~1.5x for the MobileNetV3 student (bench/RESULTS.md);
    #: the layout leaves the weights' values alone, so any checkpoint loads with either
    channels_last: bool = True


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    #: a registered schedule: a name or {name: ..., **options} (mtkd.modules.optim)
    scheduler: Any = "cosine"
    warmup_epochs: int = 0
    #: learning rate of the encoder relative to optim.lr (e.g. 0.1 for a pretrained encoder)
    encoder_lr_mult: float = 1.0
    #: epochs at the start during which the encoder is frozen (weights and BatchNorm statistics)
    freeze_encoder_epochs: int = 0


@dataclass
class LoggerConfig:
    #: a registered logger: a name or {name: ..., **options} (mtkd.tracking.loggers)
    kind: Any = "csv"
    project: str = "mtkd"
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    log_images: bool = True


@dataclass
class TeacherConfig:
    """One entry of ``kd.teachers``: a checkpoint and the tasks it teaches (null: all of its
    tasks the run has; a list: those; a map: teacher task -> the run's task of another name)."""

    path: str = MISSING
    tasks: Any = None
    #: the data sources (names under data.sources) whose images it teaches; null: every source.
    #: On the other sources' images its tasks are taught by the other teachers, or on labels only
    sources: list[str] | None = None


@dataclass
class FeatureKDConfig:
    #: weight of the embedding loss mean_b ||a(f_s)/|a(f_s)| - f_t/|f_t|||^2 per teacher (Li &
    #: Bilen 2020, on the global pooled vector); 0: off (cache-teacher then stores no embeddings)
    weight: float = 0.0
    #: each teacher's embedding length; null: read from the cache (then kept in the checkpoint)
    dims: list[int] | None = None
    #: weight of the dense variant: per teacher a 1x1 conv maps the student's encoder feature
    #: map at ``map_stride`` onto the teacher's, the same distance per pixel; 0: off
    #: (cache-teacher then stores no maps: C x h x w float16 per teacher and sample when on)
    map_weight: float = 0.0
    #: the encoder stride of the matched maps (16: a 96 px image's 6 x 6 stage-4 features)
    map_stride: int = 16
    #: each teacher's feature map channels; null: read from the cache (then in the checkpoint)
    map_channels: list[int] | None = None


@dataclass
class KDConfig:
    #: a registered teacher source: a name or {name: ..., **options} (mtkd.kd.teacher_source)
    mode: Any = "cached"
    cache_dir: str = "runs/teacher_cache"
    #: one teacher with all its tasks (shorthand for kd.teachers=[{path: ...}])
    teacher: str | None = None
    #: specialist teachers, each with its own task set, image size and normalisation
    teachers: list[TeacherConfig] = field(default_factory=list)
    alpha: float = 0.5
    temperature: float | None = None
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: feature-level KD: a learned adaptor per teacher maps the student's pooled features to
    #: that teacher's cached ones (mtkd.modules.student)
    features: FeatureKDConfig = field(default_factory=FeatureKDConfig)


@dataclass
class CacheConfig:
    teacher: list[str] = field(default_factory=lambda: ["runs/teacher/checkpoints/best.ckpt"])
    #: side in pixels of cached dense teacher maps; null: the working size (data.image_size),
    #: which keeps thin structures such as vessels (a 32 px cache of 96 px vessel maps loses
    #: them: bench/bench_cache_resolution.py). Smaller saves disk and I/O where structures are
    #: large; cache-teacher says what each size keeps.
    dense_size: int | None = None
    #: per-task side, e.g. {anatomy: 96, lesions: 48}; a task not named takes dense_size
    task_dense_size: dict[str, int] = field(default_factory=dict)
    dense_dtype: str = "uint8"
    logits_dtype: str = "float16"
    views: int = 0
    #: what distill checks of the cache's files when it opens it: quick (each file's size and
    #: .npy header, milliseconds whatever the cache size) or full (also every byte against the
    #: sha256 recorded when it was written: minutes for a large cache, on every rank). Only full
    #: finds bytes overwritten in place at the same size; so does `mtkd cache-check`.
    verify: str = "quick"


@dataclass
class RunConfig:
    dir: str = "runs/teacher"
    seed: int = 0
    monitor: str | None = None
    #: a registered strategy: a name or {name: ..., **options} (mtkd.modules.weighting)
    weighting: Any = "fixed"
    #: checkpoint to resume training from (continues the same W&B run)
    resume: str | None = None
    #: train into a run.dir that holds a run (its checkpoints), replacing it
    overwrite: bool = False
    #: intra-op threads per process; null: the cores divided among the node's processes, or
    #: OMP_NUM_THREADS when set (see mtkd.threads)
    threads: int | None = None


@dataclass
class Config:
    stage: str = "teacher"
    #: the recipe the config was composed with (``experiment=NAME[:SECTION]``), so a saved
    #: config names the experiment file that produced the run; null: none
    experiment: str | None = None
    #: modules imported before the tasks are built: where your own task kinds register
    plugins: list[str] = field(default_factory=list)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    #: measures derived from the predicted masks and points (mtkd.derived): name ->
    #: {measure: <registered>, <input>: <task>.<layer>, label: <label to score>, **options}
    derived: dict[str, dict[str, Any]] = field(default_factory=dict)


#: the built-in stage files and groups, shipped as package data
BUILTIN_CONFIGS = Path(__file__).resolve().parent / "configs"
#: user config folders searched before the built-in ones, os.pathsep-separated
CONFIG_PATH_ENV = "MTKD_CONFIG_PATH"
#: the former name of MTKD_CONFIG_PATH, read when MTKD_CONFIG_PATH is unset
LEGACY_CONFIG_ENV = "MTKD_EXPERIMENTS"
#: the folder of experiment recipes: ``experiment=NAME`` reads ``experiments/NAME.yaml`` in the
#: config_dir= and MTKD_CONFIG_PATH folders, then in the working directory (a project's top level)
EXPERIMENTS = "experiments"
#: the stages a config is composed for (cache-teacher composes distill's), with their commands
STAGE_COMMANDS = {"teacher": "mtkd train-teacher", "distill": "mtkd distill or mtkd cache-teacher"}


def search_path(overrides: Sequence[str] = ()) -> tuple[list[Path], list[str]]:
    """Split the ``config_dir=DIR`` items off ``overrides`` -> (search path, other overrides).

    The path is first match wins: the ``config_dir=`` folders in order, then ``MTKD_CONFIG_PATH``,
    then the built-in configs, so a user folder adds group options and can shadow built-in ones.
    """
    dirs = [o.split("=", 1)[1] for o in overrides if o.startswith("config_dir=")]
    rest = [o for o in overrides if not o.startswith("config_dir=")]
    env = os.environ.get(CONFIG_PATH_ENV, os.environ.get(LEGACY_CONFIG_ENV, ""))
    path = []
    named = [(d, f"config_dir={d}") for d in dirs]
    named += [(e, f"{CONFIG_PATH_ENV} entry {e}") for e in env.split(os.pathsep) if e]
    for entry, given in named:
        folder = Path(entry).expanduser()
        if folder.exists() and not folder.is_dir():
            raise ConfigError(
                f"{given} is a file; config_dir and {CONFIG_PATH_ENV} take folders of "
                "<group>/<option>.yaml files: give its folder, or pass the file as group=FILE "
                "(e.g. data=./my_data.yaml)"
            )
        if not folder.is_dir():
            raise ConfigError(
                f"config folder {entry} does not exist; fix config_dir= or {CONFIG_PATH_ENV}"
            )
        path.append(folder.resolve())
    return [*path, BUILTIN_CONFIGS], rest


def find_config(
    group: str, option: str, path: Sequence[Path], subfolder: str | None = None
) -> Path:
    """The YAML file of ``group=option``: ``option`` itself when it is a file path (ends in
    ``.yaml``/``.yml`` or holds a ``/``), else ``<folder>/<group>/<option>.yaml`` in the first
    folder of ``path`` that has it (``group=""``: a stage file at the top of each folder;
    ``subfolder``: the folder's name where it is not ``group``, as ``experiments/`` for
    ``experiment=``)."""
    label = f"{group}={option}" if group else f"stage config {option!r}"
    group = group if subfolder is None else subfolder
    if option.endswith((".yaml", ".yml")) or "/" in option or os.sep in option:
        file = Path(option).expanduser()
        if not file.is_file():
            raise ConfigError(
                f"{label}: no such file; give an existing YAML file or an option name"
            )
        return file
    for folder in path:
        if (folder / group / f"{option}.yaml").is_file():
            return folder / group / f"{option}.yaml"
    options = sorted({p.stem for folder in path for p in (folder / group).glob("*.yaml")})
    where = ", ".join(str(folder / group) for folder in path)
    raise ConfigError(
        f"{label}: no such config in {where}; choose one of {options} or give a YAML file path"
    )


def read_group(group: str, option: str, path: Sequence[Path]) -> DictConfig:
    """Load the YAML of ``group=option`` found on ``path`` (see find_config)."""
    return _read_yaml(find_config(group, option, path))


def _read_yaml(path: Path) -> DictConfig:
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as exc:
        raise yaml_error(path, exc) from None


def yaml_error(path: str | Path, exc: yaml.YAMLError) -> ConfigError:
    """A YAML parse failure as ``file:line:column: YAML syntax error: ...`` (the line and
    column where YAML gives them)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    return ConfigError(f"{where}: YAML syntax error: {problem}")


def key_problem(key: str) -> str | None:
    """What is wrong with ``key`` (``a.b.c``) as a config key, listing the valid ones; None for
    a key of the schema, a group (``model``) or any key under an open map (``tasks``,
    ``trainer``, ``data.sources``...), whose entries are checked when the config is built."""
    if key in GROUPS:
        return None
    node: Any = OmegaConf.structured(Config)
    parts = key.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "the top level"
        if not isinstance(node, DictConfig):
            return f"{where} is a value, it has no key {part!r}"
        if OmegaConf.get_type(node) is dict:
            return None
        if part not in node:
            return f"{where} has no key {part!r}; valid keys: {', '.join(sorted(node))}"
        node = node[part]
    return None


def _split_overrides(overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    """-> (group choices, the ``a.b=value`` items and ``~a.b`` removals in the order given)."""
    groups, edits = {}, []
    for item in overrides:
        if item.startswith("~") and "=" not in item:
            edits.append(item)
            continue
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        if key in GROUPS:
            groups[key] = value
        else:
            edits.append(item)
    return groups, edits


def _apply_edits(cfg: DictConfig, edits: list[str], schema: DictConfig) -> DictConfig:
    """Apply ``a.b=value`` items and ``~a.b`` removals in the order given, so that
    ``~tasks.dr_grade tasks.dr_grade={kind: regression}`` replaces the task instead of removing
    it (consecutive values are merged at once)."""
    values: list[str] = []
    for item in [*edits, None]:
        if item is not None and not item.startswith("~"):
            values.append(item)
            continue
        if values:
            try:
                cfg = OmegaConf.merge(cfg, dotlist(values))
            except OmegaConfBaseException as exc:
                raise _explain(exc, schema) from None
            values = []
        if item is not None:
            _remove(cfg, item[1:])
    return cfg


def dotlist(items: list[str]) -> DictConfig:
    """``a.b=value`` items as a config (``OmegaConf.from_dotlist``); a value that is not valid
    YAML is a ConfigError naming the item, not a YAML scanner's traceback."""
    try:
        return OmegaConf.from_dotlist(items)
    except yaml.YAMLError:
        bad = next(i for i in items if not _parses(i))
        raise ConfigError(
            f"{bad}: the value is not valid YAML; in a {{...}} map put a space after each colon "
            "(kd.tasks={dr_grade: {temperature: 1}}) and quote the item for the shell, or set "
            "one key at a time (kd.tasks.dr_grade.temperature=1)"
        ) from None


def _parses(item: str) -> bool:
    try:
        OmegaConf.from_dotlist([item])
    except yaml.YAMLError:
        return False
    return True


def _remove(cfg: DictConfig, key: str) -> None:
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        raise ConfigError(f"cannot remove ~{key}: no such key")
    try:
        del parent[leaf]
    except OmegaConfBaseException:
        raise ConfigError(
            f"cannot remove ~{key}: only entries of tasks, data.sources and similar maps can be removed"
        ) from None


def _valid_keys(node: Any) -> list[str]:
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _explain(exc: OmegaConfBaseException, schema: DictConfig) -> ConfigError:
    """One line: the key, OmegaConf's reason (its first line, not the type dump under it) and
    the valid keys where it was set; under a map entry such as ``data.sources.<name>``, which
    the schema holds no example of, the keys of the entry's dataclass."""
    key = getattr(exc, "full_key", None) or ""
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    node = OmegaConf.select(schema, parent) if parent else schema
    entry = getattr(exc, "object_type", None)
    valid = _valid_keys(node) or (
        sorted(f.name for f in fields(entry)) if is_dataclass(entry) else []
    )
    hint = f"; valid keys under {parent or 'the top level'}: {', '.join(valid)}" if valid else ""
    reason = str(exc.msg if hasattr(exc, "msg") else exc).splitlines()[0]
    return ConfigError(f"config error at {key or '?'}: {reason}{hint}")


@dataclass
class Recipe:
    """What an experiment file gives one stage: group choices, and values in the order applied."""

    file: Path
    groups: dict[str, str]
    values: list[DictConfig]


def _split_experiment(overrides: list[str]) -> tuple[str | None, list[str]]:
    """-> (the value of the ``experiment=`` item or None, the other overrides)."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")]
    if len(given) > 1:
        raise ConfigError(
            f"experiment= given {len(given)} times ({', '.join(given)}); give one: an experiment "
            "file holds a run's recipe, its sections the runs of a pipeline"
        )
    rest = [o for o in overrides if not o.startswith("experiment=")]
    return (given[0] if given else None), rest


def read_experiment(choice: str, stage: str, path: Sequence[Path]) -> Recipe:
    """The part of ``experiment=NAME[:SECTION]`` that applies to ``stage``: the file's top level,
    then its section SECTION of ``sections:`` (default: the one named after the stage; a file
    with sections but none for the stage needs one named). In each part ``defaults:`` picks
    group options and ``stage:`` says which stage it is for (a section named ``teacher`` or
    ``distill`` is for that stage); ``command:`` says what reproduces the experiment's results
    and is for people. NAME is a YAML file path, or ``experiments/NAME.yaml`` found in the
    config_dir= and MTKD_CONFIG_PATH folders, then in the working directory."""
    name, _, section = choice.partition(":")
    folders = [*(p for p in path if p != BUILTIN_CONFIGS), Path.cwd()]
    file = find_config("experiment", name, folders, subfolder=EXPERIMENTS)
    spec = _read_yaml(file)
    if not isinstance(spec, DictConfig):
        raise ConfigError(f"{file} holds a list; an experiment is a mapping of config values")
    spec.pop("command", None)
    sections = spec.pop("sections", None) or OmegaConf.create({})
    if not isinstance(sections, DictConfig) or not all(
        isinstance(v, DictConfig) for v in sections.values()
    ):
        raise ConfigError(f"{file}: sections must map section names to mappings of config values")
    section = section or (stage if stage in sections else "")
    if not section and sections:
        raise ConfigError(
            f"experiment={name} has no {stage} section; pick one of {sorted(sections)} with "
            f"experiment={name}:<section>"
        )
    if section and section not in sections:
        raise ConfigError(
            f"experiment={choice}: {file} has no section {section!r}; its sections are "
            f"{sorted(sections)}"
        )
    parts = [(spec, None), *([(sections[section], section)] if section else [])]
    groups: dict[str, str] = {}
    for part, label in parts:
        meant = part.pop("stage", label if label in STAGE_COMMANDS else None)
        if meant not in (None, stage):
            raise ConfigError(
                f"experiment={choice} is for the {meant} stage, not {stage}; run it with "
                f"{STAGE_COMMANDS.get(meant, f'the {meant} stage')}"
            )
        chosen = dict(part.pop("defaults", None) or {})
        unknown = sorted(set(chosen) - set(GROUPS))
        if unknown:
            raise ConfigError(
                f"{file}: defaults names {unknown}, which are not groups; groups are "
                f"{', '.join(GROUPS)}"
            )
        groups.update(chosen)
    return Recipe(file, groups, [part for part, _ in parts])


def compose(stage: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose ``<stage>.yaml`` + groups + an ``experiment=`` recipe + overrides, found on the
    search path (``config_dir=`` items of ``overrides``, ``MTKD_CONFIG_PATH``, the built-in
    configs), into a config of the schema that passed ``check``; the command line wins over the
    recipe, the recipe over the stage's defaults (see read_experiment). A stage's config is
    ``mtkd.run_config.load_config``, which also fills in and checks what needs the layers above."""
    path, rest = search_path(list(overrides or []))
    experiment, rest = _split_experiment(rest)
    recipe = read_experiment(experiment, stage, path) if experiment is not None else None
    base = read_group("", stage, path)
    group_choice, edits = _split_overrides(rest)
    chosen = {**(recipe.groups if recipe is not None else {}), **group_choice}
    choices = dict(base.pop("defaults", {}) or {})
    if "profile" in chosen or "profile" in choices:
        profile = read_group("profile", chosen.get("profile", choices.get("profile")), path)
        choices.update(profile.pop("defaults", {}) or {})
    else:
        profile = OmegaConf.create({})
    choices.update(chosen)
    schema = OmegaConf.structured(Config)
    layers = [
        OmegaConf.create({g: read_group(g, c, path)}) for g, c in choices.items() if g != "profile"
    ]
    try:
        cfg = OmegaConf.merge(schema, *layers, base, profile)
    except (ConfigKeyError, OmegaConfBaseException) as exc:
        raise _explain(exc, schema) from None
    if recipe is not None:
        try:
            cfg = OmegaConf.merge(cfg, *recipe.values)
        except OmegaConfBaseException as exc:
            raise ConfigError(
                f"experiment={experiment} ({recipe.file}): {_explain(exc, schema)}"
            ) from None
    cfg = _apply_edits(cfg, edits, schema)
    cfg.stage = stage
    cfg.experiment = experiment
    check(cfg)
    return cfg


#: groups that can be swapped on a saved config (how to run it, not what was trained)
RUNTIME_GROUPS = ("trainer", "logger")


def recompose(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """Apply overrides to an existing config (e.g. one saved in a checkpoint): ``a.b=value``, and
    ``trainer=<option>`` / ``logger=<option>``, which replace that group by its YAML (found on the
    search path, ``config_dir=`` items included); the result passed ``check``. A stage reads a
    saved config through ``mtkd.run_config.apply_overrides``, which checks the rest."""
    schema = OmegaConf.structured(Config)
    path, rest = search_path(list(overrides))
    if any(o.startswith("experiment=") for o in rest):
        raise ConfigError(
            "experiment= composes a new run (train-teacher, cache-teacher, distill); a saved "
            "config takes a.b=value, trainer= and logger="
        )
    groups, edits = _split_overrides(rest)
    removals = [e for e in edits if e.startswith("~")]
    if removals:
        raise ConfigError(f"{removals[0]}: removals are not supported on a saved config")
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    for group, choice in groups.items():
        if group not in RUNTIME_GROUPS:
            raise ConfigError(
                f"{group}={choice}: only {' and '.join(RUNTIME_GROUPS)} can be swapped on a saved "
                f"config; set single values with {group}.<key>=value"
            )
        cfg[group] = read_group(group, choice, path)
    try:
        merged = OmegaConf.merge(schema, cfg, dotlist(edits))
    except OmegaConfBaseException as exc:
        raise _explain(exc, schema) from None
    check(merged)
    return merged


def check(cfg: DictConfig) -> None:
    """The checks the schema cannot express that need only the config: a task set, the task
    names other sections refer to, the teachers' entries, value choices and numeric ranges.
    The checks against the registries, the Trainer and the task kinds are
    ``mtkd.run_config.validate``'s."""
    if not cfg.tasks:
        raise ConfigError("no tasks configured; pick a task set, e.g. tasks=synthetic")
    check_choices(
        {
            "cache.dense_dtype": (cfg.cache.dense_dtype, ["uint8", "float16", "float32"]),
            "cache.logits_dtype": (cfg.cache.logits_dtype, ["float16", "float32"]),
            "cache.verify": (cfg.cache.verify, ["quick", "full"]),
            "data.on_bad_image": (cfg.data.on_bad_image, ["error", "skip"]),
        }
    )
    unknown_kd = sorted(set(cfg.kd.tasks) - set(cfg.tasks))
    if unknown_kd:
        raise ConfigError(
            f"kd.tasks names unknown tasks {unknown_kd}; tasks are {sorted(cfg.tasks)}"
        )
    unknown_cache = sorted(set(cfg.cache.task_dense_size) - set(cfg.tasks))
    if unknown_cache:
        raise ConfigError(
            f"cache.task_dense_size names unknown tasks {unknown_cache}; tasks are "
            f"{sorted(cfg.tasks)}"
        )
    for i, entry in enumerate(cfg.kd.teachers):
        if OmegaConf.is_missing(entry, "path"):
            raise ConfigError(f"kd.teachers[{i}] has no path; give {{path: <teacher.ckpt>}}")
        taught = entry.tasks
        if taught is not None and not isinstance(taught, ListConfig | DictConfig):
            raise ConfigError(
                f"kd.teachers[{i}].tasks={taught!r}: give a list of task names, a map "
                "teacher_task: run_task, or null for all of the teacher's tasks"
            )
        named = sorted(set(taught.values() if isinstance(taught, DictConfig) else taught or []))
        unknown = [n for n in named if n not in cfg.tasks]
        if unknown:
            raise ConfigError(
                f"kd.teachers[{i}] ({entry.path}) teaches {unknown}, which are not tasks of this "
                f"run; tasks are {sorted(cfg.tasks)}"
            )
        strange = [n for n in entry.sources or [] if n not in cfg.data.sources]
        if strange or (entry.sources is not None and not entry.sources):
            raise ConfigError(
                f"kd.teachers[{i}].sources={list(entry.sources)} names no source or unknown "
                f"ones {strange}; the run's sources are {sorted(cfg.data.sources)} (null: all)"
            )
    # Numbers the schema types but cannot bound: key -> (test, valid range for the message).
    at_least = lambda lo: (lambda v: v >= lo, f">= {lo}")  # noqa: E731
    fraction = (lambda v: 0 <= v < 1, "in [0, 1)")
    ranges = {
        "kd.alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
        "kd.temperature": (lambda v: v > 0, "> 0 (or null for each task's default)"),
        "data.image_size": at_least(32),
        "data.batch_size": at_least(1),
        "data.eval_batch_size": at_least(1),
        "data.num_workers": at_least(0),
        "data.val_fraction": fraction,
        "data.test_fraction": fraction,
        "data.label_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
        "optim.lr": (lambda v: v > 0, "> 0"),
        "optim.weight_decay": at_least(0),
        "optim.warmup_epochs": at_least(0),
        "optim.encoder_lr_mult": (lambda v: v > 0, "> 0 (freeze with optim.freeze_encoder_epochs)"),
        "optim.freeze_encoder_epochs": at_least(0),
        "cache.views": at_least(0),
        "kd.features.map_weight": at_least(0),
        "trainer.max_epochs": at_least(1),
    }
    maps = (
        lambda v: 1 <= v <= cfg.data.image_size,
        f"in [1, data.image_size={cfg.data.image_size}]",
    )
    ranges["cache.dense_size"] = maps
    for name in cfg.cache.task_dense_size:
        ranges[f"cache.task_dense_size.{name}"] = maps
    for name in cfg.data.sources:
        ranges[f"data.sources.{name}.preprocess_size"] = (
            lambda v: v >= 32,
            ">= 32 (or null: data.image_size)",
        )
    for name in cfg.kd.tasks:
        ranges[f"kd.tasks.{name}.alpha"] = ranges["kd.alpha"]
        ranges[f"kd.tasks.{name}.temperature"] = ranges["kd.temperature"]
    for key, (ok, valid) in ranges.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and not (isinstance(value, int | float) and ok(value)):
            raise ConfigError(f"{key}={value!r} is out of range: it must be {valid}")
    check_map_stride(cfg)
    if cfg.data.val_fraction + cfg.data.test_fraction >= 1:
        raise ConfigError(
            f"data.val_fraction + data.test_fraction = "
            f"{cfg.data.val_fraction + cfg.data.test_fraction} leaves no training data; "
            "their sum must be < 1"
        )


def check_map_stride(cfg: DictConfig) -> None:
    """With dense feature KD on, ``kd.features.map_stride`` must be a stride of the student's
    encoder (2 .. 2**model.encoder_depth) that divides data.image_size (whole map cells)."""
    features = cfg.kd.features
    if features.map_weight <= 0:
        return
    stride, depth, size = features.map_stride, cfg.model.encoder_depth, cfg.data.image_size
    strides = [2**i for i in range(1, depth + 1)]
    if stride not in strides or size % stride:
        raise ConfigError(
            f"kd.features.map_stride={stride} must be one of the encoder's strides {strides} "
            f"(model.encoder_depth={depth}) that divides data.image_size={size}"
        )


def check_choices(choices: dict[str, tuple[Any, list[str]]]) -> None:
    """Each ``key: (value, allowed values)`` fails unless its value is allowed."""
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {allowed}")


def import_plugins(modules: list[str]) -> None:
    """Import user modules (e.g. ones defining ``@register_task`` kinds) by dotted name."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(
                f"plugins: cannot import {name!r} ({exc}); make it importable (installed, or on PYTHONPATH)"
            ) from None


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Plain dict (for checkpoints: loadable with ``torch.load(weights_only=True)``)."""
    return OmegaConf.to_container(cfg, resolve=True)


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Save the resolved config atomically as YAML."""
    from data_modules.io import atomic_write_bytes

    atomic_write_bytes(path, OmegaConf.to_yaml(cfg, resolve=True).encode())
