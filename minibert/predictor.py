"""A trained run as a Python object: load it once, classify sentences in batches.

    import minibert
    clf = minibert.load_run("runs/baseline-all-MiniLM-L6-v2-s0")
    labels, probabilities = clf.predict(["wake me up at seven", "is it going to rain"])
    # labels: ["alarm", "weather"]; probabilities: (2, 18), each row over clf.labels

evaluate.py --predict prints what this returns.
"""

import torch

from .device import pick_device
from .runs import load_model


class TrainedRun:
    def __init__(self, model, tokenizer, meta, device):
        self.model, self.tokenizer, self.meta, self.device = model.to(device).eval(), tokenizer, meta, device
        self.labels = tuple(meta["labels"])

    @torch.no_grad()
    def predict(self, sentences, batch_size=256):
        """→ (labels, probabilities): each sentence's most likely label, and (N, len(self.labels))
        probabilities on the CPU. The sentences go through `batch_size` at a time, each batch padded
        to its longest sentence, in fp32 on the run's device. A sentence that is not a string is a
        TypeError, a blank one a ValueError, as on the command line."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size {batch_size!r}: must be a whole number of at least 1")
        sentences = checked_sentences(sentences)
        probabilities = [torch.empty(0, len(self.labels))]
        for start in range(0, len(sentences), batch_size):
            input_ids, attention_mask = self.tokenizer(sentences[start:start + batch_size],
                                                       max_len=self.meta["max_len"])
            logits = self.model(input_ids.to(self.device), attention_mask.to(self.device))  # (B, labels)
            probabilities.append(logits.float().softmax(-1).cpu())
        probabilities = torch.cat(probabilities)
        return [self.labels[i] for i in probabilities.argmax(1).tolist()], probabilities


def load_run(run_dir, device="auto"):
    """The run folder train.py wrote → a TrainedRun on `device` (auto: cuda, then mps, then cpu)."""
    model, tokenizer, meta = load_model(run_dir)
    return TrainedRun(model, tokenizer, meta, pick_device(device))


def checked_sentences(sentences):
    """`sentences` as a list of strings, none blank; else a TypeError or ValueError that names the
    first one that is not."""
    if isinstance(sentences, (str, bytes)) or not hasattr(sentences, "__iter__"):
        raise TypeError(f"predict takes a list of sentences, not {type(sentences).__name__}; wrap one sentence "
                        "in a list")
    sentences = list(sentences)
    for i, sentence in enumerate(sentences):
        if not isinstance(sentence, str):
            raise TypeError(f"sentence {i} is {type(sentence).__name__} {sentence!r:.40}, not a string; pass "
                            "the text of each sentence")
        if not sentence.strip():
            raise ValueError(f"sentence {i} is {sentence!r:.40}: blank; give the text to classify, or leave it out")
    return sentences
