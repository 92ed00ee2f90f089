"""--fake-labels data: G's fakes follow the training labels' class frequencies."""

import pytest
import torch

from conftest import synthetic_data, tiny_config
from gankit.config import ConfigError, validate
from gankit.runs import RunDir
from gankit.trainer import Trainer


def two_class_data(n=256):
    """Synthetic images whose labels are 2 (three quarters) and 5 (one quarter), as a
    non-IID federated client might hold."""
    data = synthetic_data(n)
    data.train_y = torch.where(torch.arange(n) % 4 == 0, 5, 2)
    return data


class LabelsSeen:
    """Records every label G is asked to draw in its training steps (the epoch's sample grid,
    drawn in eval mode, stays uniform)."""

    def __init__(self, G):
        self.labels = []
        G.register_forward_hook(lambda module, args, out: self.labels.append(args[1].clone())
                                if module.training else None)

    def counts(self):
        return torch.bincount(torch.cat(self.labels), minlength=10)


@pytest.mark.parametrize("fake_labels", ["uniform", "data"])
def test_fakes_in_training_follow_the_clients_classes_only_when_asked(tmp_path, fake_labels):
    config = tiny_config(tmp_path, conditional=True, epochs=2, fake_labels=fake_labels)
    data = two_class_data()
    trainer = Trainer(config, data, RunDir.create(config))
    seen = LabelsSeen(trainer.G)
    trainer.fit()
    counts = seen.counts()
    if fake_labels == "uniform":
        assert (counts > 0).all()
    else:
        assert counts.sum() == counts[2] + counts[5]
        share = counts[5].item() / counts.sum().item()
        assert abs(share - 0.25) < 0.05


def test_sample_level_dp_refuses_label_frequencies_client_level_dp_accepts_them(tmp_path):
    private = tiny_config(tmp_path, conditional=True, fake_labels="data", mode="dp", target_epsilon=5.0)
    with pytest.raises(ConfigError, match="fake-labels data"):
        validate(private)
    with pytest.raises(ConfigError, match="fake-labels data"):
        validate(tiny_config(tmp_path, conditional=True, fake_labels="data", mode="federated",
                             sample_dp=True, target_epsilon=5.0))
    validate(tiny_config(tmp_path, conditional=True, fake_labels="data", mode="federated",
                         client_dp="poisson", client_dp_noise=1.0, clients=100, fraction_train=0.1))
    with pytest.raises(ConfigError, match="unknown fake-labels 'real'"):
        validate(tiny_config(tmp_path, fake_labels="real"))
