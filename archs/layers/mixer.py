"""Sequence mixers: the one interface every mixer implements, and the registry that names them.

A mixer is one file under archs/layers/ (or anywhere outside the package) that subclasses `Mixer` and
decorates it with `@register_mixer`. It owns:
  - `settings`: its typed settings, a `MixerSettings` subclass; they appear in a config as `model.<name>.*`
    and hold `mlp`, whether its blocks add a SwiGLU after it;
  - `kernel_ops`: the kernel ops (kernels/) it runs, whose backends `kernels.<op>` chooses;
  - its decoding state (`new_state`; `forward(..., state=)` prefills an empty one, then advances it);
  - `flops_per_token(seq_len, causal=)` and `state_bytes(batch_size, seq_len)`;
  - which parameters take no weight decay (`no_weight_decay(param)`, mamba_ssm's `_no_weight_decay` marker)
    and which linear layers write into the residual stream (`writes_residual(linear)`: scaled at init);
  - `forward(x, causal=, state=, documents=)`: with `documents` (packed rows) it keeps documents apart: no
    position reads another document and recurrent state restarts at each one (archs/documents.py);
  - `bidirectional`: "per_call" (the same weights run either way, e.g. attention), "built" (a bidirectional
    layer has other weights, e.g. Mamba's reversed scan: subclass `BuiltDirectionMixer`), or "no" (it can only run
    causally); settings can narrow it further (`MixerSettings.causal_only`: attention with a sliding window runs
    causally only);
  - `block_causal`: whether forward also takes `layout=` (archs/block_layout.py), an arbitrary pattern of keys to
    read and positions, which block diffusion needs (attention can; a recurrence reads its inputs in order only).
Blocks, stacks, configs, FLOPs accounting and `archlab model` find everything through this interface.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from archlab.archs.documents import Documents
from archlab.kernels.backend import check_backend


class MixerSettings(BaseModel):
    """model.<mixer>: a mixer's settings. Subclasses add fields and override the hooks they need."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    mlp: bool = Field(False, description="whether each block of this mixer adds a SwiGLU MLP after it")

    def check(self, d_model: int) -> None:
        """Raises ValueError (one line) when these settings cannot work at width d_model."""

    def check_kernels(self, d_model: int, kernels: Mapping[str, str]) -> None:
        """Raises ValueError (one line) when a chosen kernel backend cannot run these settings."""

    def causal_only(self) -> str | None:
        """Why these settings make the mixer run causally only (a clause naming the key), or None when they don't:
        a bidirectional model then refuses them, as it refuses a mixer whose `bidirectional` is "no"."""
        return None

    def d_model_multiple(self) -> int:
        """d_model must be a multiple of this (a study solving d_model steps by it)."""
        return 1

    def narrowed(self, heads: int | None = None) -> "MixerSettings":
        """Settings of a narrower copy of this mixer (a JEPA predictor); `heads` is the predictor's head count
        for mixers that have heads. Default: the same settings."""
        return self.model_copy()


class Mixer(nn.Module):
    """(B, L, d) -> (B, L, d), pre-normed by its block; the block adds the output to the residual stream."""

    name: ClassVar[str]
    settings: ClassVar[type[MixerSettings]]
    kernel_ops: ClassVar[tuple[str, ...]] = ()
    bidirectional: ClassVar[Literal["per_call", "built", "no"]] = "per_call"
    block_causal: ClassVar[bool] = False

    def __init__(self, d_model: int, settings: MixerSettings, *, causal: bool, kernels: Mapping[str, str] | None):
        """`causal` is how the model runs (a "built" mixer builds its direction's weights); `kernels` maps an op
        to a backend name (missing = auto)."""
        super().__init__()

    def forward(self, x: Tensor, *, causal: bool, state=None, documents: Documents | None = None) -> Tensor:
        """`documents` (training on packed rows, never with a state): no position may read another document,
        and recurrences restart at each document (archs/documents.py)."""
        raise NotImplementedError  # pragma: no cover - interface

    def new_state(self, batch_size: int, max_len: int, *, dtype: torch.dtype, device: torch.device):
        """Empty decoding state for up to max_len positions; it has a `.length` (positions seen)."""
        raise NotImplementedError(f"mixer {self.name} has no decoding state")  # pragma: no cover - interface

    def flops_per_token(self, seq_len: int, *, causal: bool) -> int:  # pragma: no cover - interface
        """Forward FLOPs per token (2 per multiply-add) at this sequence length, analytic."""
        raise NotImplementedError

    def state_bytes(self, batch_size: int, seq_len: int, *, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of decoding state after seq_len positions (a KV cache grows with it, an SSM state does not);
        `dtype` is the activations' (states kept in float32 count as such)."""
        raise NotImplementedError(f"mixer {self.name} does not report its state size")  # pragma: no cover


class RecurrentState:
    """Decoding state of a conv + recurrence mixer (Mamba, Mamba-2, Gated DeltaNet): `conv_state` (B, channels,
    width - 1), the last pre-conv inputs in the activations' dtype; subclasses add the recurrence's state."""

    def __init__(self, batch_size: int, channels: int, conv_width: int, *, dtype: torch.dtype,
                 device: torch.device | str):
        self.conv_state = torch.zeros(batch_size, channels, conv_width - 1, dtype=dtype, device=device)
        self.length = 0

    def keep_conv_inputs(self, x: Tensor) -> None:
        """After a prefill: the last width - 1 pre-conv inputs of x (B, channels, L), zeros in front when L is
        shorter, for the conv's decoding steps."""
        self.conv_state.copy_(F.pad(x, (self.conv_state.shape[-1] - x.shape[-1], 0)))


class BuiltDirectionMixer(Mixer):
    """A mixer whose bidirectional layers hold weights of their own (bidirectional = "built", e.g. Mamba's reversed
    scan): a layer runs only the way it was built, and only a causal one decodes. `title` names it in errors."""

    bidirectional = "built"
    title: ClassVar[str]

    def __init__(self, d_model: int, settings: MixerSettings, *, causal: bool, kernels: Mapping[str, str] | None):
        super().__init__(d_model, settings, causal=causal, kernels=kernels)
        self.built_causal = causal

    def check_call(self, causal: bool, state: RecurrentState | None, u: Tensor,
                   documents: Documents | None = None) -> None:
        """Where forward starts: the direction it was built for; with a state, a causal layer and the state's batch;
        documents that describe u (B, L, d), and never with a state."""
        batch_size = u.shape[0]
        if causal != self.built_causal:
            built = "causal" if self.built_causal else "bidirectional"
            raise ValueError(f"this {self.title} layer was built {built} but is called with causal={causal}; "
                             "build the model with the causal setting it runs with (build_model does)")
        if documents is not None:
            check_documents(documents, state, u, self.title)
        if state is not None:
            self.check_decodes()
            if state.conv_state.shape[0] != batch_size:
                raise ValueError(f"{self.title} state was made for batch {state.conv_state.shape[0]} but got "
                                 f"{batch_size}; make a new cache for this batch")

    def check_decodes(self) -> None:
        if not self.built_causal:
            raise ValueError(f"a bidirectional {self.title} cannot decode (each output reads later positions); "
                             "sample from a causal model")


def check_documents(documents: Documents, state, x: Tensor, title: str) -> None:
    """Packed documents describe x's (batch, length) and come without a decoding state."""
    if state is not None:
        raise ValueError(f"{title}: packed documents are for training and scoring, not decoding; call without "
                         "documents when passing a state")
    documents.check_matches(x, title)


MIXERS: dict[str, type[Mixer]] = {}


def register_mixer(cls: type[Mixer]) -> type[Mixer]:
    """Class decorator: makes `cls` available under `cls.name` in model.layers patterns and configs."""
    if not (isinstance(cls, type) and issubclass(cls, Mixer)):
        raise TypeError(f"register_mixer takes a Mixer subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"mixer {cls.__name__} needs a class attribute `name` that is an identifier, got {name!r}")
    if not (isinstance(getattr(cls, "settings", None), type) and issubclass(cls.settings, MixerSettings)):
        raise TypeError(f"mixer {name} needs a class attribute `settings`, a MixerSettings subclass")
    if cls.bidirectional not in ("per_call", "built", "no"):
        raise ValueError(f"mixer {name}: bidirectional must be per_call, built or no, got {cls.bidirectional!r}")
    for op in cls.kernel_ops:
        check_backend(op, "auto")
    if MIXERS.get(name, cls) is not cls:
        raise ValueError(f"a different mixer is already registered as {name!r}; choose another name")
    MIXERS[name] = cls
    return cls


def closest(name: str, options: Iterable[str]) -> str:
    """The tail of an 'unknown name' error: a close match if there is one, else every option."""
    options = list(options)
    match = difflib.get_close_matches(name, options, n=1)
    return f"; did you mean {match[0]!r}?" if match else f"; choose from {', '.join(options)}"


def mixer_class(name: str) -> type[Mixer]:
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}{closest(name, MIXERS)}")
    return MIXERS[name]


def writes_residual(linear: nn.Linear) -> nn.Linear:
    """Marks a projection whose output is added to the residual stream: the stack scales its init down by
    1/sqrt(writes in the stack), as GPT-2 and mamba_ssm do."""
    linear.writes_residual = True
    return linear


def no_weight_decay(*params: nn.Parameter) -> None:
    """Marks parameters the optimizer must not decay (mamba_ssm's `_no_weight_decay`, which the trainer honours)."""
    for param in params:
        param._no_weight_decay = True


def backend_for(kernels: Mapping[str, str] | None, op: str) -> str:
    """The backend name chosen for `op` (missing = auto), checked so a bad name fails at construction."""
    name = (kernels or {}).get(op, "auto")
    check_backend(op, name)
    return name
