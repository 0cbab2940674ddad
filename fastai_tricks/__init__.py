"""fastai_tricks: training tricks for fastai 2.8, as callbacks and transforms.

Normalization helpers, progressive resizing, mixup and its variants, four-corner
test-time augmentation and label smoothing, with the Imagenette recipe that
combines them.
"""

__version__ = "0.1.0"

from .data import (
    IMAGENETTE_CLASSES,
    IMAGENETTE_WNIDS,
    DataUnavailableError,
    imagenette_path,
    make_fake_imagenette,
)

__all__ = [
    "IMAGENETTE_CLASSES",
    "IMAGENETTE_WNIDS",
    "DataUnavailableError",
    "__version__",
    "imagenette_path",
    "make_fake_imagenette",
]
