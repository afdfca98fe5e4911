"""Every hyperparameter of a run, and the paper's experiments as presets over them."""

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class TrainConfig:
    experiment: str = "baseline"
    model: str = "auto"
    labels: str = "scenario"
    # The paper's Tables 1-3.
    epochs: int = 10
    lr: float = 1e-4
    batch_size: int = 16
    drop_rate: float = 0.9
    hidden_dim: int = 10
    max_len: int = 20
    adam_eps: float = 1e-8
    weight_decay: float = 0.01  # torch.optim.AdamW's default, which the paper kept
    seed: int = 0
    bucket: bool = False  # length-bucketed batches: less padding, same examples per epoch

    def to_dict(self):
        return asdict(self)

    def override(self, **changes):
        """A copy with the given fields changed; None means "keep the preset's value"."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


PRESETS = {
    "baseline": TrainConfig(experiment="baseline"),
}

FIELDS = {f.name: f for f in fields(TrainConfig)}
