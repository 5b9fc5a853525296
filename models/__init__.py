"""Models: the catalog, fetching weights into a cache, and adapters from raw outputs to Detections.

Depends on neither `jobs` nor `operators`.
"""

from models.catalog import ModelEntry, load_catalog
from models.detections import CLASSES, Detections

__all__ = ["CLASSES", "Detections", "ModelEntry", "load_catalog"]
