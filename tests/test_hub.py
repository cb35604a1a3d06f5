"""Hub-style folders: a run saved in huggingface_hub's layout with a model card, loaded back by
flowmatch.load (a folder here: no network), sampled from the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import flowmatch
from flowmatch.errors import UserError
from flowmatch.runs import load_run

from helpers import copy_run, one_line_error


@pytest.fixture(scope="module")
def hub_folder(tiny_run, tmp_path_factory):
    from flowmatch.cli import run

    out = tmp_path_factory.mktemp("hub") / "checkerboard-model"
    assert run(["save-pretrained", str(tiny_run), "--out", str(out)]) == 0
    return out


def test_the_folder_holds_the_hub_files_and_samples_as_the_run_does(tiny_run, hub_folder):
    assert sorted(p.name for p in hub_folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = flowmatch.load(hub_folder, device="cpu")
    original = load_run(tiny_run, device="cpu")
    assert torch.equal(loaded.sample(200, nfe=4, seed=3), original.sample(200, nfe=4, seed=3))
    assert loaded.weights == "ema" and json.loads((hub_folder / "config.json").read_text())["pretrained"]["from"] == "ema"
    # the EMA copy was saved, not the raw weights
    raw = load_run(tiny_run, device="cpu", weights="model")
    assert not torch.equal(loaded.sample(50, nfe=2), raw.sample(50, nfe=2))


def test_the_model_card_is_read_by_huggingface_hub_and_carries_the_measures(tiny_run, hub_folder):
    from huggingface_hub import ModelCard

    from flowmatch.runs import read_metrics

    card = ModelCard.load(hub_folder / "README.md")
    assert card.data.library_name == "flowmatch" and "flow-matching" in card.data.tags
    last = read_metrics(tiny_run / "metrics.jsonl")[-1]
    assert f"{last['loss']:.6g}" in card.text and "flowmatch.load(" in card.text


def test_python_api_round_trip_and_a_second_save(tiny_run, tmp_path):
    run = load_run(tiny_run, device="cpu", weights="model")
    folder = flowmatch.save_pretrained(run, tmp_path / "raw")
    again = flowmatch.load(folder)
    assert again.weights == "model" and torch.equal(again.sample(20, nfe=2), run.sample(20, nfe=2))
    # a saved folder saves again (its weights are named in its config)
    twice = flowmatch.save_pretrained(again, tmp_path / "twice")
    assert torch.equal(flowmatch.load(twice).sample(20, nfe=2), run.sample(20, nfe=2))


def test_the_command_line_samples_a_hub_folder(cli, hub_folder, tmp_path):
    rc, _, err = cli("sample", hub_folder, "--n", "30", "--nfe", "2", "--out", tmp_path / "x.npy", "--no-progress")
    assert rc == 0, err
    assert np.load(tmp_path / "x.npy").shape == (30, 2)


def test_bad_input(cli, tiny_run, hub_folder, tmp_path, monkeypatch):
    before = {p.name: p.read_bytes() for p in hub_folder.iterdir()}
    line = one_line_error(*cli("save-pretrained", tiny_run, "--out", hub_folder)[::2])
    assert "--overwrite" in line and {p.name: p.read_bytes() for p in hub_folder.iterdir()} == before
    assert "does not exist" in one_line_error(*cli("save-pretrained", tiny_run, "--out", tmp_path / "no" / "dir")[::2])
    assert not (tmp_path / "no").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: a repository id fails in one line
    with pytest.raises(UserError, match="could not download"):
        flowmatch.load("someone/missing-model")
    with pytest.raises(UserError, match="neither a folder nor"):
        flowmatch.load("not a path or id")
    damaged = copy_run(hub_folder, tmp_path / "damaged")
    doc = json.loads((damaged / "config.json").read_text())
    doc["pretrained"]["weights"] = "../../elsewhere.safetensors"
    (damaged / "config.json").write_text(json.dumps(doc))
    line = one_line_error(*cli("sample", damaged, "--n", "2", "--out", tmp_path / "y.npy")[::2])
    assert "config.json" in line and "pretrained.weights" in line
