"""pssr: Pixel Surgery and Semantic Regeneration, an adversarial purifier (arXiv 2402.00304)."""

__version__ = "0.1.0"

# The Python API (pssr.adapters), imported on first use: `import pssr` stays light.
_ADAPTERS = ("ArtPurifier", "PssrModel", "art_classifier", "defended_model", "load_defended_model")
__all__ = ["__version__", *_ADAPTERS]


def __getattr__(name):
    if name in _ADAPTERS:
        from . import adapters

        return getattr(adapters, name)
    raise AttributeError(f"module 'pssr' has no attribute {name!r}")
