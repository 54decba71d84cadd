"""Compaction: a pruned model made physically smaller, with the same outputs.

`engine` runs the model's computation with smaller contractions (dead and unread units of every
linear map, channels coupled across residual adds); `heads` carries whole attention heads removed
from the q/k/v projections through the attention to the output projection.
"""

from hoyertrim.compact.engine import (CompactLayer, CompactModel, compact, load_compact,
                                      save_compact)

__all__ = ["CompactLayer", "CompactModel", "compact", "load_compact", "save_compact"]
