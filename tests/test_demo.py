"""``python -m tensor_peft demo`` in its quick setting: the table, the JSON and the plot are
written, every run reports real numbers, and adapting the backbone beats the frozen one;
without the ``demo`` extra it says how to install it."""

from __future__ import annotations

import json
import sys

import pytest

from tensor_peft.__main__ import main


def test_quick_demo_writes_its_results_and_adaptation_beats_the_frozen_backbone(tmp_path, capsys):
    methods = ["liera", "snella", "frozen-backbone"]
    assert main(["demo", "--quick", "--epochs", "8", "--out", str(tmp_path), "--methods", ",".join(methods)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    runs = {run["method"]: run for run in report["runs"]}
    assert list(runs) == methods
    for run in runs.values():
        assert 0.0 <= run["accuracy"] <= 1.0 and len(run["curve"]) == 8
        assert run["trainable_parameters"] > 0 and run["seconds"] > 0
    assert runs["frozen-backbone"]["trainable_parameters"] == 64 * 10 + 10  # the head alone
    assert runs["liera"]["accuracy"] > runs["frozen-backbone"]["accuracy"] > report["zero_shot_accuracy"]
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {name} |" in table for name in methods) and table in capsys.readouterr().out
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_low_rank_methods_beat_the_frozen_backbone_at_full_size(tmp_path):
    """The demo's own setting (seed 0): LoRA and MTLoRA clearly beat the frozen backbone
    (a learning rate too high for them, 1e-2, sends MTLoRA to chance level)."""
    methods = ["lora", "mtlora", "frozen-backbone"]
    assert main(["demo", "--out", str(tmp_path), "--methods", ",".join(methods)]) == 0
    runs = {run["method"]: run["accuracy"] for run in json.loads((tmp_path / "results.json").read_text())["runs"]}
    assert min(runs["lora"], runs["mtlora"]) > runs["frozen-backbone"] + 0.1


def test_demo_chooses_flora_paths_by_the_cost_model_and_leaves_autotuning_as_it_was(tmp_path, monkeypatch):
    """Timed choices move with the machine's load, and the demo's accuracies with them."""
    from tensor_peft.nn import flora

    def timed(*args):
        raise AssertionError("the demo timed FLoRA's paths")

    monkeypatch.setattr(flora, "time_executions", timed)
    monkeypatch.setattr(flora, "AUTOTUNE", True)
    assert main(["demo", "--quick", "--epochs", "1", "--out", str(tmp_path), "--methods", "flora"]) == 0
    assert flora.AUTOTUNE is True


@pytest.mark.parametrize("module, package", [("sklearn", "scikit-learn"), ("matplotlib", "matplotlib")])
def test_demo_without_its_extra_says_how_to_install_it_before_training(tmp_path, capsys, monkeypatch, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    assert main(["demo", "--quick", "--epochs", "1", "--out", str(tmp_path), "--methods", "lora"]) == 1
    error = capsys.readouterr().err
    assert f"the demo needs {package}," in error and 'pip install "tensor_peft[demo]"' in error
    assert not any(tmp_path.iterdir())  # nothing ran
