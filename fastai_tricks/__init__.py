"""fastai_tricks: training tricks for fastai 2.8, as callbacks and transforms.

Normalization helpers, progressive resizing, mixup and its variants, four-corner
test-time augmentation and label smoothing, with the Imagenette recipe that
combines them.
"""

__version__ = "0.1.0"

from . import mix_ops
from .data import (
    IMAGENETTE_CLASSES,
    IMAGENETTE_WNIDS,
    DataUnavailableError,
    imagenette_path,
    make_digits,
    make_fake_imagenette,
    make_fake_segmentation,
)
from .distributed import (
    broadcast_object,
    cpu_ddp,
    cpu_ddp_enabled,
    disable_cpu_ddp,
    enable_cpu_ddp,
    gather_objects,
    is_distributed,
    rank_and_world,
)
from .draft import DraftDL, DraftImage, DraftImageBlock, draft_reduction
from .losses import LabelSmoothingCE, smooth_targets
from .mixing import (
    CutMix,
    FMix,
    ManifoldMix,
    MixCallback,
    MixUp,
    RandomMix,
    ResizeMix,
    find_residual_stages,
    show_mix_batch,
)
from .normalization import (
    Moments,
    NormalizationCheck,
    NormalizationReport,
    NormalizationWarning,
    batch_moments,
    check_normalization,
    dataset_stats,
    ensure_normalized,
    merge_moments,
    model_stats,
    moments_to_stats,
)
from .resizing import (
    ProgressiveResize,
    initial_pixels,
    mix_alpha_at,
    resize_schedule,
    schedule_pays_off,
    schedule_progress,
    size_at,
)
from .tta import (
    MERGE_MODES,
    FourCornerTTA,
    ViewBox,
    expand_views,
    four_corner_crops,
    merge_views,
    paste_views,
    view_boxes,
    view_coverage,
    view_names,
)

__all__ = [
    "LabelSmoothingCE",
    "smooth_targets",
    "Moments",
    "NormalizationCheck",
    "NormalizationReport",
    "NormalizationWarning",
    "batch_moments",
    "check_normalization",
    "dataset_stats",
    "ensure_normalized",
    "merge_moments",
    "model_stats",
    "moments_to_stats",
    "MERGE_MODES",
    "FourCornerTTA",
    "expand_views",
    "four_corner_crops",
    "merge_views",
    "view_names",
    "ViewBox",
    "paste_views",
    "view_boxes",
    "view_coverage",
    "broadcast_object",
    "cpu_ddp",
    "cpu_ddp_enabled",
    "disable_cpu_ddp",
    "enable_cpu_ddp",
    "gather_objects",
    "is_distributed",
    "rank_and_world",
    "CutMix",
    "FMix",
    "ManifoldMix",
    "MixCallback",
    "MixUp",
    "ProgressiveResize",
    "RandomMix",
    "ResizeMix",
    "find_residual_stages",
    "initial_pixels",
    "mix_alpha_at",
    "mix_ops",
    "resize_schedule",
    "schedule_pays_off",
    "schedule_progress",
    "show_mix_batch",
    "size_at",
    "IMAGENETTE_CLASSES",
    "IMAGENETTE_WNIDS",
    "DataUnavailableError",
    "DraftDL",
    "DraftImage",
    "DraftImageBlock",
    "draft_reduction",
    "__version__",
    "imagenette_path",
    "make_digits",
    "make_fake_imagenette",
    "make_fake_segmentation",
]
