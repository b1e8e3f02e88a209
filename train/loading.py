"""Loading a run is not training it: `load_run(run_dir)` gives a run's config, weights and data for scoring,
sampling, probing and comparing, with no optimizer, data sampler, process group or DDP/FSDP wrapper.

The pieces a loaded run and the Trainer share live here too (device, corpus, kernel backends, autocast, eval
windows, the byte-weighted eval mean, sampling), so `archlab eval` scores a checkpoint exactly as training did.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from archlab.archs.model import Model
from archlab.archs.config import BYTE_VOCAB_SIZE
from archlab.archs.registry import OBJECTIVES, build_model
from archlab.kernels.backend import resolve_backend
from archlab.train import checkpoint as ckpt
from archlab.train.config import Config, run_config
from archlab.train.corpus import Corpus, open_corpus
from archlab.train.data import eval_batches
from archlab.train.tokenizers import ByteTokenizer
from archlab.train.errors import CheckpointError, ConfigError, DataError
from archlab.train.ngram import ByteNgrams


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def open_run_corpus(cfg: Config) -> Corpus:
    """The run's corpus (train/corpus.py), with what it decides written into cfg: model.vocab_size from the
    tokenizer, data.identity from a prepared dataset. A config that already names another vocabulary (but the byte
    default) or dataset (a saved run's, or one set by hand) is refused in one line."""
    corpus = open_corpus(cfg)
    objective = cfg.model.objective
    if OBJECTIVES[objective].byte_streams_only and (corpus.tokenizer.spec != "bytes" or corpus.has_documents):
        raise ConfigError(f"objective {objective} reads one stream of bytes: set data.packing=stream and use a byte "
                          "corpus (data.tokenizer=bytes)")
    vocab = corpus.tokenizer.vocab_size
    # 256 is the byte default a saved or dumped config (a study's arm) carries: the tokenizer replaces it
    if cfg.model.vocab_size not in (BYTE_VOCAB_SIZE, vocab):
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but the tokenizer ({corpus.tokenizer.spec}) has "
                          f"{vocab} tokens; remove model.vocab_size (the tokenizer sets it)")
    if cfg.data.identity is not None and cfg.data.identity != corpus.identity:
        raise DataError(f"the run was trained on data with manifest sha256 {cfg.data.identity} but {cfg.data.path} "
                        f"now has {corpus.identity}; point data.path at the run's dataset or start a new run.dir")
    cfg.model.vocab_size, cfg.data.identity = vocab, corpus.identity
    return corpus


def check_kernel_backends(model: Model, cfg: Config, device: torch.device) -> None:
    """Every kernel op the model runs has a backend on `device` (e.g. no GPU-only peer on a CPU machine); a
    setting for an op the model never runs is moot. A Triton kernel that will run passes its self-check now, in
    float32 and in the autocast dtype (kernels/self_check.py): before any output is written, and before
    torch.compile traces the model (no kernel can run inside a trace)."""
    kernels = cfg.kernels.model_dump()  # op name -> backend name
    dtypes = dict.fromkeys([torch.float32, autocast_dtype(cfg, device) or torch.float32])
    for op in sorted(model.kernel_ops()):
        try:
            for dtype in dtypes:
                resolve_backend(op, kernels[op], device, dtype)
        except ValueError as err:
            raise ConfigError(f"kernels.{op}: {err}") from None


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 when train.precision says so, or on CUDA under `auto`; None means fp32 (no autocast)."""
    precision = cfg.train.precision
    return torch.bfloat16 if precision == "bf16" or (precision == "auto" and device.type == "cuda") else None


def autocast(dtype: torch.dtype | None, device: torch.device):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def eval_windows(corpus: Corpus, cfg: Config, split: str = "val", *,
                 whole_split: bool = False) -> list[torch.Tensor]:
    """The eval windows of a split (val, test) as the run's eval set is cut: train.eval_tokens tokens, or all."""
    return eval_batches(corpus.split(split), seq_len=cfg.data.seq_len,
                        batch_size=cfg.train.micro_batch_size or cfg.train.batch_size,
                        max_tokens=None if whole_split else cfg.train.eval_tokens,
                        doc_starts=corpus.doc_starts.get(split))


def unigram_reference(corpus: Corpus) -> ByteNgrams:
    """The train split's token frequencies, on the bits-per-byte scale of the run's tokenizer."""
    return ByteNgrams(corpus.train, corpus.tokenizer.vocab_size, corpus.tokenizer.token_bytes)


def byte_weighted_sums(score: Callable[[torch.Tensor], dict], batches: Iterable[torch.Tensor]) -> tuple[dict, int]:
    """Sums over batches of each metric times the batch's scored bytes (`n_bytes`), and the bytes in all."""
    totals: dict[str, float] = {}
    weight = 0
    for batch in batches:
        metrics = score(batch)
        n = metrics.pop("n_bytes")
        weight += n
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + float(value) * n
    return totals, weight


def sample_text(model: Model, cfg: Config, device: torch.device, dtype: torch.dtype | None, prompt: str,
                n_tokens: int, *, temperature: float, top_k: int | None, seed: int, tokenizer=None, **options) -> str:
    """`prompt` continued by `n_tokens` tokens of `tokenizer` (default bytes), decoded through it; `options`: the
    objective's own sampler settings (Objective.sample_options), e.g. diffusion steps."""
    tokenizer = tokenizer or ByteTokenizer()
    prompt_ids = torch.as_tensor(tokenizer.encode(prompt), dtype=torch.long)[None].to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with autocast(dtype, device):
        out = model.objective.sample(model, prompt_ids, n_tokens, temperature=temperature, top_k=top_k,
                                     generator=generator, context_len=cfg.data.seq_len, **options)
    return tokenizer.decode(out[0].tolist())


@dataclass
class LoadedRun:
    """A run's model with the weights of one checkpoint, on one device, in eval mode, with its corpus."""

    cfg: Config
    model: Model
    corpus: Corpus
    device: torch.device
    autocast_dtype: torch.dtype | None
    checkpoint: Path
    step: int

    def autocast(self):
        return autocast(self.autocast_dtype, self.device)

    def eval_windows(self, split: str = "val", *, whole_split: bool = False) -> list[torch.Tensor]:
        return eval_windows(self.corpus, self.cfg, split, whole_split=whole_split)

    @torch.no_grad()
    def evaluate(self, batches: list[torch.Tensor] | None = None) -> dict[str, float]:
        """The objective's metrics over `batches` (default: the run's val eval set), byte-weighted as the
        Trainer reports them, plus `unigram_bpb` (the train split's byte frequencies on the same bytes)."""
        batches = self.eval_windows() if batches is None else batches

        def score(batch: torch.Tensor) -> dict:
            with self.autocast():
                return self.model.objective.evaluate(self.model, batch.to(self.device))

        totals, weight = byte_weighted_sums(score, batches)
        return {key: value / weight for key, value in totals.items()} | {
            "unigram_bpb": unigram_reference(self.corpus).unigram_bpb(batches)}

    def sample_text(self, prompt: str, n_tokens: int, **settings) -> str:
        return sample_text(self.model, self.cfg, self.device, self.autocast_dtype, prompt, n_tokens,
                           tokenizer=self.corpus.tokenizer, **settings)


def load_run(run_dir: str | Path, device: str | None = None, *, checkpoint: str | Path | None = None,
             purpose: str = "evaluate") -> LoadedRun:
    """The run in `run_dir` at its latest checkpoint (or `checkpoint`, a checkpoint directory), on `device`
    (default: the run's train.device). `purpose` (what the caller will do) words the error for a run with no
    checkpoint yet. Bad input is a one-line UserError; nothing is written."""
    cfg = run_config(run_dir, device, need_checkpoint=None if checkpoint else purpose)
    if checkpoint and not (Path(checkpoint) / "meta.json").exists():
        raise CheckpointError(f"{checkpoint} is not a checkpoint directory (no meta.json)")
    path = Path(checkpoint) if checkpoint else ckpt.latest_checkpoint(Path(run_dir))
    where = resolve_device(cfg.train.device)
    corpus = open_run_corpus(cfg)
    model = build_model(cfg.model, kernels=cfg.kernels.model_dump())
    model.set_token_bytes(corpus.tokenizer.token_bytes)
    check_kernel_backends(model, cfg, where)
    model = model.to(where)
    meta = ckpt.load_weights(path, model, cfg.model.model_dump(mode="json"))
    model.eval()
    return LoadedRun(cfg=cfg, model=model, corpus=corpus, device=where, autocast_dtype=autocast_dtype(cfg, where),
                     checkpoint=path, step=meta["step"])
