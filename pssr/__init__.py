"""pssr: Pixel Surgery and Semantic Regeneration, an adversarial purifier (arXiv 2402.00304)."""

__version__ = "0.1.0"
