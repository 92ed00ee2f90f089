import os
import tempfile

import pytest
import torch

# torch, matplotlib and flwr write under $HOME; keep tests out of the user's home.
_home = tempfile.mkdtemp(prefix="gankit-test-home-")
for var, sub in (("TORCH_HOME", "torch"), ("MPLCONFIGDIR", "mpl"), ("FLWR_HOME", "flwr")):
    os.environ.setdefault(var, os.path.join(_home, sub))

from gankit.config import Config  # noqa: E402
from gankit.data import ImageData  # noqa: E402
from gankit.runs import RunDir  # noqa: E402
from gankit.trainer import Callback, Trainer, unwrapped  # noqa: E402


def tiny_config(out_dir, **overrides) -> Config:
    """A configuration small enough for a training test to take about a second."""
    base = dict(g_width=8, d_width=8, latent_dim=16, batch_size=32, epochs=2, out_dir=str(out_dir),
                name="run", progress=False, tensorboard=False, log_every=1, eval_every=0)
    base.update(overrides)
    return Config().updated(base)


def synthetic_data(n=256, labelled=True, shape=(1, 28, 28), seed=0) -> ImageData:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((n,) + shape, generator=gen) * 2 - 1
    y = torch.randint(10, (n,), generator=gen) if labelled else None
    rx = torch.rand((64,) + shape, generator=gen) * 2 - 1
    ry = torch.randint(10, (64,), generator=gen) if labelled else None
    return ImageData(x, y, rx, ry, "synthetic", "synthetic test data")


def train(config, data, resume=False, callbacks=()):
    """A run to completion (or to a requested stop): (trainer, status)."""
    run = (RunDir.open(config.train.out_dir + "/" + config.train.name) if resume
           else RunDir.create(config))
    trainer = Trainer(config, data, run, callbacks=callbacks)
    if resume:
        trainer.resume()
    return trainer, trainer.fit()


def history(trainer):
    """The run's history without wall-clock times, which differ between runs."""
    return [{k: v for k, v in r.items() if k != "train_time_s"} for r in trainer.run.history()]


def assert_same_weights(a, b):
    for left, right in ((a.G, b.G), (unwrapped(a.D), unwrapped(b.D))):
        sa, sb = left.state_dict(), right.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


class StopAt(Callback):
    """Acts like Ctrl-C arriving during the given step."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, stats):
        if trainer.state.step == self.step:
            trainer.stop_requested = True


@pytest.fixture
def data():
    return synthetic_data()


@pytest.fixture(autouse=True)
def release_run_folders():
    """A CLI process holds its run folder's lock until it exits; a test process would
    collect one open lock file per run, so each test lets go of its own."""
    yield
    from gankit import runs

    for path in list(runs._HELD):
        runs.RunDir(path).unlock()


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """An in-process federated client sets torch's thread count (--client-cpus); later tests
    must not inherit it, or their floating-point results would depend on the test order."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
