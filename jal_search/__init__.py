"""jal-search: tune Joint Asymmetric Loss (JAL) and its baselines on noisy labels."""

__version__ = "0.1.0"
