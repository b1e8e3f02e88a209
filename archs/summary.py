"""What a model is made of, block by block: `archlab model CONFIG` prints it."""
from __future__ import annotations

import torch

from archlab.archs.model import Model


def describe_stack(model: Model, seq_len: int, *, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """One row per block (layer, mixer, trained parameters, forward FLOPs per token at seq_len, decoding state bytes
    per sequence after seq_len positions), then the embedding and the objective's own parts, then the total."""
    backbone, causal = model.backbone, model.causal
    rows = [{"layer": str(i), "mixer": type(block.mixer).name + (" + mlp" if block.mlp is not None else ""),
             "params": _trained(block), "flops_per_token": block.flops_per_token(seq_len, causal=causal),
             "state_bytes": block.state_bytes(1, seq_len, dtype=dtype)}
            for i, block in enumerate(backbone.blocks)]
    objective_params = model.num_parameters() - sum(r["params"] for r in rows) - model.embedding.weight.numel()
    rows.append({"layer": "embedding + final norm", "mixer": "", "state_bytes": 0,
                 "params": model.embedding.weight.numel() + _trained(backbone.norm), "flops_per_token": 0})
    rows.append({"layer": f"objective ({model.objective.__class__.__name__})", "mixer": "", "state_bytes": 0,
                 "params": objective_params - _trained(backbone.norm),
                 "flops_per_token": model.flops_per_token(seq_len) - backbone.flops_per_token(seq_len, causal=causal)})
    rows.append({"layer": "total", "mixer": "", "params": model.num_parameters(),
                 "flops_per_token": model.flops_per_token(seq_len),
                 "state_bytes": sum(r["state_bytes"] for r in rows)})
    return rows


LONG_CONTEXT_MULTIPLE = 4  # summaries also give the state at 4x the trained length: what decoding further costs


def decoding_state_bytes(model: Model, seq_len: int, *, dtype: torch.dtype) -> dict:
    """One sequence's decoding state in bytes after seq_len positions and after LONG_CONTEXT_MULTIPLE x seq_len
    (a KV cache grows with it, a recurrent state does not), with the activations' dtype; all None for a model that
    runs bidirectionally and keeps no state between positions (masked diffusion's sampler reruns the whole
    sequence); block diffusion caches its finished blocks' keys and values, as a causal model does."""
    if not (model.causal or model.objective.caches_while_sampling):
        return {"state_bytes": None, f"state_bytes_{LONG_CONTEXT_MULTIPLE}x": None, "state_dtype": None}
    longer = LONG_CONTEXT_MULTIPLE * seq_len
    return {"state_bytes": model.backbone.state_bytes(1, seq_len, dtype=dtype),
            f"state_bytes_{LONG_CONTEXT_MULTIPLE}x": model.backbone.state_bytes(1, longer, dtype=dtype),
            "state_dtype": str(dtype).removeprefix("torch.")}


def _trained(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
