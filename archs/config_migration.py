"""Model configs in the format before the mixer registry (archlab <= 02f8241), read as today's.

Then a stack was `backbone: transformer | mamba | hybrid` (+ `attn_layers` for hybrid) and every mixer's settings
were flat model keys. Today the stack is model.layers and the settings live under model.<mixer>. Users' files, saved
run configs and checkpoints' meta.json still load: the old keys are rewritten on load, and one line says how.
"""
from __future__ import annotations

import sys
from typing import Any

from archlab.archs.pattern import compact

# flat key of the old format -> the mixer whose settings it is now
LEGACY_MIXER_KEYS = {
    "n_heads": "attention", "n_kv_heads": "attention", "rope_theta": "attention",
    "d_state": "mamba", "d_conv": "mamba", "expand": "mamba", "dt_rank": "mamba", "dt_min": "mamba",
    "dt_max": "mamba", "dt_init_floor": "mamba", "conv_bias": "mamba",
}
LEGACY_PREDICTOR_MIXERS = {"transformer": "attention", "mamba": "mamba"}
_said: set[str] = set()


def say_once(message: str) -> None:
    """A one-line note on stderr, once per process for the same message (configs are validated many times)."""
    if message not in _said:
        _said.add(message)
        print(f"note: {message}", file=sys.stderr)


def migrate_legacy_model(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]], list[str]]:
    """(data with backbone/attn_layers rewritten as layers, the old flat mixer keys taken out by mixer, what changed).
    The caller moves the flat keys of mixers the model uses into their sections and drops the rest."""
    data = dict(data)
    changes = []
    if "backbone" in data or "attn_layers" in data:
        if "layers" in data:
            raise ValueError("model.backbone and model.attn_layers are the old form of model.layers; "
                             "give model.layers alone")
        backbone, attn_layers = data.pop("backbone", "transformer"), data.pop("attn_layers", None)
        data["layers"] = _legacy_layers(backbone, attn_layers, data.get("n_layers", 4))
        old = f"backbone={backbone}" + (f", attn_layers={attn_layers}" if attn_layers is not None else "")
        changes.append(f"{old} -> layers={data['layers']!r}")
    flat: dict[str, dict[str, Any]] = {}
    for key in [k for k in data if k in LEGACY_MIXER_KEYS]:
        flat.setdefault(LEGACY_MIXER_KEYS[key], {})[key] = data.pop(key)
    return data, flat, changes


def _legacy_layers(backbone: Any, attn_layers: Any, n_layers: Any) -> str:
    if backbone in ("transformer", "mamba"):
        if attn_layers is not None:
            raise ValueError(f"attn_layers is for backbone=hybrid, not {backbone}; remove model.attn_layers")
        return backbone
    if backbone != "hybrid":
        raise ValueError(f"unknown backbone {backbone!r} (the old form of model.layers); choose transformer, mamba "
                         "or hybrid, or write model.layers, e.g. 'mamba*3,attention'")
    if not attn_layers or not isinstance(attn_layers, list) or not isinstance(n_layers, int):
        raise ValueError("backbone=hybrid needs model.attn_layers, the indices of its attention blocks "
                         "(e.g. [1]); or write model.layers, e.g. 'mamba,attention'")
    outside = [i for i in attn_layers if not (isinstance(i, int) and 0 <= i < n_layers)]
    if outside:
        raise ValueError(f"attn_layers {outside} outside 0..{n_layers - 1} (n_layers={n_layers})")
    if len(set(attn_layers)) != len(attn_layers):
        raise ValueError(f"attn_layers {attn_layers} repeats an index; list each attention layer once")
    return compact(["attention" if i in attn_layers else "mamba" for i in range(n_layers)])


def merge_flat_keys(given: dict[str, Any], flat: dict[str, dict[str, Any]], used: list[str],
                    changes: list[str]) -> dict[str, Any]:
    """The model.<mixer> sections with the old flat keys of used mixers moved in; says what changed, once."""
    given = dict(given)
    dropped = []
    for mixer, keys in flat.items():
        if mixer not in used:
            dropped += keys
            continue
        section = dict(given.get(mixer) or {})
        for key, value in keys.items():
            if key in section:
                raise ValueError(f"model.{key} (old form) and model.{mixer}.{key} are both set; keep "
                                 f"model.{mixer}.{key}")
            section[key] = value
            changes.append(f"{key} -> {mixer}.{key}")
        given[mixer] = section
    if dropped:
        changes.append(f"dropped {', '.join(dropped)} (settings of a mixer no layer uses)")
    if changes:
        say_once(f"old model keys read as today's: {'; '.join(changes)}; write the new form in your config")
    return given


def migrate_legacy_predictor(data: Any) -> Any:
    """model.jepa: the old predictor_backbone (transformer | mamba) is read as predictor_mixer."""
    if not isinstance(data, dict) or "predictor_backbone" not in data:
        return data
    data = dict(data)
    old = data.pop("predictor_backbone")
    if old is not None:
        if "predictor_mixer" in data:
            raise ValueError("jepa.predictor_backbone (old form) and jepa.predictor_mixer are both set; "
                             "keep jepa.predictor_mixer")
        data["predictor_mixer"] = LEGACY_PREDICTOR_MIXERS.get(old, old)
        say_once(f"old key read as today's: jepa.predictor_backbone={old} -> jepa.predictor_mixer="
                 f"{data['predictor_mixer']}; write the new form in your config")
    return data
