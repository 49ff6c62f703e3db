"""ncp: Noise-Conditioned Perceptual Preference Optimization (NCP-DPO / CPO / SFT) for Stable Diffusion."""

__version__ = "0.1.0"

from .quiet import silence_known_noise

silence_known_noise()  # before any library logs: filters for a few known harmless messages, by their text
