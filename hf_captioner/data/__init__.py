"""Caption data in one schema (`image`, `captions`, `image_id`; splits train / validation / test)."""

from .loaders import (
    HUB_LAYOUTS,
    DataError,
    HubLayout,
    detect_and_load,
    hub_layout,
    load_captions_csv,
    load_flickr8k_text,
    load_hub_dataset,
    load_karpathy_json,
)
from .sample import make_sample_dataset, sample_records, write_sample_dataset

__all__ = [
    "DataError",
    "detect_and_load",
    "HUB_LAYOUTS",
    "HubLayout",
    "load_captions_csv",
    "load_flickr8k_text",
    "hub_layout",
    "load_hub_dataset",
    "load_karpathy_json",
    "make_sample_dataset",
    "sample_records",
    "write_sample_dataset",
]
