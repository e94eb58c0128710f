"""log-n query scaling inside vLLM's workers, through the `vllm.general_plugins` entry point.

vLLM builds the model in its own engine process, so a patch made in the API
process never reaches it; vLLM loads every `vllm.general_plugins` entry point
in each of its processes before it builds a model, and `register` below is
ours (pyproject.toml). It wraps the rotary embedding's forward: after the
rotation, the query of the token at 0-based position p is multiplied by
patches.rope.logn_factors (max(1, ln(p+1) / ln L)); keys are left alone.

The setting rides in an environment variable that server/engine/vllm.py sets
before vLLM starts its processes (they inherit it): the trained length L, or
unset for no scaling. Each rotary module reads it once, when first called, so
the patch holds no state of its own: `register` may run any number of times,
in any process, and a vLLM started without the variable (a bare `vllm serve`
in the same environment) runs unchanged.
"""

from __future__ import annotations

import os

LOGN_ENV = "LONGSERVE_LOGN_TRAINED_LEN"
_MARK = "_longserve_logn"


def logn_trained_len() -> int | None:
    value = os.environ.get(LOGN_ENV)
    return int(value) if value else None


def scale_queries(positions, query, trained_len: int):
    """query ([tokens, heads * head_dim] or [tokens, heads, head_dim]) scaled per token by its log-n factor."""
    from longserve.patches.rope import logn_factors

    factors = logn_factors(positions.reshape(-1), trained_len).to(query.dtype)
    return (query.reshape(factors.shape[0], -1) * factors[:, None]).reshape(query.shape)


def register() -> None:
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase

    if getattr(RotaryEmbeddingBase.forward, _MARK, False):
        return  # already installed in this process

    def forward(self, positions, query, key=None, *args, **kwargs):
        query, key = self._forward_method(positions, query, key, *args, **kwargs)
        if _MARK not in self.__dict__:
            self.__dict__[_MARK] = logn_trained_len()
        trained_len = self.__dict__[_MARK]
        if trained_len is not None:
            query = scale_queries(positions, query, trained_len)
        return query, key

    setattr(forward, _MARK, True)
    RotaryEmbeddingBase.forward = forward
