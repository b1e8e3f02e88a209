"""JEPA: predict representations instead of bytes (joint-embedding predictive architecture).

The context encoder is the model (byte embedding + backbone), giving h. The target encoder is an EMA copy of
it (I-JEPA: momentum 0.996 -> 1.0 over training, no gradient), giving z. Before z is compared it is normalised
(model.jepa.target_norm): by default each channel is standardised over the positions of its own sequence
(data2vec's instance norm). I-JEPA's LayerNorm over channels (`layer`) lets a next_latent encoder win by
collapsing onto slow features that are constant within a sequence (which part of the text this window comes
from): such targets are perfectly predictable at every offset yet say nothing about the next byte, and a
probe on them learns only byte frequencies. Instance norm removes every sequence-constant component from the
targets, so the encoder can lower its loss only with features that follow the bytes. A small predictor (its
own backbone, narrower and shallower) maps context representations to predicted targets. Modes
(model.jepa.mode):

  next_latent  causal encoder. For each offset k in jepa.offsets the predictor maps (h_t, k) to a prediction
               of z_{t+k} (or, with jepa.pool = P > 1, of the mean of z_{t+k} .. z_{t+k+P-1}); the predictor
               runs causally, so every prediction at t depends on bytes <= t only. The K offsets are stacked
               along the batch and run in one predictor call, each with a learned offset query added.
  masked_span  bidirectional encoder (I-JEPA / data2vec on bytes). jepa.spans spans of jepa.span_length
               bytes are hidden from the context encoder (a learned mask embedding replaces them: token
               dropping would break Mamba's ordering); the predictor sees the context outputs with a learned
               mask query at each hidden position and predicts the target encoder's latents there.
  hybrid       next_latent with jepa.ar_weight > 0: ar_weight x next-byte cross-entropy on the model's own
               (tied) head + latent_weight x the latent loss, as LLM-JEPA proposes.

Anti-collapse: EMA + stop-gradient by default; optional VICReg variance/covariance and LeJEPA's SIGReg terms
on the context representations. jepa.target_encoder=online drops both EMA and stop-gradient (the target is
the context encoder itself, with gradient): the setup that collapses, for ablations and for the monitors' test.

Quality on the bits-per-byte scale comes from a probe: a byte head (linear or a small MLP) on stop-gradient
context representations, trained jointly with the same optimizer but never sending gradient into the
encoder. next_latent reports its next-byte cross-entropy as `bpb` with `probe: 1.0`; masked_span reports a
masked-byte probe as `masked_probe_bpb` (a bidirectional encoder sees the next byte, so it has no LM bpb);
hybrid reports the model's own next-byte `bpb` with `probe: 0.0`. Each eval also measures the target
representations' health (archs/objectives/representation.py, on the target encoder's output before the
target normalisation) and warns on collapse, on slow collapse, and when the probe knows no more than the byte
frequencies (its bpb not below the eval text's unigram entropy, which the trainer passes as `unigram_bpb`).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor, nn

from archlab.archs.backbones.stack import ResidualStack
from archlab.archs.config import ModelConfig
from archlab.archs.model import Backbone, Model, Objective, batch_seeded_generator, next_byte_features, split_batch
from archlab.archs.objectives.autoregressive import AutoregressiveObjective, sample_autoregressively
from archlab.archs.objectives.representation import (
    SIGREG_KNOTS,
    collapse_warnings,
    effective_rank,
    mean_pairwise_cosine,
    no_information_warning,
    per_dim_std,
    sequence_share,
    sigreg,
    vicreg_covariance,
    vicreg_variance,
)

EVAL_SEED = 1_000_003  # salt of the per-batch eval generator (masked_span's spans)


def predictor_config(cfg: ModelConfig) -> ModelConfig:
    """The predictor's backbone settings: model.jepa.predictor_depth blocks of its mixer, narrower than the encoder
    (width d_model // 2, half the heads unless set), the encoder's other settings of that mixer kept."""
    jepa = cfg.jepa
    mixer = jepa.predictor_mixer_for(cfg.layer_mixers)
    heads = jepa.predictor_heads
    if heads is None and "attention" in cfg.mixers:
        heads = max(1, cfg.mixer_settings("attention").n_heads // 2)
    left_out = {"jepa", "mlp_hidden", "causal", "layers", *cfg.mixers}
    fields = {key: value for key, value in cfg.model_dump().items() if key not in left_out}
    try:
        return ModelConfig(**fields | {
            "objective": "autoregressive",  # any objective: the predictor's direction is passed explicitly
            "layers": f"{mixer}*{jepa.predictor_depth}",
            "d_model": jepa.predictor_width or max(1, cfg.d_model // 2),
            "n_layers": jepa.predictor_depth,
            mixer: cfg.mixer_settings(mixer).narrowed(heads),
        })
    except ValidationError as err:
        reason = err.errors()[0]["msg"].removeprefix("Value error, ")
        raise ValueError(f"jepa predictor: {reason}; set model.jepa.predictor_width / predictor_heads") from None


class LatentPredictor(nn.Module):
    """in_proj (d -> w) + a learned query per offset (or one mask query) -> backbone -> out_proj (w -> d)."""

    def __init__(self, cfg: ModelConfig, backbone: Backbone, *, d_out: int, n_queries: int, causal: bool):
        super().__init__()
        width = backbone.d_model
        self.causal = causal
        self.in_proj = nn.Linear(d_out, width, bias=False)
        self.queries = nn.Parameter(torch.empty(n_queries, width))
        self.backbone = backbone
        self.out_proj = nn.Linear(width, d_out, bias=False)
        for weight in (self.in_proj.weight, self.queries, self.out_proj.weight):
            nn.init.normal_(weight, mean=0.0, std=cfg.init_std)

    def forward_offsets(self, h: Tensor) -> Tensor:
        """h (B, L, d) -> predictions (K, B, L, d), one per offset query; the K runs share one backbone call."""
        projected = self.in_proj(h)  # the autocast dtype under autocast, whatever h's
        inputs = projected.unsqueeze(0) + self.queries[:, None, None, :].to(projected.dtype)
        k, b = inputs.shape[:2]
        out = self.backbone(inputs.flatten(0, 1), causal=self.causal)
        return self.out_proj(out).unflatten(0, (k, b))

    def forward_masked(self, h: Tensor, mask: Tensor) -> Tensor:
        """h (B, L, d), mask (B, L) -> predictions (B, L, d); hidden positions get the mask query instead of h."""
        projected = self.in_proj(h)
        inputs = torch.where(mask.unsqueeze(-1), self.queries[0].to(projected.dtype), projected)
        return self.out_proj(self.backbone(inputs, causal=self.causal))

    def flops_per_token(self, seq_len: int) -> int:
        projections = 2 * 2 * self.in_proj.in_features * self.in_proj.out_features
        return projections + self.backbone.flops_per_token(seq_len, causal=self.causal)


def normalise_targets(z: Tensor, how: str) -> Tensor:
    """(B, L, d) target-encoder outputs -> float32 targets: `instance` standardises each channel over the L
    positions of its sequence (data2vec), `layer` each vector over its d channels (I-JEPA).

    In next_latent mode the instance statistics span the whole window, bytes after t + k included, so the target
    at t + k carries a per-window offset and scale the predictor at t cannot know: a small irreducible part of the
    latent loss. It reaches neither the encoder's h_t, which stays a function of the bytes up to t, nor the probe.
    A causal variant (statistics of the positions up to t + k) would remove it; it was not needed to stop the
    collapse (quickstart: probe 2.95 bpb with whole-window statistics, 4.70 with LayerNorm targets)."""
    z = z.float()
    if how == "layer":
        return F.layer_norm(z, (z.shape[-1],))
    return F.instance_norm(z.transpose(1, 2)).transpose(1, 2)


class JepaObjective(Objective):
    byte_streams_only = True  # its probes and monitors are byte-level, one stream
    progress_metrics = ("effective_rank", "target_std", "sequence_share")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.settings = jepa = cfg.jepa
        self.vocab_size, self.d_model = cfg.vocab_size, cfg.d_model
        self.masked = jepa.mode == "masked_span"
        self.hybrid = jepa.ar_weight > 0
        self.quality_metric = "masked_probe_bpb" if self.masked else "bpb"
        self.quality_is_probe = not self.hybrid
        self.probe_task = "masked byte" if self.masked else "next byte"
        self._predictor_cfg = predictor_config(cfg)
        self.context_mask = nn.Parameter(torch.empty(cfg.d_model)) if self.masked else None
        if self.masked:
            nn.init.normal_(self.context_mask, mean=0.0, std=cfg.init_std)
        # hybrid: the model's own next-byte head (tied to the embedding by default), trained with the encoder
        self.lm = AutoregressiveObjective(cfg) if self.hybrid else None
        self.probe = None if self.hybrid else self._build_probe(cfg)
        self.predictor: LatentPredictor | None = None  # attach() builds it and the target encoder
        self.target: nn.ModuleDict | None = None

    @staticmethod
    def _build_probe(cfg: ModelConfig) -> nn.Module:
        d, vocab = cfg.d_model, cfg.vocab_size
        probe = nn.Linear(d, vocab) if cfg.jepa.probe == "linear" else nn.Sequential(
            nn.Linear(d, d), nn.GELU(), nn.Linear(d, vocab))
        for module in probe.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)
                nn.init.zeros_(module.bias)
        return probe

    # -- config questions ---------------------------------------------------------------------------
    @classmethod
    def causality(cls, cfg: ModelConfig) -> bool:
        return cfg.jepa.mode == "next_latent"

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        predictor_config(cfg)

    @classmethod
    def check_seq_len(cls, cfg: ModelConfig, seq_len: int) -> None:
        jepa = cfg.jepa
        if jepa.mode == "next_latent" and max(jepa.offsets) + jepa.pool > seq_len:
            raise ValueError(f"jepa: the largest offset ({max(jepa.offsets)}) + pool ({jepa.pool}) exceeds "
                             f"data.seq_len={seq_len}: no position would have a target; shrink jepa.offsets")
        if jepa.mode == "masked_span" and jepa.spans * jepa.span_length[1] >= seq_len:
            raise ValueError(f"jepa: {jepa.spans} spans of up to {jepa.span_length[1]} bytes could hide all of "
                             f"data.seq_len={seq_len}; use fewer or shorter spans")

    @classmethod
    def can_sample(cls, cfg: ModelConfig) -> bool:
        return cfg.jepa.mode == "next_latent"

    # -- objective-owned modules --------------------------------------------------------------------
    def attach(self, model: Model, *, kernels: Mapping[str, str] | None) -> None:
        pcfg = self._predictor_cfg
        backbone = ResidualStack(pcfg, causal=model.causal, kernels=kernels)
        queries = 1 if self.masked else len(self.settings.offsets)
        self.predictor = LatentPredictor(pcfg, backbone, d_out=self.d_model, n_queries=queries, causal=model.causal)
        if self.settings.target_encoder == "ema":  # starts equal to the context encoder, as in I-JEPA
            encoder = nn.ModuleDict({"embedding": model.embedding, "backbone": model.backbone})
            self.target = copy.deepcopy(encoder).requires_grad_(False)

    def separately_clipped_parameters(self) -> list[nn.Parameter]:
        return [] if self.probe is None else list(self.probe.parameters())

    def modules_to_compile(self) -> list[nn.Module]:
        target = [] if self.target is None else [self.target["backbone"]]
        return [*target, self.predictor.backbone]

    def momentum(self, step: int, max_steps: int) -> float:
        """EMA momentum after optimizer step `step` (0-based): linear from start to end over max_steps."""
        start, end = self.settings.ema_momentum_start, self.settings.ema_momentum_end
        return start + (end - start) * min(1.0, step / max(1, max_steps))

    @torch.no_grad()
    def after_optimizer_step(self, model: Model, step: int, max_steps: int) -> None:
        """target <- m * target + (1 - m) * context encoder, parameter by parameter."""
        if self.target is None:
            return
        weight = 1 - self.momentum(step, max_steps)
        online = [*model.embedding.parameters(), *model.backbone.parameters()]
        for target, source in zip(self.target.parameters(), online, strict=True):
            target.lerp_(source, weight)

    # -- the losses ---------------------------------------------------------------------------------
    def _targets(self, model: Model, x: Tensor, h_clean: Tensor | None) -> tuple[Tensor, Tensor]:
        """(normalised targets (B, L, d) in float32, the raw target-encoder outputs the monitors read); with an
        online target both come from the context encoder (h_clean when given), with gradient."""
        if self.target is None:
            z = h_clean if h_clean is not None else model(x)
        else:
            with torch.no_grad():
                z = self.target["backbone"](self.target["embedding"](x), causal=model.causal)
        return normalise_targets(z, self.settings.target_norm), z

    def _distance(self, prediction: Tensor, target: Tensor) -> Tensor:
        if self.settings.loss == "mse":
            return F.mse_loss(prediction.float(), target)
        return F.smooth_l1_loss(prediction.float(), target)

    def _next_latent(self, h: Tensor, z: Tensor) -> Tensor:
        """Mean over offsets k of the distance between predictions at t and (pooled) targets from t + k on."""
        pool = self.settings.pool
        # pooled[t] = mean of z[t .. t + pool - 1], for t = 0 .. L - pool
        sums = F.pad(z.cumsum(dim=1), (0, 0, 1, 0))
        pooled = (sums[:, pool:] - sums[:, :-pool]) / pool
        predictions = self.predictor.forward_offsets(h)
        losses = [self._distance(prediction[:, :pooled.shape[1] - k], pooled[:, k:])
                  for prediction, k in zip(predictions, self.settings.offsets, strict=True)]
        return torch.stack(losses).mean()

    def span_mask(self, shape: torch.Size, *, device, generator: torch.Generator | None = None) -> Tensor:
        """(B, L) bool: jepa.spans spans per row, lengths uniform in span_length, starts uniform where they fit."""
        rows, length = shape
        low, high = self.settings.span_length
        where = generator.device if generator is not None else device
        lengths = torch.randint(low, high + 1, (rows, self.settings.spans, 1), generator=generator, device=where)
        starts = (torch.rand(lengths.shape, generator=generator, device=where) * (length - lengths + 1)).long()
        positions = torch.arange(length, device=where)
        return ((positions >= starts) & (positions < starts + lengths)).any(dim=1).to(device)

    def _masked_context(self, model: Model, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """masked_span: (context representations (B, L, d) with the spans hidden, the span mask (B, L))."""
        mask = self.span_mask(x.shape, device=x.device, generator=generator)
        embedded = model.embedding(x)
        return model(torch.where(mask.unsqueeze(-1), self.context_mask.to(embedded.dtype), embedded)), mask

    def _forward(self, model: Model, batch: Tensor, generator: torch.Generator | None = None, *,
                 regularise: bool = True) -> dict[str, Tensor]:
        """Every term of the loss for one batch (regularisers only if `regularise`), plus the target latents."""
        x, next_bytes = split_batch(batch)
        terms: dict[str, Tensor] = {}
        if self.masked:
            h, mask = self._masked_context(model, x, generator)
            z, raw = self._targets(model, x, None)
            terms["latent"] = self._distance(self.predictor.forward_masked(h, mask)[mask], z[mask])
            terms["masked_probe"] = F.cross_entropy(self.probe_logits(h.detach()[mask]), x[mask])
        else:
            h = model(x)
            z, raw = self._targets(model, x, h)
            terms["latent"] = self._next_latent(h, z)
            if self.hybrid:
                terms["next_byte"] = F.cross_entropy(self.lm.project(model, h).flatten(0, 1), next_bytes.flatten())
            else:
                terms["probe"] = F.cross_entropy(self.probe_logits(h.detach()).flatten(0, 1), next_bytes.flatten())
        if regularise:
            terms |= self._regularisers(h.flatten(0, 1))
        terms["targets"] = raw.detach()
        return terms

    def _regularisers(self, h: Tensor) -> dict[str, Tensor]:
        """The optional anti-collapse terms on context representations h (N, d), those whose weight is > 0."""
        s = self.settings
        terms = {}
        if s.vicreg_variance_weight:
            terms["vicreg_variance"] = vicreg_variance(h)
        if s.vicreg_covariance_weight:
            terms["vicreg_covariance"] = vicreg_covariance(h)
        if s.sigreg_weight:
            terms["sigreg"] = sigreg(h, num_directions=s.sigreg_directions)
        return terms

    def _total(self, terms: dict[str, Tensor]) -> Tensor:
        s = self.settings
        weights = {"latent": s.latent_weight, "next_byte": s.ar_weight, "probe": 1.0, "masked_probe": 1.0,
                   "vicreg_variance": s.vicreg_variance_weight, "vicreg_covariance": s.vicreg_covariance_weight,
                   "sigreg": s.sigreg_weight}
        return sum(weights[name] * value for name, value in terms.items() if name != "targets")

    def _byte_metrics(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """The bits-per-byte figure under its honest name: the probe's or, in hybrid mode, the model's own."""
        if self.masked:
            return {"masked_probe_bpb": terms["masked_probe"] / math.log(2)}
        return {"bpb": terms["next_byte" if self.hybrid else "probe"] / math.log(2)}

    def loss(self, model: Model, batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        terms = self._forward(model, batch)
        total = self._total(terms)
        metrics = {"loss": total.detach(), **{f"{k}_loss": v.detach() for k, v in terms.items() if k != "targets"}}
        return total, metrics | {k: v.detach() for k, v in self._byte_metrics(terms).items()}

    @torch.no_grad()
    def evaluate(self, model: Model, batch: Tensor) -> dict[str, float]:
        """The probe (or hybrid) bpb, the latent loss and the collapse monitors on the target latents.

        Regularisers are training penalties and are not scored; masked_span's spans come from a generator
        seeded by the batch, so the same batch always gets the same figure.
        """
        generator = batch_seeded_generator(batch, EVAL_SEED) if self.masked else None
        terms = self._forward(model, batch, generator, regularise=False)
        # monitors read target-encoder outputs layer-normalised (scale-free), whatever target_norm trains on
        targets = F.layer_norm(terms["targets"].float(), (self.d_model,))
        vectors = targets.flatten(0, 1)
        metrics = {"latent_loss": terms["latent"], **self._byte_metrics(terms),
                   "target_std": per_dim_std(vectors).mean(), "effective_rank": effective_rank(vectors),
                   "mean_cosine": mean_pairwise_cosine(vectors), "sequence_share": sequence_share(targets)}
        metrics = {k: float(v) for k, v in metrics.items()}
        return metrics | {"probe": float(self.quality_is_probe), "n_bytes": batch.shape[0] * (batch.shape[1] - 1)}

    def health_warnings(self, metrics: dict[str, float], *, trained: bool = True) -> list[str]:
        """Collapse signs in the target representations, and a probe that knows nothing beyond byte frequencies.
        masked_span's probe scores the hidden bytes while `unigram_bpb` covers every eval byte: the two byte
        sets share one distribution, so the reference is good to ~0.02 bits there."""
        warnings = collapse_warnings(metrics["target_std"], metrics["effective_rank"], metrics["mean_cosine"],
                                     self.d_model, subject="target representations",
                                     sequence_share=metrics.get("sequence_share"))
        if trained and self.quality_is_probe and "unigram_bpb" in metrics:
            warnings += no_information_warning(metrics[self.quality_metric], metrics["unigram_bpb"],
                                               subject=self.quality_metric.replace("_", " "))
        return warnings

    def probe_features(self, model: Model, batch: Tensor) -> tuple[Tensor, Tensor]:
        """next_latent / hybrid: the context encoder's output at every position and the next bytes. masked_span:
        its output at the hidden positions of the eval spans (seeded by the batch, as in evaluate) and the bytes
        hidden there."""
        if not self.masked:
            return next_byte_features(model, batch)
        x, _ = split_batch(batch)
        h, mask = self._masked_context(model, x, batch_seeded_generator(batch, EVAL_SEED))
        return h.detach()[mask], x[mask]

    def probe_logits(self, hidden: Tensor) -> Tensor:
        """float32 byte logits of the probe, autocast off (as the LM heads: bf16 would blur the bpb it reports)."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.probe(hidden.float())

    # -- FLOPs --------------------------------------------------------------------------------------
    def head_flops_per_token(self, d_model: int) -> int:
        if self.hybrid:
            return 2 * d_model * self.vocab_size
        return sum(2 * m.in_features * m.out_features for m in self.probe.modules() if isinstance(m, nn.Linear))

    def training_flops_per_token(self, model: Model, seq_len: int) -> int:
        """3x forward for everything trained (encoder, head or probe, predictor once per offset) + one forward
        of the EMA target encoder (masked_span's online target is a second, trained, encoder pass) + the
        regularisers. The probe's backward needs no input gradient, so 3x slightly over-counts it."""
        s = self.settings
        encoder = model.backbone.flops_per_token(seq_len, causal=model.causal)
        total = 3 * (encoder + self.head_flops_per_token(self.d_model))
        if self.target is not None:
            total += encoder
        elif self.masked:
            total += 3 * encoder
        runs = 1 if self.masked else len(s.offsets)
        total += 3 * runs * self.predictor.flops_per_token(seq_len)
        d = self.d_model
        if s.vicreg_covariance_weight:
            total += 3 * 2 * d * d  # the (d, d) covariance: one multiply-add per pair of dims per token
        if s.sigreg_weight:
            total += 3 * (2 * d * s.sigreg_directions + 4 * s.sigreg_directions * SIGREG_KNOTS)
        return total

    # -- sampling -----------------------------------------------------------------------------------
    def logits(self, model: Model, tokens: Tensor, cache=None) -> Tensor:
        """next_latent: float32 next-byte logits from the probe (hybrid: from the model's own head)."""
        hidden = model(tokens, cache=cache)
        return self.lm.project(model, hidden) if self.hybrid else self.probe_logits(hidden)

    def sample(self, model: Model, prompt: Tensor, n_tokens: int, **kwargs) -> Tensor:
        """next_latent/hybrid: bytes drawn from the probe (or the model's head), KV-cached like the AR sampler."""
        if self.masked:
            raise ValueError("jepa mode masked_span cannot generate text (its encoder is bidirectional); "
                             "set sample.tokens=0")
        return sample_autoregressively(self, model, prompt, n_tokens, **kwargs)
