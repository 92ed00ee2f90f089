"""gankit: one GAN core (models, objectives, latent priors, one training loop) run in
standard, differentially private or federated mode.

Where an import lives in the source tree (setup.cfg's package_dir maps the design's
top-level folders onto one package):

    gankit.<module>            toolkit/<module>.py        e.g. gankit.trainer -> toolkit/trainer.py
    gankit.metrics.<module>    toolkit/metrics/<module>.py
    gankit.models.<module>     toolkit/models/<module>.py
    gankit.server.<module>     server/<module>.py         the Flower server app and strategies
    gankit.clients.<module>    clients/<module>.py        the Flower client app
    gankit.checkpoints         checkpoints/               shipped artifacts (package data)
"""

__version__ = "0.1.0"
