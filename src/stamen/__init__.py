"""Stamen: monitor and administer Celery clusters, a drop-in replacement for Flower."""

__version__ = "0.1.0"
