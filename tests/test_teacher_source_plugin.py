"""The teacher-source example of docs/extending.md, a file outside the library
(``examples/extending/teacher_source.py``): built from ``kd.mode`` with its option, it teaches
one batch in ``every``."""

from __future__ import annotations

import pytest
import torch

from mtkd.config import ConfigError, to_container
from mtkd.modules.student import StudentModule
from mtkd.run_config import load_config
from tests.conftest import REPO

pytestmark = pytest.mark.unit

EXAMPLES = REPO / "examples" / "extending"


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import teacher_source

    return teacher_source


def test_the_student_builds_the_source_with_its_option(plugin) -> None:
    over = ["model=student", "plugins=[teacher_source]", "kd.mode={name: online_every, every: 3}"]
    student = StudentModule(to_container(load_config("distill", over)))
    source = student.teacher_source
    assert type(source) is plugin.OnlineEvery and source.every == 3
    assert not source.reads_cache  # the data module needs no teacher cache


def test_it_teaches_one_batch_in_every(plugin) -> None:
    ensemble = torch.nn.Identity()  # stands in for the frozen teachers: image -> "outputs"
    source = plugin.OnlineEvery(ensemble, every=3)
    taught = [bool(source.outputs({"image": torch.ones(1)})) for _ in range(7)]
    assert taught == [True, False, False, True, False, False, True]


def test_its_options_are_checked(plugin) -> None:
    with pytest.raises(
        ConfigError, match=r"'online_every': unknown options \['evry'\]; valid options: every$"
    ):
        load_config(
            "distill", ["plugins=[teacher_source]", "kd.mode={name: online_every, evry: 3}"]
        )
    with pytest.raises(ValueError, match="every=0 must be >= 1"):
        plugin.OnlineEvery(every=0)
