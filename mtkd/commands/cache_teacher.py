"""``mtkd cache-teacher``: write the teacher outputs that distill reads."""

from __future__ import annotations

from mtkd.commands.args import CONFIG_OVERRIDES, Arg, Command, Spec, parse_args

ARGS = Spec(
    {"teacher": Arg("a teacher checkpoint (added to a kd.teachers list)", many=True)},
    overrides=CONFIG_OVERRIDES,
)


def main(args: list[str]) -> None:
    from mtkd.config import TeacherConfig
    from mtkd.run_config import load_config
    from mtkd.stages import cache_teacher

    opts, rest = parse_args("cache-teacher", ARGS, args)
    teachers = opts["teacher"]
    if teachers:
        rest.append(f"cache.teacher=[{','.join(teachers)}]")
    cfg = load_config("distill", rest)
    if teachers and cfg.kd.teachers:  # teacher= adds whole teachers to the configured list
        cfg.kd.teachers.extend([TeacherConfig(path=t) for t in teachers])
    cache_teacher(cfg)


COMMAND = Command(
    "cache-teacher",
    "cache teacher outputs for distillation (teacher=CKPT [teacher=CKPT2 ...], or a kd.teachers "
    "list; teachers may be specialists with their own task sets)",
    ARGS,
    main,
)
