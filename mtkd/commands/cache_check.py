"""``mtkd cache-check``: the full check of a teacher cache, too slow to run at every open."""

from __future__ import annotations

from pathlib import Path

from mtkd.commands.args import Arg, Command, Spec, parse_args

ARGS = Spec({"kd.cache_dir": Arg("the teacher cache to check", required="DIR")})


def main(args: list[str]) -> None:
    """Hash every file of a cache against its checksums.json, one line per file as it passes:
    the check too slow to run at every open of a large cache. A failure raises, naming the file
    and the rebuild command (the CLI's exit code 2)."""
    from mtkd.kd.cache import checked_files, read_fingerprint

    opts, _ = parse_args("cache-check", ARGS, args)
    cache_dir = Path(opts["kd.cache_dir"])
    for name, record in checked_files(cache_dir, read_fingerprint(cache_dir), full=True):
        print(f"ok  {name}  {record['bytes']} bytes  sha256 {record['sha256'][:16]}", flush=True)
    print(f"teacher cache {cache_dir}: every file matches its checksum")


COMMAND = Command(
    "cache-check",
    "hash every file of a teacher cache (kd.cache_dir=DIR; distill's own open checks sizes and "
    "headers only, or everything with cache.verify=full)",
    ARGS,
    main,
)
