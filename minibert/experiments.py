"""Every hyperparameter of a run, and the paper's experiments as presets over them."""

import argparse
import math
from dataclasses import asdict, dataclass, field, fields, replace

from . import schedule
from .lora import linear_names, targets_problem
from .model import BertConfig, Layer


def setting(default, help):
    """A TrainConfig field and its train.py flag: --name-with-dashes, with this help."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    experiment: str = "baseline"
    model: str = setting("auto", "auto (bert-base-uncased, else the embedded all-MiniLM-L6-v2), a model name, or a "
                         "folder")
    labels: str = setting("scenario", "scenario (18 classes, the paper) or intent (60)")
    # The paper's Tables 1-3.
    epochs: int = setting(10, "training epochs")
    lr: float = setting(1e-4, "peak learning rate of AdamW")
    batch_size: int = setting(16, "sentences per optimizer step")
    drop_rate: float = setting(0.9, "dropout on the sentence vector ([CLS], see --pooling) before the head")
    hidden_dim: int = setting(10, "width of the head's hidden layer")
    max_len: int = setting(20, "word-pieces per sentence, [CLS] and [SEP] included")
    adam_eps: float = setting(1e-8, "AdamW epsilon")
    # torch.optim.AdamW's default, which the paper kept.
    weight_decay: float = setting(0.01, "AdamW weight decay")
    seed: int = setting(0, "seed for the head, the shuffle and dropout")
    bucket: bool = setting(False, "batch sentences of similar length together (less padding)")
    max_grad_norm: float = setting(0.0, "clip the gradient norm to this; 0 turns clipping off")
    # Decided once by train.py (minibert/device.py), recorded beside the run's device.
    precision: str = setting("auto", "fp32, bf16 or fp16 autocast; auto: bf16 where the device runs bf16 matmuls "
                             "natively (a GPU that supports it; a CPU with AVX512-BF16 or AMX where a one-off check "
                             "finds bf16 faster than fp32), else fp32. The figures recorded for dev and test are "
                             "fp32 whatever the choice")
    # Learning-rate schedule (§3.2.1): constant, or warmup then linear (the paper's) or cosine decay to zero.
    scheduler: str = setting("constant", "learning-rate schedule: constant, or linear warmup then linear or cosine "
                             "decay to zero")
    warmup_steps: int = setting(0, "linear and cosine schedules: warmup steps")
    warmup_ratio: float = setting(0.0, "linear and cosine schedules: warmup as a fraction of all steps (instead of "
                                  "--warmup-steps)")
    # Stochastic Weight Averaging (§3.2.2).
    swa: bool = setting(False, "stochastic weight averaging over the last epochs")
    swa_start: float = setting(0.75, "SWA averages after every epoch past int(swa_start x epochs) (0-based), as "
                               "torch's loop")
    swa_lr: float = setting(1e-5, "SWA: the rate annealed to")
    swa_anneal_epochs: int = setting(5, "SWA: epochs to anneal over")
    swa_anneal: str = setting("cos", "SWA: annealing curve, cos or linear")
    # LoRA (§3.1). The paper gives only r; alpha and dropout keep peft's defaults (8 and 0).
    lora_r: int = setting(0, "LoRA rank; 0 fine-tunes every weight")
    lora_alpha: float = setting(8.0, "LoRA: the update is scaled by alpha / r")
    lora_dropout: float = setting(0.0, "LoRA: dropout on the adapter input")
    lora_targets: str = setting("query,value", "LoRA: comma-separated names of the Linear modules to adapt")
    # Contrastive pre-training (§3.2.3): stage 1 with this loss, then the classifier (stage 2).
    loss: str = setting("ce", "ce; or supcon / simclr for a contrastive stage 1 before the classifier")
    temperature: float = setting(0.07, "contrastive: softmax temperature")
    # The two views of a sentence differ by this dropout on its vector before the projection head.
    contrastive_drop_rate: float = setting(-1.0, "contrastive: dropout that makes the two views, on the sentence "
                                           "vector before the projection head (-1: --drop-rate, as the paper)")
    # The contrastive presets say -1: stage 1 runs as many epochs as stage 2.
    contrastive_epochs: int = setting(0, "contrastive: stage-1 epochs (-1: as many as --epochs)")
    stage2: str = setting("finetune", "after the contrastive stage: finetune everything, or probe (frozen encoder)")
    # Which weights the run keeps: the last epoch's (the paper's), or the best dev epoch's.
    select: str = setting("last", "weights kept: the last epoch's (the paper), or dev-best: the epoch with the best "
                          "dev accuracy")
    # Beyond the paper (lab/README.md, "The `best` recipe, beyond the paper").
    # Each of MASSIVE's 60 intents belongs to one scenario. With "intents" the head predicts
    # intents and a scenario's probability is the sum of its intents'; "both" adds the two losses.
    supervise: str = setting("labels", "train on the labels, on MASSIVE's 60 intents (a scenario's probability is the "
                             "sum of its intents'), or on both losses added")
    contrastive_labels: str = setting("labels", "supcon: positives share a label, or share an intent")
    # A diagnostic of SimCLR's false negatives at batch 16: it uses the labels SimCLR does not have.
    simclr_negatives: str = setting("all", "simclr: every other sentence of the batch is a negative (all), or only "
                                    "those of another label (other-labels, a diagnostic that uses the labels)")
    layer_decay: float = setting(1.0, "layer-wise lr decay of the classifier stage: the head at lr, the top layer at "
                                 "lr x decay, each lower layer x decay again; 1 turns it off")
    rdrop: float = setting(0.0, "R-Drop: weight of the symmetric KL between two dropout passes, per sentence (the "
                           "R-Drop code's alpha, which weighs the batch's sum, times the batch size); 0 turns it off")
    # What the head reads: the [CLS] vector (the paper's), or the mean over the sentence's
    # word-pieces, the pooling all-MiniLM-L6-v2 was trained with as a sentence embedder.
    pooling: str = setting("cls", "what the head reads: the [CLS] vector (the paper), or mean: the mean of the "
                           "sentence's word-pieces")

    def to_dict(self):
        return asdict(self)

    def override(self, **changes):
        """A copy with the given fields changed; None means "keep the preset's value"."""
        config = replace(self, **{k: v for k, v in changes.items() if v is not None})
        for name, allowed in CHOICES.items():
            if getattr(config, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(config, name)!r}")
        return config

    @property
    def lora_target_list(self):
        """--lora-targets "query, value" → ["query", "value"]: names, spaces stripped."""
        return [name.strip() for name in self.lora_targets.split(",") if name.strip()]

    @property
    def views_drop_rate(self):
        """The dropout that makes stage 1's two views of a sentence: --contrastive-drop-rate, or where
        that is -1 (the presets), --drop-rate, as the paper's Table 3 keeps 0.9 for the contrastive rows."""
        return self.drop_rate if self.contrastive_drop_rate < 0 else self.contrastive_drop_rate

    @property
    def stage1_epochs(self):
        """Contrastive epochs; -1 in a preset means "as many as the classifier gets"."""
        if self.loss == "ce":
            return 0
        return self.epochs if self.contrastive_epochs < 0 else self.contrastive_epochs

    def check(self, world=1):
        """Raise ValueError("--flag value: what is wrong; what to do") for the first setting that
        cannot work, so that a bad flag fails in a second, before data or weights load. `world`
        is the number of training processes (torchrun's WORLD_SIZE)."""
        for name, ok, must in [
            ("epochs", 1 <= self.epochs <= MAX_EPOCHS, f"must be at least 1 and at most {MAX_EPOCHS}"),
            ("batch_size", 1 <= self.batch_size <= MAX_SIZE, f"must be at least 1 and at most {MAX_SIZE}"),
            ("lr", 0 < self.lr < math.inf, "must be a finite number above 0"),
            ("max_len", 3 <= self.max_len <= MAX_SIZE, f"must be at least 3 ([CLS], one word-piece, [SEP]) and at "
             f"most {MAX_SIZE}"),
            ("drop_rate", 0 <= self.drop_rate < 1, "must be at least 0 and below 1"),
            ("hidden_dim", 1 <= self.hidden_dim <= MAX_SIZE, f"must be at least 1 and at most {MAX_SIZE}"),
            ("seed", 0 <= self.seed <= MAX_SEED, f"must be a whole number from 0 to {MAX_SEED}"),
            ("adam_eps", 0 < self.adam_eps < math.inf, "must be a finite number above 0"),
            ("weight_decay", 0 <= self.weight_decay < math.inf, "must be a finite number, 0 or more"),
            ("max_grad_norm", 0 <= self.max_grad_norm < math.inf, "must be a finite number, 0 or more "
             "(0 turns clipping off)"),
            ("warmup_steps", 0 <= self.warmup_steps <= MAX_STEPS, f"must be 0 or more, and at most {MAX_STEPS}"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "must be at least 0 and below 1"),
            ("swa_start", 0 <= self.swa_start < 1, "must be at least 0 and below 1 (a fraction of --epochs)"),
            ("swa_lr", 0 <= self.swa_lr < math.inf, "must be a finite number, 0 or more"),
            ("swa_anneal_epochs", 1 <= self.swa_anneal_epochs <= MAX_EPOCHS,
             f"must be at least 1 and at most {MAX_EPOCHS}"),
            ("lora_r", 0 <= self.lora_r <= MAX_SIZE, f"must be 0 or more (0 fine-tunes every weight), and at most "
             f"{MAX_SIZE}"),
            ("lora_alpha", 0 < self.lora_alpha < math.inf, "must be a finite number above 0"),
            ("lora_dropout", 0 <= self.lora_dropout < 1, "must be at least 0 and below 1"),
            ("temperature", 0 < self.temperature < math.inf, "must be a finite number above 0"),
            ("contrastive_drop_rate", self.contrastive_drop_rate == -1 or 0 <= self.contrastive_drop_rate < 1,
             "must be at least 0 and below 1, or -1 for --drop-rate"),
            ("contrastive_epochs", -1 <= self.contrastive_epochs <= MAX_EPOCHS,
             f"must be 0 or more, or -1 for as many as --epochs, and at most {MAX_EPOCHS}"),
            ("layer_decay", 0 < self.layer_decay <= 1, "must be above 0 and at most 1 (1 turns it off)"),
            ("rdrop", 0 <= self.rdrop < math.inf, "must be a finite number, 0 or more (0 turns it off)"),
        ]:
            if not ok:  # written so that NaN fails every test too
                raise ValueError(f"{flag(name)} {getattr(self, name)}: {must}")
        if self.warmup_steps > 0 and self.warmup_ratio > 0:
            raise ValueError(f"--warmup-steps {self.warmup_steps} and --warmup-ratio {self.warmup_ratio} both set "
                             "the warmup; pass --warmup-ratio 0 or --warmup-steps 0")
        for name in ("warmup_steps", "warmup_ratio"):
            if getattr(self, name) and self.scheduler == "constant":
                raise ValueError(f"{flag(name)} {getattr(self, name)} with --scheduler constant: a constant rate has "
                                 f"no warmup; pass --scheduler linear or cosine, or {flag(name)} 0")
        if self.layer_decay < 1 and self.stage2 == "probe":
            raise ValueError(f"--layer-decay {self.layer_decay} with --stage2 probe: the encoder is frozen, no layer "
                             "trains to decay; pass --layer-decay 1, or --stage2 finetune")
        problem = targets_problem(self.lora_target_list, LORA_TARGETS)
        if problem:
            raise ValueError(f"--lora-targets {self.lora_targets!r}: {problem}; give comma-separated names "
                             f"from {','.join(LORA_TARGETS)}")
        if self.loss != "ce" and self.contrastive_epochs == 0:
            raise ValueError(f"--loss {self.loss} with --contrastive-epochs 0 would train cross-entropy alone; pass "
                             f"--contrastive-epochs N (or -1: as many as --epochs, as --experiment {self.loss} does), "
                             "or --loss ce")
        if self.loss == "ce" and self.contrastive_epochs != 0:  # -1 too: it asks for a stage
            raise ValueError(f"--contrastive-epochs {self.contrastive_epochs} with --loss ce: there is no contrastive "
                             "stage to run; pass --loss supcon or --loss simclr, or --contrastive-epochs 0")
        last = schedule.last_epoch_before_swa(self)
        if self.swa and last >= self.epochs - 1:
            raise ValueError(f"--swa with --epochs {self.epochs} and --swa-start {self.swa_start} averages no epoch: "
                             f"SWA averages after the epochs past int(swa_start x epochs) = {last} (0-based); "
                             "pass more --epochs or a lower --swa-start")
        if world > self.batch_size:
            raise ValueError(f"--batch-size {self.batch_size} is smaller than the {world} processes (WORLD_SIZE): "
                             f"each needs a sentence of every batch; pass --batch-size {world} or more")
        if self.select == "dev-best" and self.swa:
            raise ValueError("--select dev-best with --swa: SWA keeps the average of the last epochs, not one "
                             "epoch's weights; drop one of the two")
        if self.labels == "intent" and self.supervise != "labels":
            raise ValueError(f"--supervise {self.supervise} with --labels intent: the labels are the intents "
                             "already; pass --supervise labels, or --labels scenario")
        if self.contrastive_labels == "intents" and self.loss != "supcon":
            raise ValueError(f"--contrastive-labels intents with --loss {self.loss}: only supcon uses labels; "
                             "pass --loss supcon, or --contrastive-labels labels")
        if self.simclr_negatives != "all" and self.loss != "simclr":
            raise ValueError(f"--simclr-negatives {self.simclr_negatives} with --loss {self.loss}: it changes SimCLR's "
                             "negatives only; pass --loss simclr, or --simclr-negatives all")
        if self.contrastive_drop_rate != -1 and not self.stage1_epochs:
            raise ValueError(f"--contrastive-drop-rate {self.contrastive_drop_rate} without a contrastive stage: "
                             "pass --loss supcon or simclr and --contrastive-epochs, or drop it")
        for enabler, on, names, what in [
                ("--lora-r N", self.lora_r > 0, ("lora_alpha", "lora_dropout", "lora_targets"), "LoRA's"),
                ("--swa", self.swa, ("swa_start", "swa_lr", "swa_anneal_epochs", "swa_anneal"), "SWA's"),
                ("--loss supcon or simclr", self.loss != "ce", ("temperature",), "the contrastive loss's")]:
            if not on:
                for name in names:
                    value = getattr(self, name)
                    if value != FIELDS[name].default:
                        preset = PRESETS.get(self.experiment)
                        if preset and getattr(preset, name) == value:  # the preset's, not a flag
                            raise ValueError(f"{flag(name)} {value} (from --experiment {self.experiment}): {what} "
                                             f"setting, and this run has none; pass {enabler}, or another --experiment")
                        raise ValueError(f"{flag(name)} {value}: {what} setting, and this run has none; pass "
                                         f"{enabler}, or drop {flag(name)}")
        if self.lora_r and self.stage2 == "probe" and not self.stage1_epochs:
            raise ValueError(f"--lora-r {self.lora_r} with --stage2 probe: the probe freezes the encoder, so its "
                             "adapters would never train; pass --lora-r 0, or --stage2 finetune")
        if world > 1 and self.stage1_epochs:
            raise ValueError(f"--loss {self.loss}: the contrastive stage runs in one process only (its negatives "
                             "would be split across processes); start a single process")

    def check_data(self, has_intents):
        """The levers that read MASSIVE's intents, refused on data that has none."""
        for name in ("supervise", "contrastive_labels"):
            if not has_intents and getattr(self, name) != FIELDS[name].default:
                raise ValueError(f"{flag(name)} {getattr(self, name)}: MASSIVE's intents, which this data does not "
                                 f"have; pass {flag(name)} {FIELDS[name].default}")

    def check_steps(self, steps_per_epoch):
        """The check that needs the data: a warmup longer than the classifier's training never decays."""
        total = self.epochs * steps_per_epoch
        warmup = schedule.warmup_steps(total, self.warmup_steps, self.warmup_ratio)
        if self.scheduler != "constant" and warmup > total:
            raise ValueError(f"--warmup-steps {warmup}: more than the run's {total} optimizer steps ({self.epochs} "
                             f"epochs of {steps_per_epoch}), so the rate would never decay; pass at most {total}")

    def check_model(self, encoder):
        """The checks that need the pretrained model's BertConfig (read before its weights load)."""
        if self.max_len > encoder.max_position_embeddings:
            raise ValueError(f"--max-len {self.max_len}: the model has {encoder.max_position_embeddings} positions "
                             f"(max_position_embeddings in its config.json); pass --max-len "
                             f"{encoder.max_position_embeddings} or less")


# Seeds as numpy takes them. The loop derives its streams' seeds as seed x 1000 + a small offset,
# which stays well inside torch's 64-bit seeds.
MAX_SEED = 2**32 - 1
# Far above any run that makes sense: a slip of the keyboard (--epochs 1000000000) is refused in a
# second, instead of a run that never ends or a tensor that never fits.
MAX_EPOCHS = 10_000
MAX_SIZE = 65_536  # sentences in a batch, word-pieces in a sentence, units of the head, a LoRA rank
MAX_STEPS = 10**9  # optimizer steps (--warmup-steps), and steps between progress lines (--log-every)


def flag(name):
    return "--" + name.replace("_", "-")


# What --lora-targets may name: the Linear modules of an encoder layer (model.py fixes the names,
# so a one-unit layer lists them).
LORA_TARGETS = linear_names(Layer(BertConfig(hidden_size=1, num_attention_heads=1, intermediate_size=1)))


CHOICES = {
    "labels": ("scenario", "intent"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "scheduler": ("constant", "linear", "cosine"),
    "swa_anneal": ("cos", "linear"),
    "loss": ("ce", "supcon", "simclr"),
    "stage2": ("finetune", "probe"),
    "select": ("last", "dev-best"),
    "supervise": ("labels", "intents", "both"),
    "contrastive_labels": ("labels", "intents"),
    "simclr_negatives": ("all", "other-labels"),
    "pooling": ("cls", "mean"),
}

_base = TrainConfig()
_search = _base.override(experiment="search", drop_rate=0.1, hidden_dim=256, scheduler="linear", warmup_ratio=0.06,
                         bucket=True)
# What the winner of results/tune/all-MiniLM-L6-v2-search-e10/dev.md changes from `search`: nothing.
# `search` itself at 10 epochs led that round; its levers led at 3 epochs only (lab/README.md).
BEST_LEVERS = {}
# What the winner of the LoRA screen (results/tune/all-MiniLM-L6-v2-lora20-e3/dev.md, run again for
# 10 epochs in results/tune/all-MiniLM-L6-v2-lora20-e10/) changes from `lora20`: alpha = 2r, as
# peft's own examples scale it, a 5x rate, and `search`'s head. lora30-tuned keeps alpha = 2r.
LORA_LEVERS = {"lora_alpha": 40.0, "lr": 5e-4, "drop_rate": 0.1, "hidden_dim": 256}
PRESETS = {
    "baseline": _base,
    "scheduler": _base.override(experiment="scheduler", scheduler="linear"),
    "swa": _base.override(experiment="swa", swa=True),
    # Both: the linear schedule runs until SWA starts; from there SWA's annealing takes over,
    # starting from the rate the linear schedule had reached.
    "both": _base.override(experiment="both", scheduler="linear", swa=True),
    "lora20": _base.override(experiment="lora20", lora_r=20),
    "lora30": _base.override(experiment="lora30", lora_r=30),
    # The paper fine-tunes the whole classifier after the contrastive stage ("embeddings ...
    # which are then fine-tuned for our classification objective"), so stage 2 is finetune.
    "supcon": _base.override(experiment="supcon", loss="supcon", contrastive_epochs=-1),
    "simclr": _base.override(experiment="simclr", loss="simclr", contrastive_epochs=-1),
    # Beside the paper's contrastive rows, never in place of them: the variant its first author's
    # project page describes for the 91.5 % ("SimCLR with SWA and cosine decay"): the classifier
    # stage with the cosine schedule handing over to SWA, as `both` does with the linear one.
    "simclr-swa-cosine": _base.override(experiment="simclr-swa-cosine", loss="simclr", contrastive_epochs=-1,
                                        scheduler="cosine", swa=True),
    "supcon-swa-cosine": _base.override(experiment="supcon-swa-cosine", loss="supcon", contrastive_epochs=-1,
                                        scheduler="cosine", swa=True),
    # Beyond the paper. `search` is where the dev-only search (`make tune`) starts: the paper's
    # 0.9 dropout on [CLS] starves a 10-unit head, so drop 0.1 with a wider head, and the linear
    # schedule with a short warmup; length-bucketed batches for speed. `best` is the search's
    # winner (lab/README.md, "The `best` recipe, beyond the paper"); a test holds it to the committed dev table.
    "search": _search,
    "best": _search.override(experiment="best", **BEST_LEVERS),
    # Beyond the paper, beside its LoRA rows (never in place of them): LoRA tuned on dev alone.
    "lora20-tuned": _base.override(experiment="lora20-tuned", lora_r=20, **LORA_LEVERS),
    "lora30-tuned": _base.override(experiment="lora30-tuned", lora_r=30, **{**LORA_LEVERS, "lora_alpha": 60.0}),
}

# The paper's experiments 2-9, in its table's order (experiment 1, zero-shot, trains nothing:
# evaluate.py --zero-shot). Every other preset is beyond the paper.
PAPER = ("baseline", "scheduler", "swa", "both", "lora20", "lora30", "supcon", "simclr")

FIELDS = {f.name: f for f in fields(TrainConfig)}
FLAGS = [name for name, f in FIELDS.items() if "help" in f.metadata]  # every field but `experiment`


def add_config_flags(parser):
    """--experiment, and one flag per TrainConfig field with the help written beside the field;
    a flag that is not given keeps the preset's value."""
    parser.add_argument("--experiment", choices=sorted(PRESETS), default="baseline",
                        help="preset of the paper's hyperparameters; flags below override it (default: baseline)")
    for name in FLAGS:
        default, help = FIELDS[name].default, FIELDS[name].metadata["help"]
        if isinstance(default, bool):
            parser.add_argument(flag(name), action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            parser.add_argument(flag(name), type=type(default), choices=CHOICES.get(name), default=None,
                                help=f"{help} (baseline: {default})")


def config_from(args):
    """The preset, with every flag that was given in its place."""
    return PRESETS[args.experiment].override(**{name: getattr(args, name) for name in FLAGS})


def as_recorded(hyperparameters):
    """A record's hyperparameters, with each setting newer than the record at its default: the
    behaviour the run had then."""
    return {name: hyperparameters.get(name, f.default) for name, f in FIELDS.items()}
