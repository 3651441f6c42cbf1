"""Messages that send the user the right way (issue 21, 2.8): a damaged or unsafe weights file or
checkpoint is named with its key and what is wrong, never with torch's hint to turn
``weights_only`` off; a checkpoint of another stage or network is refused naming the keys that
differ; a bad sweep file is named with its line; ``config_dir=`` a file says it is one."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import yaml

from mtkd.cli import main
from mtkd.commands.sweeps import load_sweep
from mtkd.config import ConfigError, search_path, to_container
from mtkd.models.pretrained import read_state
from mtkd.modules.checkpoint import SafeCheckpointIO, check_same_network, read_checkpoint
from mtkd.run_config import load_config

pytestmark = pytest.mark.unit


class _RunsCode:
    """Unpickling this calls ``print``: the smallest payload a weights-only load must refuse."""

    def __reduce__(self):
        return (print, ("unpickled",))


def _saved_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _bad_files(folder: Path) -> dict[str, Path]:
    """One file per way a weights file goes wrong, by the words its message must hold."""
    whole = _saved_bytes({"conv.weight": torch.zeros(2, 2)})
    files = {
        "is truncated or damaged": whole[: len(whole) // 2],
        "is an empty file": b"",
        "is not a file torch.save wrote": b"weights, in prose\n",
        "cannot be read safely": _saved_bytes({"conv.weight": _RunsCode()}),
    }
    paths = {}
    for i, (problem, data) in enumerate(files.items()):
        paths[problem] = folder / f"bad{i}.pth"
        paths[problem].write_bytes(data)
    return paths


def test_a_bad_encoder_weights_file_is_named_with_its_key_and_what_is_wrong(tmp_path):
    for problem, path in _bad_files(tmp_path).items():
        with pytest.raises(ConfigError) as err:
            read_state(path)
        message = str(err.value)
        assert message.startswith(f"model.encoder_weights={path} {problem}"), message
        assert "weights_only" not in message  # torch's hint to run the file's code
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(
        ConfigError, match="is not a state dict of named tensors: it holds a Tensor"
    ):
        read_state(tensor)


def test_the_cli_names_an_unsafe_encoder_weights_file_as_a_problem_not_a_bug(
    tiny, tmp_path, capsys
):
    unsafe = _bad_files(tmp_path)["cannot be read safely"]
    assert main(["train-teacher", *tiny(**{"model.encoder_weights": unsafe})]) == 2
    err = capsys.readouterr().err
    assert f"model.encoder_weights={unsafe} cannot be read safely" in err
    assert "mtkd loads only weights-only files" in err
    assert "unexpected" not in err and "report it" not in err and "weights_only" not in err


def test_unsafe_or_damaged_checkpoints_are_refused_without_torchs_weights_only_hint(tmp_path):
    for problem, path in _bad_files(tmp_path).items():
        for read in (read_checkpoint, SafeCheckpointIO().load_checkpoint):
            with pytest.raises(ConfigError) as err:
                read(path)
            message = str(err.value)
            assert message.startswith(f"checkpoint {path} {problem}"), message
            assert "weights_only" not in message
    unsafe = _bad_files(tmp_path)["cannot be read safely"]
    with pytest.raises(ConfigError, match="use a checkpoint mtkd wrote"):
        read_checkpoint(unsafe)


def test_a_checkpoint_of_another_stage_or_network_is_refused_naming_the_keys(tiny):
    teacher = load_config("teacher", tiny())
    student = load_config("distill", [*tiny(), "model.decoder_channels=[32,16,8,8,8]"])
    with pytest.raises(ConfigError) as err:
        check_same_network(to_container(student), teacher, "run.resume=s.ckpt")
    message = str(err.value)
    assert message.startswith("run.resume=s.ckpt was trained as another network than this run's")
    assert "stage is distill there, teacher here" in message
    assert "model.decoder_channels is [32, 16, 8, 8, 8] there" in message
    assert "model.encoder " not in message  # only the keys that differ
    # The same network with other dropout or start weights passes.
    same = to_container(teacher)
    same["model"].update(head_dropout=0.5, encoder_weights="imagenet")
    check_same_network(same, teacher, "run.resume=t.ckpt")
    same["tasks"].pop("cdr")  # the task check still runs
    with pytest.raises(ValueError, match=r"differing: \['cdr'\]"):
        check_same_network(same, teacher, "run.resume=t.ckpt")


SWEEP = {
    "program": "mtkd",
    "method": "grid",
    "metric": {"name": "val/loss", "goal": "minimize"},
    "command": ["${env}", "${program}", "distill", "${args_no_hyphens}"],
}


def test_a_bad_sweep_file_is_named_with_the_line_of_what_is_wrong(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("program: mtkd\nmetric: {name: val/loss, goal: minimize\nmethod: grid\n")
    with pytest.raises(ConfigError, match=rf"^{broken}:3:7: YAML syntax error"):
        load_sweep(broken)
    listed = tmp_path / "listed.yaml"
    listed.write_text("- program: mtkd\n")
    with pytest.raises(ConfigError, match=rf"^sweep {listed} holds a list, not a mapping"):
        load_sweep(listed)
    keys = tmp_path / "keys.yaml"
    parameters = {
        "kd.alpha": {"values": [0.5]},
        "optim.lrr": {"values": [0.1]},
        "kd.temperature": 2,
    }
    keys.write_text(yaml.safe_dump({**SWEEP, "parameters": parameters}, sort_keys=False))
    line = {text.split(":")[0].strip(): i for i, text in enumerate(keys.read_text().split("\n"), 1)}
    with pytest.raises(ConfigError) as err:
        load_sweep(keys)
    message = str(err.value)
    assert message.startswith(f"sweep {keys}: ")
    assert (
        f"line {line['optim.lrr']}: parameter optim.lrr is not a config key: optim has no key "
        "'lrr'; valid keys: encoder_lr_mult" in message
    )
    assert f"line {line['kd.temperature']}: parameter kd.temperature needs a mapping" in message
    assert "kd.alpha" not in message


def test_config_dir_naming_a_file_says_it_is_a_file(tmp_path):
    file = tmp_path / "data.yaml"
    file.write_text("image_size: 64\n")
    with pytest.raises(ConfigError, match=rf"^config_dir={file} is a file; .* group=FILE"):
        search_path([f"config_dir={file}"])
    with pytest.raises(ConfigError, match="does not exist"):  # a missing folder, as before
        search_path([f"config_dir={tmp_path / 'absent'}"])


def test_a_resume_of_another_network_is_refused_before_any_work(tiny, tmp_path):
    """Through ``fit``: refused before the module, the data or the run's checkpoints are made
    (Lightning used to print one size-mismatch line per tensor)."""
    from mtkd.stages import fit

    student = load_config("distill", [*tiny(), "model.decoder_channels=[32,16,8,8,8]"])
    ckpt = tmp_path / "student.ckpt"
    torch.save({"hyper_parameters": {"config": to_container(student)}, "state_dict": {}}, ckpt)
    with pytest.raises(ConfigError, match="stage is distill there, teacher here"):
        fit(load_config("teacher", tiny(**{"run.resume": ckpt})))
    assert not (tmp_path / "checkpoints").exists()
