"""ncp: Noise-Conditioned Perceptual Preference Optimization (NCP-DPO / CPO / SFT) for Stable Diffusion."""

__version__ = "0.1.0"
