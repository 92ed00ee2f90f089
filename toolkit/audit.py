"""Empirical privacy audit: membership inference on a trained discriminator.

The white-box attack of Hayes et al. 2019 ("LOGAN: Membership Inference Attacks Against
Generative Models", PoPETs 2019): a discriminator that overfits scores its own training
images higher than unseen images of the same distribution, so ranking images by D's score
separates members from non-members. The audit reports the ROC AUC of that ranking on equal,
seeded random subsets of the training images (members) and the held-out reference split
(non-members): 0.5 is chance (no measurable leak), 1.0 a perfect attack.

The attack reads real held-out data and the trained D; it is an audit run after training,
not part of training, and uses nothing a dp run's guarantee needs to account for. An AUC
near 0.5 is evidence, not proof, of privacy (a stronger attack could do better); the
(epsilon, delta) guarantee bounds every attack, this one included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from gankit.sampling import eval_mode, load_discriminator


def _split(data) -> tuple[Tensor, Optional[Tensor]]:
    """(images, labels) from a tensor of images or an (images, labels) pair."""
    if isinstance(data, (tuple, list)):
        images, labels = data
        return images, labels
    return data, None


@torch.no_grad()
def membership_scores(D: nn.Module, images: Tensor, labels: Optional[Tensor] = None,
                      objective=None, batch_size: int = 500) -> Tensor:
    """D's score per image; higher = "more likely a training member".

    The raw output v of D by default: every objective trains D to raise v on real training
    data. With `objective`, its output activation g_f(v) is applied (f-GAN); it is monotone,
    so the AUC is the same either way, only the score scale differs. Labels are passed to a
    conditional D. D runs in eval mode (no instance noise or dropout), restored afterwards.
    """
    device = next(D.parameters()).device
    scores = []
    with eval_mode(D):
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device)
            y = None if labels is None else labels[start:start + batch_size].to(device)
            v = D(x, y).reshape(len(x), -1)[:, 0]
            scores.append((objective.activation(v) if objective is not None else v).float().cpu())
    return torch.cat(scores) if scores else torch.empty(0)


def membership_auc(member_scores, nonmember_scores) -> float:
    """ROC AUC of telling members (positives) from non-members by score; 0.5 = chance."""
    from sklearn.metrics import roc_auc_score

    member_scores = torch.as_tensor(member_scores, dtype=torch.float64).flatten()
    nonmember_scores = torch.as_tensor(nonmember_scores, dtype=torch.float64).flatten()
    truth = torch.cat([torch.ones(len(member_scores)), torch.zeros(len(nonmember_scores))])
    return float(roc_auc_score(truth.numpy(), torch.cat([member_scores, nonmember_scores]).numpy()))


def audit_discriminator(run_or_D: Union[str, Path, nn.Module], members, nonmembers,
                        n: Optional[int] = None, seed: int = 0, batch_size: int = 500) -> dict:
    """The LOGAN white-box attack (Hayes et al. 2019) on a trained D: its AUC and subsets.

    `run_or_D`: a run folder / checkpoint (its last D is loaded) or a discriminator.
    `members`: the training images (or (images, labels)) the run was trained on;
    `nonmembers`: the held-out reference split, which training never saw. Equal-sized random
    subsets of both are drawn (n each, default the smaller of the two sets), seeded, so the
    AUC is not skewed by class imbalance and the audit is reproducible. Labels are only used
    for a conditional D. This is an audit on real held-out data, not part of training.
    """
    D = run_or_D
    if not isinstance(run_or_D, nn.Module):
        D = load_discriminator(run_or_D)
    conditional = bool(getattr(D, "num_classes", 0))  # the toolkit's D: 0 = unconditional
    (mx, my), (nx, ny) = _split(members), _split(nonmembers)
    n = min(len(mx), len(nx)) if n is None else min(n, len(mx), len(nx))
    rng = torch.Generator().manual_seed(seed)
    m_idx = torch.randperm(len(mx), generator=rng)[:n]
    n_idx = torch.randperm(len(nx), generator=rng)[:n]
    my = my[m_idx] if conditional and my is not None else None
    ny = ny[n_idx] if conditional and ny is not None else None
    member = membership_scores(D, mx[m_idx], my, batch_size=batch_size)
    nonmember = membership_scores(D, nx[n_idx], ny, batch_size=batch_size)
    return {"auc": membership_auc(member, nonmember), "n_members": n, "n_nonmembers": n,
            "member_score_mean": float(member.mean()) if n else float("nan"),
            "nonmember_score_mean": float(nonmember.mean()) if n else float("nan"),
            "seed": seed, "member_indices": m_idx, "nonmember_indices": n_idx}

