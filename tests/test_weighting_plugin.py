"""The weighting-strategy plugin of ``examples/extending/weighting.py``, used from outside the
library: it trains (its weights are logged and saved), and its checkpoint is evaluated in a
process that did not import it only when ``MTKD_PLUGINS`` names it."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

from mtkd.config import ConfigError
from mtkd.modules.weighting import WEIGHTINGS
from mtkd.run_config import load_config
from mtkd.stages import evaluate, fit

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "extending"


def logged_epochs(run_dir: Path) -> list[dict[str, float]]:
    """The epoch rows of the CSV log that carry task weights, in order."""
    with open(run_dir / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = [k for k in rows[0] if k.endswith("/weight") or k.endswith("/loss_epoch")]
    epochs = [{k: float(r[k]) for k in keys if r[k]} for r in rows]
    return [e for e in epochs if any(k.endswith("/weight") for k in e)]


def test_loss_balance_plugin_trains_logs_its_weights_and_reloads_by_name(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    overrides = tiny(
        **{
            "plugins": "[weighting]",
            "run.weighting": "loss_balance",
            "tasks.cdr.weight": 2.0,
            "logger": "csv",
            "trainer.max_epochs": 2,
        }
    )
    cfg = load_config("teacher", overrides)
    best = fit(cfg)
    weights = {n: float(s.get("weight", 1.0)) for n, s in cfg.tasks.items()}
    assert weights["cdr"] == 2.0
    first = logged_epochs(tmp_path)[0]
    balance = {n: first[f"train/{n}/weight"] / w for n, w in weights.items()}
    # b_t = K (1 / m_t) / sum(1 / m_u): the balances sum to K, and a larger loss weighs less
    assert sum(balance.values()) == pytest.approx(len(weights), rel=1e-5)
    by_loss = sorted(weights, key=lambda n: first[f"train/{n}/loss_epoch"])
    assert [balance[n] for n in by_loss] == sorted(balance.values(), reverse=True)
    assert max(balance.values()) > 1.5 * min(balance.values())  # not the fixed strategy's 1s

    # a fresh process: the plugin is imported only when the user names it
    monkeypatch.delitem(sys.modules, "weighting")
    WEIGHTINGS.unregister("loss_balance")
    with pytest.raises(ConfigError, match="MTKD_PLUGINS=weighting mtkd"):
        evaluate(str(best), "val", [])
    monkeypatch.setenv("MTKD_PLUGINS", "weighting")
    metrics = evaluate(str(best), "val", [])
    assert "val/loss" in metrics
    saved = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    assert saved["weighting.balance"].sum().item() == pytest.approx(len(weights), rel=1e-5)
