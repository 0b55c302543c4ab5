"""Per-step metrics: JSONL on rank 0 (append-only, flushed every step), optional TensorBoard and
wandb, and the rollout statistics aggregated over data-parallel ranks.

Histogram-based quantiles keep the cross-rank exchange to one fixed-size vector per step.
"""

import json
from pathlib import Path

import torch
import torch.distributed as dist

from trb_megatron.rollout.types import RolloutBatch

_BINS = 200


def rollout_statistics(batch: RolloutBatch, dp_group) -> dict:
    """Over all data-parallel ranks (one all-reduce SUM and one MAX): beta mean/p50/p90,
    teacher-feasible fraction (beta = 1 under a budget) and max realised KL(mu || pi_S) over
    the tokens drawn from the step's blend (teacher-prefix tokens excluded: they are not the
    trust region's); the fraction of response tokens from teacher prefixes; mean response
    length."""
    response = batch.response_mask
    mask = response & ~batch.from_teacher
    beta = batch.stat("beta")[mask].double()
    hist = torch.histc(beta, bins=_BINS, min=0.0, max=1.0)
    sums = torch.cat([torch.tensor([mask.sum(), beta.sum(), (beta == 1.0).sum(),
                                    batch.response_lengths.sum(), len(batch.response_lengths),
                                    response.sum(), batch.from_teacher.sum()],
                                   dtype=torch.float64), hist.double()])
    kl = batch.stat("kl_to_student")[mask]
    peak = torch.tensor([float(kl.max()) if kl.numel() else 0.0], dtype=torch.float64)
    dist.all_reduce(sums, group=dp_group)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=dp_group)
    tokens, beta_sum, feasible, lengths, rows, response_tokens, teacher = sums[:7].tolist()
    cumulative = torch.cumsum(sums[7:], 0) / max(tokens, 1.0)

    def quantile(q):
        return float((torch.searchsorted(cumulative, torch.tensor(q, dtype=torch.float64))
                      .clamp(max=_BINS - 1) + 0.5) / _BINS)

    return {"beta_mean": beta_sum / max(tokens, 1.0), "beta_p50": quantile(0.5),
            "beta_p90": quantile(0.9), "teacher_feasible_frac": feasible / max(tokens, 1.0),
            "kl_to_student_max": float(peak), "response_len_mean": lengths / max(rows, 1.0),
            "teacher_prefix_frac": teacher / max(response_tokens, 1.0),
            "response_tokens": int(response_tokens)}


def _records(path: Path):
    """(line, record) of every complete line of a metrics file. The last line may have been cut
    by a kill mid-write (records are flushed whole, so only the last one can be): it is
    dropped, since its step is redone on resume."""
    lines = path.read_text().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield line, json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                return
            raise ValueError(f"{path}:{number} is not a JSON record; fix or remove that line "
                             "and resume") from None


class MetricsLog:
    """metrics.jsonl in the run directory; a no-op on every rank but 0."""

    def __init__(self, run_dir, *, enabled: bool, resume_step: int = 0, tensorboard=False,
                 wandb_project: str | None = None, run_name: str = "trb"):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # drop records of steps a resumed run will redo
            kept = [line for line, record in _records(self.path) if record["step"] < resume_step]
            staging = self.path.with_suffix(".jsonl.tmp")
            staging.write_text("".join(line + "\n" for line in kept))
            staging.replace(self.path)
        self._file = self.path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("TensorBoard logging needs `pip install 'trb-megatron[logging]'`"
                                  ) from err
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise ImportError("wandb logging needs `pip install 'trb-megatron[logging]'`"
                                  ) from err
            self._wandb = wandb.init(project=wandb_project, name=run_name, resume="allow")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()
