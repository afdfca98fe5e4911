"""minibert: BERT fine-tuning written out in plain PyTorch."""

from .model import BertConfig, BertModel, count_parameters
from .predictor import load_run
from .tokenizer import Tokenizer
from .weights import load_pretrained

__all__ = ["BertConfig", "BertModel", "Tokenizer", "count_parameters", "load_pretrained", "load_run"]
