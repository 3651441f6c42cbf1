"""Text generation (a written diagnosis), with word- and sequence-level KD (Kim & Rush 2016).

A GRU decoder reads the pooled image vector (the global heads' input) as its initial state and,
projected, added to every step's input (read only as the initial state, the decoder said one
text for every image: docs/study.md, "Written reports"). Its
output is B x S x L x V logits in slots: 0 the decode, greedy or by beam search (``beam_size``;
what predict, export and a teacher give), then one slot per guide sequence it was forced on
(``guide``): 1 the reference text, 2 the teacher's decode when the batch has a teacher output.

The vocabulary is word-level, ``<pad> <bos> <eos> <unk>`` then the training texts' words in
sorted order: learned once by ``learned_spec`` into the spec (the run config), so the checkpoint
keeps it and the task's identity, which a teacher cache is checked against, names it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.text import BLEUScore

from mtkd.kd.losses import register_kd_loss
from mtkd.kd.storage import CacheStorage
from mtkd.tasks.base import Annotation, Frame, Task, TaskSpec, register_task

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(len(SPECIALS))
#: slots of the decoder's output (``TextDecoder.forward``)
DECODED, REFERENCE, TEACHER = range(3)


def tokenize(text: str) -> list[str]:
    """Lower-case words; ``;`` and ``,`` are words of their own."""
    return re.findall(r"[^\s;,]+|[;,]", text.lower())


def build_vocabulary(texts: list[str]) -> list[str]:
    """The special tokens, then every word of ``texts`` in sorted order (the same texts give the
    same vocabulary whatever their order)."""
    return [*SPECIALS, *sorted({w for t in texts for w in tokenize(t)})]


def encode(text: str, vocabulary: list[str], length: int) -> list[int]:
    """Token ids of ``text``: at most ``length - 1`` words, ``<eos>``, then ``<pad>`` to
    ``length``; an unknown word is ``<unk>``."""
    index = {w: i for i, w in enumerate(vocabulary)}
    ids = [index.get(w, UNK) for w in tokenize(text)][: length - 1] + [EOS]
    return ids + [PAD] * (length - len(ids))


def words(ids: list[int], vocabulary: list[str]) -> list[str]:
    """The words of token ids up to the first ``<eos>``, ``<pad>`` and ``<bos>`` left out."""
    out = []
    for i in ids:
        if i == EOS:
            break
        if i not in (PAD, BOS):
            out.append(vocabulary[i])
    return out


def readable(tokens: list[str]) -> str:
    """Words joined back into a sentence (no space before ``;`` or ``,``)."""
    return re.sub(r" ([;,])", r"\1", " ".join(tokens))


def sequence_ce(logits: torch.Tensor, tokens: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Per sample, the mean cross-entropy (label-smoothed) of B x L x V ``logits`` against B x L
    ``tokens`` over the positions that are not ``<pad>``; 0 for an all-pad row."""
    ce = F.cross_entropy(
        logits.transpose(1, 2),
        tokens,
        ignore_index=PAD,
        label_smoothing=smoothing,
        reduction="none",
    )
    return ce.sum(dim=1) / (tokens != PAD).sum(dim=1).clamp(min=1)


def keyword_set(text: str) -> set[str]:
    """The comma-separated keywords of ``text``, stripped, empty ones left out."""
    return {k.strip() for k in text.split(",")} - {""}


class KeywordF1(Metric):
    """Micro F1 of keyword lists over the corpus, 2 TP / (2 TP + FP + FN) summed over texts
    (0 when no text names a keyword): the order and repeats of keywords do not count, which
    BLEU's n-grams do. torchmetrics' F1 scores fixed label sets and its SQuAD F1 bags words
    per text, neither a set of free keywords."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self) -> None:
        super().__init__()
        for state in ("tp", "fp", "fn"):
            self.add_state(state, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], target: Sequence[Sequence[str]]) -> None:
        """``target``: one reference per text, as BLEU takes them (``[[reference], ...]``), so
        one collection updates both."""
        for said, references in zip(preds, target, strict=True):
            if len(references) != 1:
                raise ValueError("KeywordF1 takes one reference per text; pass [[reference], ...]")
            predicted, true = keyword_set(said), keyword_set(references[0])
            self.tp += len(predicted & true)
            self.fp += len(predicted - true)
            self.fn += len(true - predicted)

    def compute(self) -> torch.Tensor:
        return (2 * self.tp / (2 * self.tp + self.fp + self.fn).clamp(min=1)).float()


class TextDecoder(nn.Module):
    """pooled vector -> tanh(linear) initial state -> GRU over word embeddings plus a projection
    of the pooled vector at every step -> logits.
    Teacher forcing and greedy decoding run the same GRU, so forcing the decoder on its own
    greedy output gives back its greedy logits."""

    def __init__(
        self, in_channels: int, vocabulary: int, hidden: int, length: int, beam_size: int = 1
    ) -> None:
        super().__init__()
        self.start = nn.Linear(in_channels, hidden)
        self.condition = nn.Linear(in_channels, hidden)
        self.embed = nn.Embedding(vocabulary, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocabulary)
        self.length = length
        self.beam_size = beam_size

    def forward(self, pooled: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        """B x S x L x V logits: slot 0 the decode (greedy, or beam search with ``beam_size`` >
        1 in eval mode), then one per guide sequence (B x G x L ids). Training reads only the
        forced slots, so a training step's slot 0 is the cheap greedy decode, not k beams."""
        state = torch.tanh(self.start(pooled)).unsqueeze(0)
        image = self.condition(pooled)[:, None]
        if self.beam_size == 1 or self.training:
            slots = [self.greedy(state, image)]
        else:
            tokens = self.beam(state, image)
            slots = [argmax_at(self.forced(state, image, tokens), tokens)]
        if guide is not None:
            slots += [self.forced(state, image, g) for g in guide.unbind(dim=1)]
        return torch.stack(slots, dim=1)

    def forced(
        self, state: torch.Tensor, image: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor:
        """Teacher forcing: step i reads token i - 1 of ``tokens`` (``<bos>`` first)."""
        bos = torch.full_like(tokens[:, :1], BOS)
        out, _ = self.gru(self.embed(torch.cat([bos, tokens[:, :-1]], dim=1)) + image, state)
        return self.out(out)

    def greedy(self, state: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Free running: step i reads the argmax of step i - 1."""
        token = torch.full((state.shape[1], 1), BOS, dtype=torch.long, device=state.device)
        steps = []
        for _ in range(self.length):
            out, state = self.gru(self.embed(token) + image, state)
            steps.append(self.out(out))
            token = steps[-1].argmax(dim=-1)
        return torch.cat(steps, dim=1)

    def beam(self, state: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """B x L token ids of the most probable sequence that beam search finds: ``beam_size``
        hypotheses per image scored by the plain sum of their tokens' log-probabilities (not
        length-normalised: it approximates the most probable text); a hypothesis ends at
        ``<eos>``, then reads ``<pad>`` at no cost, so its score stays."""
        size, vocabulary, hidden = self.beam_size, self.out.out_features, state.shape[-1]
        state = state.repeat_interleave(size, dim=1)  # 1 x Bk x H, an image's k beams together
        image = image.repeat_interleave(size, dim=0)
        token = torch.full_like(image[:, :, 0], BOS, dtype=torch.long)  # Bk x 1
        # One live hypothesis per image at the start: k copies would fill the beam with one text.
        score = torch.zeros_like(image[:, 0, 0], dtype=torch.float).view(-1, size)
        score[:, 1:] = -torch.inf
        ended = torch.zeros_like(score, dtype=torch.bool)
        only_pad = torch.full((vocabulary,), -torch.inf, device=score.device)
        only_pad[PAD] = 0.0
        tokens = token.view(-1, size, 1)[..., :0]  # B x k x (steps so far)
        for _ in range(self.length):
            out, state = self.gru(self.embed(token) + image, state)
            log_p = self.out(out).log_softmax(dim=-1).view(-1, size, vocabulary)
            log_p = torch.where(ended[..., None], only_pad, log_p)
            score, best = (score[..., None] + log_p).flatten(1).topk(size, dim=-1)
            origin, new = best // vocabulary, best % vocabulary  # B x k: which beam, which token
            tokens = torch.cat(
                [tokens.gather(1, origin[..., None].expand_as(tokens)), new[..., None]], -1
            )
            ended = ended.gather(1, origin) | (new == EOS)
            state = state.view(-1, size, hidden).gather(1, origin[..., None].expand(-1, -1, hidden))
            state = state.view(1, -1, hidden)
            token = new.view(-1, 1)
        return tokens[:, 0]  # topk sorts: beam 0 is the best


@dataclass
class TextSpec(TaskSpec):
    #: the annotation (``texts``) read; default: the task's name
    text: str | None = None
    #: learned from the training texts when null (``learned_spec``)
    vocabulary: list[str] | None = None
    #: tokens per text, ``<eos>`` included
    max_length: int = 24
    hidden: int = 128
    #: teacher log-probabilities cached per position for word-level KD
    top_k: int = 8
    label_smoothing: float = 0.1
    #: hypotheses kept by the decode (slot 0: evaluate, predict, export and a teacher's output);
    #: 1 is greedy decoding. It changes no weight and a teacher decodes as its own checkpoint
    #: says, so it is loss_only: ``mtkd evaluate <ckpt> tasks.<t>.beam_size=4`` rescores a model
    beam_size: int = 1
    #: the texts are comma-separated keyword lists (ODIR's ``keywords``): also score
    #: ``keyword_f1`` (``KeywordF1``)
    keywords: bool = False
    loss_only: ClassVar[tuple[str, ...]] = (
        *TaskSpec.loss_only,
        "label_smoothing",
        "keywords",
        "beam_size",
    )


@register_task("text")
class TextTask(Task):
    spec_class = TextSpec
    default_kd_loss = "word"
    main_metric = "bleu4"

    def validate(self) -> None:
        spec = self.spec
        if spec.max_length < 2 or spec.top_k < 1 or spec.beam_size < 1:
            raise ValueError(
                f"task {self.name!r}: max_length must be >= 2, top_k and beam_size >= 1"
            )
        vocabulary = spec.vocabulary
        if vocabulary is not None and (
            tuple(vocabulary[:4]) != SPECIALS or not all(isinstance(w, str) for w in vocabulary)
        ):
            raise ValueError(
                f"task {self.name!r}: a vocabulary is a list of strings (quote YAML's numbers "
                f"and no/yes) starting with {list(SPECIALS)}"
            )

    @property
    def text(self) -> str:
        return self.spec.text or self.name

    @property
    def vocabulary(self) -> list[str]:
        if self.spec.vocabulary is None:
            raise ValueError(
                f"task {self.name!r} has no vocabulary yet: a run's config learns it from the "
                f"training texts (mtkd.run_config.load_config), or set tasks.{self.name}.vocabulary"
            )
        return self.spec.vocabulary

    @property
    def out_channels(self) -> int:
        return len(self.vocabulary)

    @property
    def learns_from_data(self) -> bool:
        return self.spec.vocabulary is None

    def learned_spec(self, train: list[Any]) -> dict[str, Any]:
        texts = [s.texts[self.text] for s in train if self.text in s.texts]
        if not texts:
            raise ValueError(
                f"task {self.name!r}: no training sample carries the text {self.text!r} to learn "
                f"a vocabulary from; set tasks.{self.name}.vocabulary or tasks.{self.name}.text"
            )
        return {"vocabulary": build_vocabulary(texts)}

    def sample_problems(self, labels, masks, points, texts) -> list[str] | None:
        """Labeled where the sample carries the text; any text is a valid reference."""
        return [] if self.text in texts else None

    def build_head(self, in_channels: int) -> nn.Module:
        spec = self.spec
        return TextDecoder(
            in_channels, self.out_channels, spec.hidden, spec.max_length, spec.beam_size
        )

    def target(self, ann: Annotation) -> torch.Tensor | None:
        text = ann.texts.get(self.text)
        if text is None:
            return None
        return torch.tensor(encode(text, self.vocabulary, self.spec.max_length))

    def empty_target(self, size: int) -> torch.Tensor:
        return torch.full((self.spec.max_length,), PAD, dtype=torch.long)

    def guide(self, target: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        """Force the decoder on the reference and, with a teacher output, on its tokens."""
        sequences = [target] if teacher is None else [target, teacher_tokens(teacher)]
        return torch.stack(sequences, dim=1)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Label-smoothed cross-entropy of the reference-forced slot."""
        return sequence_ce(pred[:, REFERENCE], target, self.spec.label_smoothing)

    def decoded(self, pred: torch.Tensor) -> list[str]:
        """The decoded texts of a batch of outputs, words separated by spaces."""
        ids = pred[:, DECODED].argmax(dim=-1).tolist()
        return [" ".join(words(row, self.vocabulary)) for row in ids]

    def metrics(self) -> MetricCollection:
        metrics: dict[str, Metric] = {"bleu4": BLEUScore(n_gram=4), "bleu1": BLEUScore(n_gram=1)}
        if self.spec.keywords:
            metrics["keyword_f1"] = KeywordF1()
        return MetricCollection(metrics)

    def update_metrics(self, metrics, pred, target, batch) -> None:
        references = [[" ".join(words(row, self.vocabulary))] for row in target.tolist()]
        metrics.update(self.decoded(pred), references)

    # -- readable outputs ----------------------------------------------------------------------
    def exported(self, raw: torch.Tensor) -> torch.Tensor:
        """The decode's B x L token ids (int64; ``channel_names`` is the vocabulary): the
        decoder runs inside the exported graph, and a deployment reads words, not logits."""
        return raw[:, DECODED].argmax(dim=-1)

    def channel_names(self) -> list[str]:
        return list(self.vocabulary)

    def summarise(self, value: torch.Tensor, frame: Frame) -> dict[str, Any]:
        return {"text": readable(self.decoded(value[None])[0].split())}

    def summary_line(self, summary: dict[str, Any]) -> str:
        return summary["text"]

    def caption(self, value: torch.Tensor, target: torch.Tensor | None) -> str:
        said = self.summarise(value, None)["text"]
        truth = "?" if target is None else readable(words(target.tolist(), self.vocabulary))
        return f"{said} (true {truth})"

    # -- teacher outputs and the cache -----------------------------------------------------------
    def teacher_output(self, pred: torch.Tensor) -> torch.Tensor:
        """Per position of the teacher's decode: its token (``<pad>`` after ``<eos>``), then its
        top-k log-probabilities and their token ids, B x L x (1 + 2k) floats. These are its
        distributions forced on its own tokens (under beam search with the chosen token's and
        the largest logit swapped: ``argmax_at``), so they exist for unlabeled images too; both
        KD losses force the student on the same tokens."""
        log_p = pred[:, DECODED].float().log_softmax(dim=-1)
        tokens = log_p.argmax(dim=-1)
        ended = (tokens == EOS).long().cumsum(dim=1) - (tokens == EOS).long() > 0
        tokens = tokens.masked_fill(ended, PAD)
        top = log_p.topk(min(self.spec.top_k, log_p.shape[-1]), dim=-1)
        return torch.cat([tokens[..., None].float(), top.values, top.indices.float()], dim=-1)

    def combine_teachers(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        if len(outputs) > 1:
            raise ValueError(
                f"task {self.name!r}: a text task distils from one teacher (texts decoded by "
                "different teachers cannot be averaged); name one teacher for it"
            )
        return outputs[0]

    def cache_shape(self, storage: CacheStorage) -> tuple[int, ...]:
        """L x (1 + 2k) float32 (token ids exact): 24 x 17 x 4 = 1632 bytes by default."""
        return (self.spec.max_length, 1 + 2 * min(self.spec.top_k, self.out_channels))

    def cache_dtype(self, storage: CacheStorage) -> np.dtype:
        return np.dtype(np.float32)


def argmax_at(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``logits`` (B x L x V) with, at each position, the logit of ``tokens`` (B x L) and the
    largest one swapped, so the argmax reads ``tokens`` (a beam search's choice, which need not
    be each step's argmax) and the values (the top-k a teacher caches) stay as they were."""
    chosen, top = tokens[..., None], logits.argmax(dim=-1, keepdim=True)
    swapped = logits.scatter(-1, top, logits.gather(-1, chosen))
    return swapped.scatter(-1, chosen, logits.gather(-1, top))


def teacher_tokens(teacher: torch.Tensor) -> torch.Tensor:
    """The token ids of a ``teacher_output``."""
    return teacher[..., 0].long()


@register_kd_loss("text", "word")
def word_kd(task: TextTask, pred: torch.Tensor, teacher: torch.Tensor, temperature: float):
    """Word-level KD: T^2 * mean over the teacher's non-pad positions of KL(p_t || p_s), the
    student forced on the teacher's tokens, p_t = softmax(log p_teacher / T) over the teacher's
    cached top k, p_s = softmax(z / T) over the vocabulary read at those k ids. Its gradient in
    the student's logits is T (p_s - p_t) / n per position (p_t 0 outside the top k)."""
    k = (teacher.shape[-1] - 1) // 2
    log_p_t = F.log_softmax(teacher[..., 1 : 1 + k] / temperature, dim=-1)
    log_p_s = F.log_softmax(pred[:, TEACHER] / temperature, dim=-1)
    log_p_s = log_p_s.gather(-1, teacher[..., 1 + k :].long())
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    kept = (teacher_tokens(teacher) != PAD).to(kl.dtype)
    return temperature**2 * (kl * kept).sum(dim=1) / kept.sum(dim=1).clamp(min=1)


@register_kd_loss("text", "sequence")
def sequence_kd(task: TextTask, pred: torch.Tensor, teacher: torch.Tensor, temperature: float):
    """Sequence-level KD (Kim & Rush 2016): cross-entropy of the student forced on the teacher's
    decode against it, over its non-pad positions (T unused); images without a reference
    text learn from it too."""
    return sequence_ce(pred[:, TEACHER], teacher_tokens(teacher), 0.0)
