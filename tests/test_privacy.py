"""Membership inference: the rank AUC on known inputs, and the attack end to end on trained models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datatailor.errors import UserError
from datatailor.evaluate.privacy import membership_inference, roc_auc, roc_curve, trapezoid_area

from .train_fixtures import FACTS, gemma_adapter, tiny_model_dir, write_pairs


def test_auc_extremes_and_chance():
    assert roc_auc([0.9, 0.8, 0.7], [0.3, 0.2]) == 1.0
    assert roc_auc([0.1, 0.2], [0.5, 0.6, 0.7]) == 0.0
    assert roc_auc([0.4, 0.4, 0.4], [0.4, 0.4]) == 0.5


def test_auc_with_ties_by_hand():
    # Members 3, 2, 2, 1 against non-members 2, 1, 0. Of the 12 (member, non-member) pairs:
    # 3 beats all 3 (3); each 2 beats 1 and 0 and ties 2 (2 + 0.5, twice); 1 beats 0 and ties 1 (1 + 0.5).
    # (3 + 2.5 + 2.5 + 1.5) / 12 = 9.5 / 12.
    assert roc_auc([3, 2, 2, 1], [2, 1, 0]) == pytest.approx(9.5 / 12)
    # The same by brute force over all pairs.
    pos, neg = [3, 2, 2, 1], [2, 1, 0]
    brute = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))
    assert roc_auc(pos, neg) == pytest.approx(brute)


def test_roc_points_match_the_auc():
    pos, neg = [3, 2, 2, 1], [2, 1, 0]
    points = roc_curve(pos, neg)
    assert (points[0].fpr, points[0].tpr) == (0.0, 0.0) and (points[-1].fpr, points[-1].tpr) == (1.0, 1.0)
    assert [p.threshold for p in points] == [None, 3, 2, 1, 0]
    assert [(p.fpr, p.tpr) for p in points[1:]] == [(0.0, 0.25), (1 / 3, 0.75), (2 / 3, 1.0), (1.0, 1.0)]
    assert trapezoid_area(points) == pytest.approx(roc_auc(pos, neg))


def test_auc_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([], [0.1])
    with pytest.raises(ValueError, match="both classes"):
        roc_curve([0.1], [])


def test_overlapping_sets_are_refused(tmp_path: Path):
    members = write_pairs(tmp_path / "m.jsonl", FACTS[:3])
    nonmembers = write_pairs(tmp_path / "n.jsonl", FACTS[2:5])
    with pytest.raises(UserError, match="both the members"):
        membership_inference("local:gemma-3-270m", members, nonmembers)


def test_attack_on_an_overfit_tiny_model(tmp_path: Path):
    """A tiny model trained hard on 6 pairs finds them far likelier than 6 unseen ones: AUC > 0.5."""
    pytest.importorskip("trl")
    from datatailor.cli import main
    from datatailor.train.sft import train_sft
    from datatailor.train.sft_config import TrainConfig

    members = write_pairs(tmp_path / "members.jsonl", FACTS[:6])
    nonmembers = write_pairs(tmp_path / "nonmembers.jsonl", FACTS[6:12])
    config = TrainConfig(method="full", epochs=8, learning_rate=3e-3, batch_size=2, micro_batch_size=2, max_length=128, threads=1)
    train_sft(members, str(tiny_model_dir()), tmp_path / "model", config, progress=None)

    out = tmp_path / "privacy.json"
    assert main(["privacy", "--model", str(tmp_path / "model"), "--members", str(members),
                 "--nonmembers", str(nonmembers), "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["n_members"] == 6 and report["n_nonmembers"] == 6 and len(report["scores"]) == 12
    assert report["template"] == "respond.j2"
    assert report["member_mean_nll"] < report["nonmember_mean_nll"]
    assert report["auc"] > 0.5
    assert 0.0 <= report["advantage"] <= 1.0


def test_an_adapter_folder_given_as_the_model_loads_base_plus_adapter(tmp_path: Path):
    pytest.importorskip("trl")
    from datatailor.train.sft import train_sft
    from datatailor.train.sft_config import TrainConfig

    members = write_pairs(tmp_path / "members.jsonl", FACTS[:2])
    nonmembers = write_pairs(tmp_path / "nonmembers.jsonl", FACTS[2:4])
    # A template other than the default, to see that the attack reads it from train_config.yaml.
    terse = tmp_path / "terse.j2"
    terse.write_text("{% block user %}Q: {{ instruction }}{% endblock %}\n", encoding="utf-8")
    config = TrainConfig(max_steps=1, batch_size=2, max_length=96, threads=1, prompt_template=str(terse))
    train_sft(members, str(tiny_model_dir()), tmp_path / "adapter", config, progress=None)
    report = membership_inference(str(tmp_path / "adapter"), members, nonmembers, device="cpu")
    assert report.model == str(tiny_model_dir()) and report.adapter == str((tmp_path / "adapter").resolve())
    assert report.template == str(terse)
    assert report.n_members == 2 and report.n_nonmembers == 2 and 0.0 <= report.auc <= 1.0


@pytest.mark.integration
def test_attack_on_the_gemma_lora_adapter():
    adapter, members, nonmembers = gemma_adapter()
    report = membership_inference("local:gemma-3-270m", members, nonmembers, adapter=str(adapter), device="cpu")
    assert report.n_members == 4 and report.n_nonmembers == 4
    assert 0.0 <= report.auc <= 1.0
    # Four pairs seen three times each at a high learning rate are memorised: the attack must see it.
    assert report.member_mean_nll < report.nonmember_mean_nll
    assert report.auc > 0.5
