"""The release shipped in the package (``experiments/release.py`` builds it): every entry loads
offline through SAELens's registry on a fresh clone, computes the held-out R^2 and L0 its card
records, fits the size the package may ship, and ``sign-sae report`` runs on it untrained."""

import json
from pathlib import Path

import pytest
from sae_lens import SAE

import sign_sae
from experiments.release import RELEASE, check_held_out, check_metrics
from sign_sae.releases import CARD_FILE, find_release

MAX_FILE, MAX_TOTAL = 3_000_000, 10_000_000  # bytes: each weights file, the whole release
LOOKUP = find_release(RELEASE)
IDS = list(LOOKUP.saes_map)


def card(sae_id: str) -> dict:
    return json.loads((Path(LOOKUP.repo_id) / LOOKUP.saes_map[sae_id] / CARD_FILE).read_text())


def test_the_release_ships_both_saes_at_three_hooks_within_the_size_cap():
    arch = {sae_id: card(sae_id)["architecture"] for sae_id in IDS}
    hooks = {card(sae_id)["hook"] for sae_id in IDS}
    assert sorted(arch.values()) == ["gated"] * 3 + ["sa_gsae"] * 3 and len(hooks) == 3
    assert all(arch[hook] == "sa_gsae" for hook in hooks)  # SA-GSAE answers to the bare hook
    files = [p for p in Path(LOOKUP.repo_id).rglob("*") if p.is_file()]
    weights = [p.stat().st_size for p in files if p.name == "sae_weights.safetensors"]
    assert len(weights) == 6 and max(weights) < MAX_FILE
    assert sum(p.stat().st_size for p in files) < MAX_TOTAL


@pytest.fixture(scope="module")
def check(model):
    return check_held_out(model, sorted({card(sae_id)["hook"] for sae_id in IDS}))


@pytest.mark.parametrize("sae_id", IDS)
def test_every_entry_loads_offline_and_computes_its_card(sae_id, model, check):
    sae = SAE.from_pretrained(RELEASE, sae_id)
    recorded = card(sae_id)
    assert isinstance(sae, sign_sae.SAGSAE) == (recorded["architecture"] == "sa_gsae")
    assert (sae.cfg.metadata.hook_name, sae.cfg.d_sae) == (recorded["hook"], recorded["d_sae"])
    got = check_metrics(sae, check)
    assert got["r2"] == pytest.approx(recorded["check"]["r2"], abs=1e-3), got
    assert got["l0"] == pytest.approx(recorded["check"]["l0"], rel=1e-2), got
    held = recorded["held_out"]  # a real, sparse SAE on the test plays
    assert 0.3 < held["r2"] < 1 and 2 < held["l0"] < 200 and held["split"] == "test"


def test_sign_sae_report_runs_on_a_shipped_entry_without_training(
    model, tmp_path, capsys, monkeypatch
):
    from analyses.report import gather
    from sign_sae import cli

    monkeypatch.setattr(gather, "load_model", lambda name: model)  # the session's copy
    out = tmp_path / "report.html"
    code = cli.main(["report", "--release", RELEASE, "--sae-id", IDS[0], "-o", str(out),
                     "--tokens", "512", "--n-latents", "1"])  # fmt: skip
    assert code == 0 and "Report (opens offline)" in capsys.readouterr().out
    html = out.read_text()
    assert IDS[0] in html and "r2: explained variance" in html  # the card's metrics table
