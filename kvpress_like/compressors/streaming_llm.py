"""StreamingLLM press.

Paper: Xiao et al., "Efficient Streaming Language Models with Attention Sinks", arXiv 2309.17453.
Keeps the first ``n_sink`` tokens (attention sinks, 4 by default) and the most recent tokens. The paper applies
this as a rolling window while decoding; here it is applied once to the prefilled context (prefill compression).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..press import LayerContext, Press


@dataclass
class StreamingLLMPress(Press):
    """Keeps ``n_sink`` first tokens and the most recent ones: the score is the token's index."""

    name = "streaming_llm"
    supports_decoding = True
    n_sink: int = 4

    def score(self, ctx: LayerContext) -> torch.Tensor:
        b, h, s, _ = ctx.keys.shape
        return torch.arange(s, device=ctx.keys.device, dtype=torch.float32).expand(b, h, s)
