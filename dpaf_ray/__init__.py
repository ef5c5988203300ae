"""DPAF: differentially private image generators, trained and tuned with Ray."""
__version__ = "0.1.0"
