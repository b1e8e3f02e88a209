"""A sequence mixer defined outside the archlab package: the README's "Adding a mixer" example, verbatim.

Token shift (RWKV's time-mix, reduced to its core): each position mixes its input with the previous position's
through a learned per-channel gate, then projects. One file, no edit inside archlab.
"""
import torch
from pydantic import Field
from torch import nn

from archlab.archs.layers.mixer import Mixer, MixerSettings, no_weight_decay, register_mixer, writes_residual


class TokenShiftSettings(MixerSettings):       # appears in a config as model.token_shift.*
    mix_init: float = Field(0.5, ge=0, le=1, description="initial share of the previous position")


class TokenShiftState:                          # decoding state: the last input seen
    def __init__(self, batch_size, d_model, *, dtype, device):
        self.last = torch.zeros(batch_size, 1, d_model, dtype=dtype, device=device)
        self.length = 0


@register_mixer
class TokenShift(Mixer):
    name = "token_shift"
    settings = TokenShiftSettings
    kernel_ops = ()                             # it runs no kernels/ op
    bidirectional = "no"                        # reads only the past

    def __init__(self, d_model, settings, *, causal, kernels):
        super().__init__(d_model, settings, causal=causal, kernels=kernels)
        self.mix = nn.Parameter(torch.full((d_model,), settings.mix_init))
        no_weight_decay(self.mix)
        self.out_proj = writes_residual(nn.Linear(d_model, d_model, bias=False))

    def forward(self, x, *, causal, state=None, documents=None):
        first = torch.zeros_like(x[:, :1]) if state is None else state.last.to(x.dtype)
        previous = torch.cat([first, x[:, :-1]], dim=1)
        if documents is not None:  # a document's first position has no previous one
            previous = previous.masked_fill(documents.starts.unsqueeze(-1), 0)
        if state is not None:
            state.last, state.length = x[:, -1:].detach().clone(), state.length + x.shape[1]
        return self.out_proj(torch.lerp(x, previous, self.mix.to(x.dtype)))

    def new_state(self, batch_size, max_len, *, dtype, device):
        return TokenShiftState(batch_size, self.mix.numel(), dtype=dtype, device=device)

    def flops_per_token(self, seq_len, *, causal):
        d = self.mix.numel()
        return 2 * d * d + 3 * d                # the projection, the lerp

    def state_bytes(self, batch_size, seq_len, *, dtype=torch.bfloat16):
        return batch_size * self.mix.numel() * dtype.itemsize
