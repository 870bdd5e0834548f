"""plots.py: `plots.py RUN` writes into the run folder; a quantity constant to round-off (the weights under
forced weight normalisation) is drawn flat and labelled so, not zoomed into as if it were a signal."""
import json
import os

import pytest

import plots


def fake_run(folder, weight_rms):
    """A run folder with magnitudes.jsonl of 2 blocks: activations that grow, weights `weight_rms(step)`."""
    os.makedirs(folder)
    with open(os.path.join(folder, "magnitudes.jsonl"), "w") as f:
        for step in (1, 10, 20, 30):
            f.write(json.dumps({"step": step, "act_rms": [1 + step / 10, 2 + step / 10],
                                "weight_rms": [weight_rms(step), weight_rms(step)]}) + "\n")
    return str(folder)


@pytest.fixture
def figures(monkeypatch):
    kept = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: kept.append(fig))
    return kept


def round_off(step):
    return 1 + (5e-8 if step % 20 else 0.0)  # forced WN: the RMS is 1 up to float round-off


def test_weights_constant_to_round_off_are_drawn_flat_and_labelled(tmp_path, figures):
    plots.plot_magnitudes([fake_run(tmp_path / "run", round_off)], str(tmp_path / "m.png"))
    weights = figures[0].axes[1]
    lo, hi = weights.get_ylim()
    assert hi - lo >= 0.19  # ±10 %, not the 5e-8 of the round-off
    assert any("constant to round-off" in t.get_text() for t in weights.texts)
    assert not figures[0].axes[0].texts  # the activations change: drawn as they are


def test_weights_that_change_are_drawn_as_they_are(tmp_path, figures):
    plots.plot_magnitudes([fake_run(tmp_path / "run", lambda s: 1 + s / 100)], str(tmp_path / "m.png"))
    assert not figures[0].axes[1].texts


def test_plots_of_one_run_go_into_the_run_folder(tmp_path, monkeypatch, capsys):
    run = fake_run(tmp_path / "run", round_off)
    monkeypatch.chdir(tmp_path)
    assert plots.main([run]) == 0
    assert os.path.isfile(os.path.join(run, "magnitudes.png")) and not os.path.exists(tmp_path / "magnitudes.png")
    assert capsys.readouterr().out.strip() == f"wrote {os.path.join(run, 'magnitudes.png')}"
