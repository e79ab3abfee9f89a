"""TVM lowerings of the semantic ops (attention, MoE, mHC); registered in `TVM_EMITTERS`."""

from __future__ import annotations
