"""Uncased WordPiece, `[CLS] text [SEP]`, truncated so that [SEP] always stays last."""

from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors


SPECIAL = ("[CLS]", "[SEP]", "[PAD]", "[UNK]")


class Tokenizer:
    def __init__(self, backend):
        missing = [token for token in SPECIAL if backend.token_to_id(token) is None]
        if missing:
            raise ValueError(f"no {' '.join(missing)} in the vocabulary: not a BERT tokenizer")
        self.backend = backend
        self.backend.no_padding()
        self.backend.no_truncation()
        self.pad_id = backend.token_to_id("[PAD]")

    @classmethod
    def from_folder(cls, folder):
        """tokenizer.json when the folder has one, else the same pipeline built from vocab.txt."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if path.exists():
            try:
                return cls(HFTokenizer.from_file(str(path)))
            except Exception as e:  # the tokenizers library raises a bare Exception
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ValueError(f"{path}: not a readable BERT tokenizer ({first}); replace the file, "
                                 "or delete it to use vocab.txt") from None
        if (folder / "vocab.txt").exists():
            return cls.from_vocab(folder / "vocab.txt")
        raise ValueError(f"{folder}: neither tokenizer.json nor vocab.txt; a model folder needs one of them")

    @classmethod
    def from_vocab(cls, vocab_txt):
        vocab = {}
        try:
            with open(vocab_txt, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    vocab[line.rstrip("\n")] = i
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{vocab_txt}: cannot read a vocabulary ({e}); replace the file") from None
        if any(token not in vocab for token in SPECIAL):
            raise ValueError(f"{vocab_txt}: no {' '.join(t for t in SPECIAL if t not in vocab)} line: not a BERT "
                             "vocabulary (truncated?); replace the file")
        backend = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        backend.normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True,
                                                        handle_chinese_chars=True, strip_accents=None)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        backend.decoder = decoders.WordPiece()
        return cls(backend)

    def encode(self, texts, max_len):
        """Texts → lists of ids, each at most max_len long, [CLS] first and [SEP] last."""
        ids = []
        for encoding in self.backend.encode_batch(list(texts)):
            ids.append(encoding.ids if len(encoding.ids) <= max_len
                       else encoding.ids[: max_len - 1] + encoding.ids[-1:])
        return ids

    def pad(self, ids):
        """Lists of ids → input_ids and attention_mask, (B, T) with T the longest in the batch."""
        T = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), T), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), T), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        return input_ids, attention_mask

    def __call__(self, texts, max_len):
        return self.pad(self.encode(texts, max_len))
