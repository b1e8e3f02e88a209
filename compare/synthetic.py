"""Synthetic recall tasks (Zoology-style): MQAR, selective copying, induction heads; train and score.

Every token id is a byte (0..255). The ranges are disjoint, so a key can never be mistaken for filler:
  0         COPY_MARKER  selective copy: "now write the data tokens back"
  1         BLANK        selective copy: the noise token the data tokens are scattered among
  2..15     TRIGGERS     induction heads: the tokens whose successor must be recalled
  16..127   KEYS         MQAR keys
  128..223  VALUES       MQAR values; selective-copy data tokens; induction-heads content and answers
  224..255  FILLER       MQAR filler between the queries

Targets follow the autoregressive objective's alignment: position t predicts token t + 1, so
targets[b, t] = inputs[b, t + 1] at scored positions and -100 elsewhere. The answer itself is in the
input (as text would have it), right after the position that must predict it.

A mixture (SyntheticMixture, Zoology's multi-query setup) trains one model on several (seq_len, n_pairs) settings
of a task at once, each batch drawn from one setting (so trained at its own length, unpadded; the batches of all
settings shuffled together), and scores each test setting apart.

Layouts (L = seq_len, n = n_pairs):
  mqar            [k1 v1 ... kn vn] then L - 2n positions of FILLER holding n queries, each a key followed by
                  its value, at even offsets 2g from the end of the pairs (as Zoology's multiquery_ar). Keys
                  and values are distinct within a sequence; every key is queried once; the offsets g are
                  drawn without replacement with P(g) ~ (g + 1)^(power_a - 1) (power_a=1: uniform; small:
                  queries crowd near the pairs, as repeated bigrams do in text). Scored: each query key.
  selective_copy  L - n - 1 positions of BLANK with n data tokens (repeats allowed) at random places, then
                  COPY_MARKER, then the n data tokens in order. Scored: the marker and the first n - 1 copies.
  induction_heads random content tokens; n distinct triggers each placed once, followed by a random answer;
                  the last 2n positions repeat the triggers in random order, each followed by its answer.
                  n = 1 is the classic induction-heads task. Scored: each trigger in the final 2n positions.
"""
from __future__ import annotations

import time
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from archlab.archs.config import ModelConfig
from archlab.archs.registry import build_model
from archlab.kernels.common.schedule import lr_at
from archlab.train.trainer import parameter_groups

IGNORE = -100
COPY_MARKER = 0
BLANK = 1
TRIGGERS = range(2, 16)
KEYS = range(16, 128)
VALUES = range(128, 224)
FILLER = range(224, 256)

# Train set and test set come from different streams of the same seed (Zoology keeps them apart too).
TEST_SEED_OFFSET = 1_000_003


class SyntheticTask(BaseModel):
    """One synthetic setting; n_pairs means key-value pairs (mqar), data tokens (selective_copy) or triggers
    (induction_heads)."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["mqar", "selective_copy", "induction_heads"]
    seq_len: int = Field(gt=1, le=65536)
    n_pairs: int = Field(gt=0)
    train_examples: int = Field(gt=0)
    test_examples: int = Field(gt=0)
    power_a: float = Field(0.01, gt=0, le=1, description="mqar: power law of the query offsets (1 = uniform)")
    vocab: Optional[int] = Field(None, gt=0, le=len(VALUES), description="mqar: distinct key ids and value ids drawn "
                                 "from (the first of each range); None = all")

    @model_validator(mode="after")
    def _fits(self) -> "SyntheticTask":
        n, length = self.n_pairs, self.seq_len
        if self.task == "mqar":
            if n > self.vocab_size:
                raise ValueError(f"mqar n_pairs={n} exceeds the {self.vocab_size} distinct values available "
                                 "(vocab); use fewer pairs or a larger vocab")
            if 4 * n > length:
                raise ValueError(f"mqar needs seq_len >= 4 * n_pairs (pairs then one query + answer per pair), "
                                 f"got seq_len={length}, n_pairs={n}")
        elif self.task == "selective_copy":
            if 2 * n + 1 > length:
                raise ValueError(f"selective_copy needs seq_len >= 2 * n_pairs + 1 (noisy region, marker, copy), "
                                 f"got seq_len={length}, n_pairs={n}")
        else:
            if n > len(TRIGGERS):
                raise ValueError(f"induction_heads n_pairs={n} exceeds the {len(TRIGGERS)} trigger tokens; "
                                 "use fewer triggers")
            if 4 * n > length:
                raise ValueError(f"induction_heads needs seq_len >= 4 * n_pairs (each trigger + answer twice), "
                                 f"got seq_len={length}, n_pairs={n}")
        return self

    @property
    def vocab_size(self) -> int:
        return self.vocab or min(len(KEYS), len(VALUES))


class Setting(BaseModel):
    """One (seq_len, n_pairs) point of a mixture."""

    model_config = ConfigDict(extra="forbid")

    seq_len: int = Field(gt=1, le=65536)
    n_pairs: int = Field(gt=0)

    @property
    def label(self) -> str:
        return f"L{self.seq_len}×{self.n_pairs}"


class SyntheticMixture(BaseModel):
    """Zoology's multi-query setup: one model trained on every `train` setting of a task at once (train_examples
    each, shuffled together), scored on each `test` setting apart (test_examples each; default: the train ones)."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["mqar", "selective_copy", "induction_heads"]
    train: list[Setting] = Field(min_length=1)
    test: Optional[list[Setting]] = Field(None, min_length=1)
    train_examples: int = Field(gt=0, description="per train setting")
    test_examples: int = Field(gt=0, description="per test setting")
    power_a: float = Field(0.01, gt=0, le=1, description="mqar: power law of the query offsets (1 = uniform)")
    vocab: Optional[int] = Field(None, gt=0, le=len(VALUES), description="mqar: as SyntheticTask.vocab")

    @model_validator(mode="after")
    def _every_setting_fits(self) -> "SyntheticMixture":
        for role, settings in (("train", self.train), ("test", self.test or [])):
            for setting in settings:
                try:
                    self._part(setting, self.train_examples)
                except ValueError as err:  # pydantic's own message, less its "1 validation error" header
                    reason = err.errors()[0]["msg"].removeprefix("Value error, ") if hasattr(err, "errors") else err
                    raise ValueError(f"{role} setting {setting.label}: {reason}") from None
        return self

    def _part(self, setting: Setting, examples: int) -> SyntheticTask:
        return SyntheticTask(task=self.task, seq_len=setting.seq_len, n_pairs=setting.n_pairs, train_examples=examples,
                             test_examples=self.test_examples, power_a=self.power_a, vocab=self.vocab)

    @property
    def train_tasks(self) -> list[SyntheticTask]:
        return [self._part(setting, self.train_examples) for setting in self.train]

    @property
    def test_tasks(self) -> list[SyntheticTask]:
        return [self._part(setting, self.train_examples) for setting in self.test or self.train]

    @property
    def trained_on(self) -> str:
        return ", ".join(setting.label for setting in self.train)


class _Single:
    """A plain SyntheticTask seen as a mixture of one setting."""

    def __init__(self, task: SyntheticTask):
        self.train_tasks = self.test_tasks = [task]
        self.trained_on = Setting(seq_len=task.seq_len, n_pairs=task.n_pairs).label


Spec = Union[SyntheticTask, SyntheticMixture]


def parse_task(fields: dict) -> Spec:
    """A study's task entry: a mixture when it has train settings, else one setting."""
    return SyntheticMixture.model_validate(fields) if "train" in fields else SyntheticTask.model_validate(fields)


def _parts(spec: Spec) -> SyntheticMixture | _Single:
    return spec if isinstance(spec, SyntheticMixture) else _Single(spec)


def _first(id_range: range, count: int) -> range:
    return range(id_range.start, id_range.start + count)


def _distinct(id_range: range, n_rows: int, k: int, gen: torch.Generator) -> Tensor:
    """(n_rows, k) ids from id_range, distinct within each row, uniformly drawn."""
    order = torch.rand(n_rows, len(id_range), generator=gen).argsort(dim=1)[:, :k]
    return order + id_range.start


def _uniform(id_range: range, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    return torch.randint(id_range.start, id_range.stop, shape, generator=gen)


def _weighted_without_replacement(log_weights: Tensor, n_rows: int, k: int, gen: torch.Generator) -> Tensor:
    """(n_rows, k) distinct indices drawn one after another with probability ~ weight (Gumbel top-k)."""
    uniform = torch.rand(n_rows, log_weights.numel(), generator=gen).clamp_min(1e-12)
    return (log_weights - torch.log(-torch.log(uniform))).topk(k, dim=1).indices


def _sorted_spaced_positions(n_rows: int, k: int, span: int, gen: torch.Generator) -> Tensor:
    """(n_rows, k) increasing positions in 0..span-2, at least 2 apart (room for a token and its successor)."""
    slots = _distinct(range(span - k), n_rows, k, gen).sort(dim=1).values
    return slots + torch.arange(k)


def _score(inputs: Tensor, answer_positions: Tensor) -> Tensor:
    """Targets: the next token at each answer position (position t predicts t + 1), -100 elsewhere."""
    targets = torch.full_like(inputs, IGNORE)
    targets.scatter_(1, answer_positions, inputs.gather(1, answer_positions + 1))
    return targets


def mqar_batch(task: SyntheticTask, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    pairs, length = task.n_pairs, task.seq_len
    keys = _distinct(_first(KEYS, task.vocab_size), n, pairs, gen)
    values = _distinct(_first(VALUES, task.vocab_size), n, pairs, gen)
    inputs = _uniform(FILLER, (n, length), gen)
    inputs[:, 0:2 * pairs:2], inputs[:, 1:2 * pairs:2] = keys, values
    offsets = (length - 2 * pairs) // 2
    log_weights = (task.power_a - 1) * torch.log(torch.arange(1, offsets + 1, dtype=torch.float64)).float()
    query_positions = 2 * pairs + 2 * _weighted_without_replacement(log_weights, n, pairs, gen)
    inputs.scatter_(1, query_positions, keys)
    inputs.scatter_(1, query_positions + 1, values)
    return inputs, _score(inputs, query_positions)


def selective_copy_batch(task: SyntheticTask, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    count, length = task.n_pairs, task.seq_len
    region = length - count - 1
    data = _uniform(VALUES, (n, count), gen)
    inputs = torch.full((n, length), BLANK, dtype=torch.long)
    data_positions = _distinct(range(region), n, count, gen).sort(dim=1).values
    inputs.scatter_(1, data_positions, data)
    inputs[:, region] = COPY_MARKER
    inputs[:, region + 1:] = data
    answer_positions = torch.arange(region, length - 1).expand(n, count)
    return inputs, _score(inputs, answer_positions)


def induction_heads_batch(task: SyntheticTask, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    count, length = task.n_pairs, task.seq_len
    prefix = length - 2 * count
    inputs = _uniform(VALUES, (n, length), gen)
    triggers = _distinct(TRIGGERS, n, count, gen)
    first_positions = _sorted_spaced_positions(n, count, prefix, gen)
    inputs.scatter_(1, first_positions, triggers)
    answers = inputs.gather(1, first_positions + 1)
    recall_order = torch.rand(n, count, generator=gen).argsort(dim=1)
    query_positions = prefix + 2 * torch.arange(count).expand(n, count)
    inputs.scatter_(1, query_positions, triggers.gather(1, recall_order))
    inputs.scatter_(1, query_positions + 1, answers.gather(1, recall_order))
    return inputs, _score(inputs, query_positions)


GENERATORS = {"mqar": mqar_batch, "selective_copy": selective_copy_batch, "induction_heads": induction_heads_batch}


def generate(task: SyntheticTask, n: int, *, seed: int) -> tuple[Tensor, Tensor]:
    """n examples: inputs (n, seq_len) byte ids and targets (n, seq_len), -100 where nothing is scored."""
    if n <= 0:
        raise ValueError(f"n={n} examples requested; ask for at least one")
    gen = torch.Generator().manual_seed(seed)
    return GENERATORS[task.task](task, n, gen)


def _answer_loss(model, inputs: Tensor, targets: Tensor) -> Tensor:
    logits = model.objective.logits(model, inputs)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


@torch.no_grad()
def _accuracy(model, inputs: Tensor, targets: Tensor, batch_size: int) -> float:
    correct = scored = 0
    for start in range(0, inputs.shape[0], batch_size):
        batch_inputs, batch_targets = inputs[start:start + batch_size], targets[start:start + batch_size]
        predictions = model.objective.logits(model, batch_inputs).argmax(dim=-1)
        mask = batch_targets != IGNORE
        correct += (predictions[mask] == batch_targets[mask]).sum().item()
        scored += mask.sum().item()
    return correct / scored


PREFIX_STEPS = 20  # a row keeps its first training losses: a committed study's prefix check retrains only these
PART_SEED_STRIDE = 10_007  # a mixture's setting i draws from seed + i * stride (setting 0: the plain task's stream)


def mixture_train_set(spec: Spec, *, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Every train setting's examples, right-padded with BLANK (targets -100) to the longest, concatenated; and
    each example's setting index."""
    parts = [generate(task, task.train_examples, seed=seed + i * PART_SEED_STRIDE)
             for i, task in enumerate(_parts(spec).train_tasks)]
    longest = max(inputs.shape[1] for inputs, _ in parts)
    return (torch.cat([F.pad(inputs, (0, longest - inputs.shape[1]), value=BLANK) for inputs, _ in parts]),
            torch.cat([F.pad(targets, (0, longest - targets.shape[1]), value=IGNORE) for _, targets in parts]),
            torch.cat([torch.full((len(inputs),), i) for i, (inputs, _) in enumerate(parts)]))


def _epoch(setting_of: Tensor, batch_size: int, gen: torch.Generator) -> list[Tensor]:
    """One epoch of batches: each setting's examples shuffled and cut into whole batches (a batch holds one
    setting, so it is trained at that setting's length, unpadded), the batches in random order."""
    batches = []
    for setting in range(int(setting_of.max()) + 1):
        members = (setting_of == setting).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        batches += list(members[:len(members) - len(members) % batch_size].split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=gen)]


def state_bytes(model, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
    """Decoding state per sequence after seq_len positions, summed over blocks (a KV cache grows with seq_len)."""
    return model.backbone.state_bytes(1, seq_len, dtype=dtype)


def check_training(model_cfg: ModelConfig, spec: Spec, *, steps: int, batch_size: int, lr: float) -> None:
    """One-line ValueErrors for settings train_and_score cannot train with (a study checks them all up front)."""
    if model_cfg.objective != "autoregressive":
        raise ValueError(f"synthetic recall scores next-token predictions; objective={model_cfg.objective} "
                         "is not autoregressive, set model.objective=autoregressive")
    if steps <= 0 or batch_size <= 0 or lr <= 0:
        raise ValueError(f"steps={steps}, batch_size={batch_size} and lr={lr} must all be positive")
    if batch_size > min(task.train_examples for task in _parts(spec).train_tasks):
        raise ValueError(f"batch_size={batch_size} exceeds a train setting's train_examples: a batch holds one "
                         "setting; lower batch_size or raise train_examples")


def _setup(model_cfg: ModelConfig, spec: Spec, *, steps: int, batch_size: int, lr: float, seed: int,
           device: torch.device, kernels):
    """The seeded model, its optimizer and the train set (inputs and targets on `device`, each example's setting,
    each setting's length)."""
    check_training(model_cfg, spec, steps=steps, batch_size=batch_size, lr=lr)
    torch.manual_seed(seed)
    model = build_model(model_cfg, kernels=kernels).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1, decay_embeddings=False), lr=lr,
                                  betas=(0.9, 0.98))
    lengths = torch.tensor([task.seq_len for task in _parts(spec).train_tasks])
    inputs, targets, setting_of = mixture_train_set(spec, seed=seed)
    return model, optimizer, (inputs.to(device), targets.to(device), setting_of, lengths)


def _training_losses(model, optimizer, train_set: tuple, *, steps: int, batch_size: int, lr: float, seed: int):
    """Trains for `steps` optimizer steps, yielding each step's loss (a tensor: no host sync unless read)."""
    inputs, targets, setting_of, lengths = train_set
    shuffle = torch.Generator().manual_seed(seed)
    batches = []
    model.train()
    for step in range(steps):
        if not batches:
            batches = _epoch(setting_of, batch_size, shuffle)
        picked = batches.pop()
        length = int(lengths[setting_of[picked[0]]])
        picked = picked.to(inputs.device)
        for group in optimizer.param_groups:  # warmup over the first 10% of the steps, then cosine to 10% of lr
            group["lr"] = lr_at(step, lr=lr, warmup_steps=max(1, steps // 10), max_steps=steps, schedule="cosine",
                                min_lr_ratio=0.1)
        loss = _answer_loss(model, inputs[picked, :length], targets[picked, :length])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        yield loss


def train_and_score(model_cfg: ModelConfig, spec: Spec, *, steps: int, batch_size: int, lr: float,
                    seed: int, device: str | torch.device = "cpu", kernels=None) -> dict:
    """Trains a fresh model on a fixed train set (a task's, or a mixture's settings shuffled together; loss on
    answer positions only), then scores exact-match argmax accuracy on each test setting's held-out set.
    Deterministic given the seed on the CPU. `scores` holds one entry per test setting: its seq_len, n_pairs,
    accuracy and the model's decoding state bytes per sequence at that seq_len (float32, as trained here); the
    result also keeps the first PREFIX_STEPS training losses (`prefix_losses`)."""
    device = torch.device(device)
    model, optimizer, train_set = _setup(model_cfg, spec, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                         device=device, kernels=kernels)
    started = time.perf_counter()
    prefix = []
    for step, loss in enumerate(_training_losses(model, optimizer, train_set, steps=steps, batch_size=batch_size,
                                                 lr=lr, seed=seed)):
        if step < PREFIX_STEPS:
            prefix.append(loss.item())
    final_loss = loss.item()
    train_seconds = time.perf_counter() - started
    model.eval()
    scores = []
    for i, task in enumerate(_parts(spec).test_tasks):
        test_seed = seed + TEST_SEED_OFFSET + i * PART_SEED_STRIDE
        test_inputs, test_targets = generate(task, task.test_examples, seed=test_seed)
        scores.append({"seq_len": task.seq_len, "n_pairs": task.n_pairs,
                       "accuracy": _accuracy(model, test_inputs.to(device), test_targets.to(device), batch_size),
                       "state_bytes": state_bytes(model, task.seq_len)})
    return {"scores": scores, "trained_on": _parts(spec).trained_on, "params": model.num_parameters(),
            "train_steps": steps, "train_seconds": train_seconds, "final_train_loss": final_loss,
            "prefix_losses": prefix}


def prefix_losses(model_cfg: ModelConfig, spec: Spec, *, steps: int, batch_size: int, lr: float, seed: int,
                  device: str | torch.device = "cpu", kernels=None) -> list[float]:
    """The first PREFIX_STEPS training losses of train_and_score with these settings, without the rest."""
    model, optimizer, train_set = _setup(model_cfg, spec, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                         device=torch.device(device), kernels=kernels)
    losses = _training_losses(model, optimizer, train_set, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    return [loss.item() for _, loss in zip(range(PREFIX_STEPS), losses, strict=False)]  # stops the training early
