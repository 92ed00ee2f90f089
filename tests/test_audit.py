import json

import pytest
import torch
from torch import nn

from gankit.audit import audit_discriminator, membership_auc, membership_scores
from gankit.config import Config
from gankit.models import build_discriminator
from gankit.objectives import get_objective


def test_auc_known_answers():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, generator=gen), torch.randn(4000, generator=gen)
    assert membership_auc(a, b) == pytest.approx(0.5, abs=0.03)
    assert membership_auc(a + 100, b) == 1.0
    assert membership_auc(a - 100, b) == 0.0


class Lookup(nn.Module):
    """A D whose score is the image's first pixel: outputs known by construction."""
    num_classes = 0

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x, y=None):
        return x.flatten(1)[:, 0]


def test_hand_built_d_and_subsets_are_seeded_and_equal_sized():
    members = torch.ones(50, 1, 4, 4)
    nonmembers = -torch.ones(80, 1, 4, 4)
    result = audit_discriminator(Lookup(), members, nonmembers, seed=3)
    assert result["auc"] == 1.0
    assert result["n_members"] == result["n_nonmembers"] == 50
    again = audit_discriminator(Lookup(), members, nonmembers, seed=3)
    assert torch.equal(result["nonmember_indices"], again["nonmember_indices"])
    other = audit_discriminator(Lookup(), members, nonmembers, seed=4)
    assert not torch.equal(result["nonmember_indices"], other["nonmember_indices"])
    assert audit_discriminator(Lookup(), members, nonmembers, n=10)["n_members"] == 10
    assert audit_discriminator(Lookup(), nonmembers, members)["auc"] == 0.0


def test_scores_with_objective_activation_keep_the_ranking():
    x = torch.linspace(-1, 1, 20).reshape(20, 1, 1, 1).expand(20, 1, 4, 4).contiguous()
    raw = membership_scores(Lookup(), x, batch_size=7)
    assert torch.equal(raw, x[:, 0, 0, 0])
    act = membership_scores(Lookup(), x, objective=get_objective("kl"))
    assert torch.equal(raw.argsort(), act.argsort())


def test_memorising_discriminator_is_attackable():
    # A small D trained to call 64 fixed images real against fresh images of the same
    # distribution (what a GAN's D sees once G is good) can only succeed by memorising them.
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    members = torch.rand(64, 1, 28, 28, generator=gen) * 2 - 1
    heldout = torch.rand(64, 1, 28, 28, generator=gen) * 2 - 1
    D = build_discriminator(Config().updated({"d_width": 8}).model, (1, 28, 28), 0)
    opt = torch.optim.Adam(D.parameters(), lr=2e-3)
    loss = nn.BCEWithLogitsLoss()
    for _ in range(25):
        fresh = torch.rand(64, 1, 28, 28, generator=gen) * 2 - 1
        out = D(torch.cat([members, fresh]))
        target = torch.cat([torch.ones(64), torch.zeros(64)])
        opt.zero_grad()
        loss(out, target).backward()
        opt.step()
    before = audit_discriminator(build_discriminator(Config().updated({"d_width": 8}).model,
                                                     (1, 28, 28), 0), members, heldout)
    after = audit_discriminator(D, members, heldout)
    assert abs(before["auc"] - 0.5) < 0.2  # an untrained D knows nothing of the members
    assert after["auc"] > 0.9
    assert D.training  # the audit restores D's mode


def _sweep_module():
    import gankit.dp_sweep
    return gankit.dp_sweep


def test_sweep_reads_the_reported_epsilon_and_plots(tmp_path):
    sweep = _sweep_module()
    (tmp_path / "dp").mkdir()
    (tmp_path / "std").mkdir()
    records = [{"epoch": 1, "epsilon": 2.5, "epsilon_prv": 2.3, "accountant": "rdp", "delta": 1e-5,
                "noise_multiplier": 0.9, "dp_steps": 70},
               {"epoch": 2, "epsilon": 3.9, "epsilon_prv": 3.6, "accountant": "rdp", "delta": 1e-5,
                "noise_multiplier": 0.9, "dp_steps": 140}]
    (tmp_path / "dp" / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "std" / "history.jsonl").write_text(json.dumps({"epoch": 2, "g_loss": 1.0}) + "\n")
    assert sweep.privacy_of(tmp_path / "dp") == {"epsilon": 3.9, "epsilon_prv": 3.6, "accountant": "rdp",
                                                 "delta": 1e-5, "noise_multiplier": 0.9, "dp_steps": 140}
    assert sweep.privacy_of(tmp_path / "std")["epsilon"] == float("inf")
    metrics = {m: 0.5 for m in sweep.PLOTTED}
    table = [{"row": "eps1", "epsilon": 1.0, **metrics}, {"row": "eps4", "epsilon": 3.9, **metrics},
             {"row": "non-private", "epsilon": float("inf"), **metrics}]
    sweep.plot_metrics(tmp_path / "m.png", table)
    assert (tmp_path / "m.png").stat().st_size > 0


def test_gankit_audit_scores_a_run_against_its_own_data_and_keeps_earlier_results(tmp_path, capsys):
    import numpy as np

    from gankit import cli
    from gankit.data import load_data
    from gankit.sampling import load_discriminator

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (120, 28, 28), dtype=np.uint8),
             y=rng.integers(0, 10, 120))
    run = tmp_path / "runs" / "r"
    assert cli.main(["train", "--dataset", f"npz:{tmp_path / 'd.npz'}", "--mode", "dp", "--epochs", "1",
                     "--g-width", "8", "--d-width", "8", "--latent-dim", "8", "--batch-size", "32",
                     "--eval-every", "0", "--no-progress", "--no-tensorboard",
                     "--out-dir", str(tmp_path / "runs"), "--name", "r"]) == 0
    capsys.readouterr()
    assert cli.main(["audit", str(run), "--seed", "3"]) == 0
    said = capsys.readouterr().out
    record = json.loads((run / "audit" / "membership.json").read_text())
    # The same numbers as the library call on the run's own training and held-out images.
    data = load_data(Config.load(run / "config.json").data)
    expected = audit_discriminator(load_discriminator(run), (data.train_x, data.train_y),
                                   (data.ref_x, data.ref_y), seed=3)
    assert record["auc"] == expected["auc"] and record["n_members"] == expected["n_members"] == 12
    epsilon = json.loads((run / "history.jsonl").read_text().splitlines()[-1])["epsilon"]
    assert record["epsilon"] == epsilon
    assert f"membership AUC {expected['auc']:.4f} on 12 training and 12 held-out images" in said
    assert f"accounted epsilon {epsilon:.3g}" in said
    assert cli.main(["audit", str(run)]) == 0
    assert (run / "audit" / "membership-2.json").is_file()  # the first result is kept
    # Other data than the run's own is refused: the members would not be members.
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (120, 28, 28), dtype=np.uint8),
             y=rng.integers(0, 10, 120))
    assert cli.main(["audit", str(run)]) == 2
    assert "trained on other data" in capsys.readouterr().err
