"""Spatial-attention family: attention map, normalisation, center and the ACQ attention losses."""
from .ops import (attention_center_loss, attention_pair_distance,  # noqa: F401
                  attention_pair_hinge, attention_sq_distance, spatial_attention)
from .reference import spatial_attention_reference  # noqa: F401
