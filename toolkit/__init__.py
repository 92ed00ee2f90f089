"""gankit: one GAN core (models, objectives, latent priors, one training loop) run in
standard, differentially private or federated mode."""

__version__ = "0.1.0"
