"""The text task kind: vocabulary, teacher forcing vs greedy decoding, BLEU, word-level KD's
gradient, the cache refused for another vocabulary, and a tiny teacher -> cache -> distill ->
evaluate run with a text task added through the config alone."""

from __future__ import annotations

import io
import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from data_modules.datamodule import check_labels
from data_modules.manifest import read_manifest
from data_modules.samples import Sample
from mtkd.commands.exporting import ONNX_OPSET, export
from mtkd.commands.prediction import predict
from mtkd.kd.cache import StaleCacheError, TeacherCache
from mtkd.modules.checkpoint import load_net
from mtkd.run_config import load_config
from mtkd.stages import cache_teacher, evaluate, fit, open_checked_cache
from mtkd.tasks import build_tasks
from mtkd.tasks.text import (
    BOS,
    DECODED,
    EOS,
    PAD,
    REFERENCE,
    TEACHER,
    KeywordF1,
    TextDecoder,
    build_vocabulary,
    encode,
    readable,
    tokenize,
    word_kd,
    words,
)
from tests.conftest import distill_cfg, tiny_overrides

TEXTS = ["moderate retinopathy; hard exudates", "no retinopathy; cup-to-disc 0.6"]
REPORT = "tasks.report={kind: text, max_length: 12, hidden: 32, top_k: 4}"


def text_task(length: int = 8, top_k: int = 4):
    vocabulary = build_vocabulary(TEXTS)
    spec = {"kind": "text", "vocabulary": vocabulary, "max_length": length, "top_k": top_k}
    return build_tasks({"report": spec})["report"]


def test_vocabulary_round_trip() -> None:
    vocabulary = build_vocabulary(list(reversed(TEXTS)))
    assert vocabulary == build_vocabulary(TEXTS)  # order of the texts does not matter
    ids = encode(TEXTS[0], vocabulary, 8)
    assert len(ids) == 8 and ids[5] == EOS and ids[6:] == [PAD, PAD]
    assert readable(words(ids, vocabulary)) == TEXTS[0]
    assert words(encode("unseen words", vocabulary, 8), vocabulary) == ["<unk>", "<unk>"]
    assert len(encode(TEXTS[0], vocabulary, 3)) == 3  # truncated, <eos> kept


def test_greedy_decoding_equals_teacher_forcing_on_its_own_tokens() -> None:
    torch.manual_seed(0)
    decoder = TextDecoder(6, vocabulary=7, hidden=5, length=6)
    with torch.no_grad():
        decoder.out.weight.mul_(50)  # confident: an argmax far from any tie
    pooled = torch.randn(3, 6)
    greedy = decoder(pooled)[:, DECODED]
    tokens = greedy.argmax(dim=-1)
    forced = decoder(pooled, tokens[:, None])[:, 1]
    assert torch.equal(forced.argmax(dim=-1), tokens)
    assert torch.allclose(forced, greedy, atol=1e-4)


def markov_decoder(p: torch.Tensor, beam_size: int) -> TextDecoder:
    """A decoder whose next token follows row ``p[previous token]`` whatever the image: one-hot
    embeddings, the GRU's update gate shut and its candidate tanh(20 x), so the state is the
    previous token's one-hot and the output layer reads out log p."""
    v = p.shape[0]
    decoder = TextDecoder(1, vocabulary=v, hidden=v, length=4, beam_size=beam_size)
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.zero_()
        decoder.embed.weight.copy_(torch.eye(v))
        decoder.gru.bias_ih_l0[v : 2 * v] = -30.0
        decoder.gru.weight_ih_l0[2 * v :] = 20 * torch.eye(v)
        decoder.out.weight.copy_(p.log().T)
    return decoder.eval()  # beam search decodes in eval mode


def test_beam_search_finds_the_more_probable_text_that_greedy_misses() -> None:
    a, b = 4, 5  # the two words after the special tokens
    p = torch.full((6, 6), 1e-4)
    p[BOS, a], p[BOS, b] = 0.55, 0.45
    p[a, EOS], p[a, a], p[a, b] = 0.4, 0.3, 0.3  # greedy: a <eos>, 0.55 x 0.4 = 0.22
    p[b, EOS], p[b, a], p[b, b] = 0.9, 0.05, 0.05  # beam: b <eos>, 0.45 x 0.9 = 0.405
    p = p / p.sum(dim=1, keepdim=True)
    pooled = torch.zeros(2, 1)
    greedy = markov_decoder(p, beam_size=1)(pooled)[:, DECODED].argmax(dim=-1)
    assert greedy[:, :2].tolist() == [[a, EOS]] * 2
    beam = markov_decoder(p, beam_size=2)(pooled)[:, DECODED]
    assert beam.argmax(dim=-1).tolist() == [[b, EOS, PAD, PAD]] * 2
    # A training step reads only the forced slots: its slot 0 is the greedy decode, no beam.
    training = markov_decoder(p, beam_size=2).train()(pooled)[:, DECODED].argmax(dim=-1)
    assert training[:, :2].tolist() == [[a, EOS]] * 2
    # The values are the decoder's, forced on the beam's text: only which token holds them moves.
    forced = markov_decoder(p, beam_size=1)(pooled, beam.argmax(dim=-1)[:, None])[:, 1]
    assert torch.allclose(beam.sort(dim=-1).values, forced.sort(dim=-1).values)


def test_a_beam_of_one_is_greedy_decoding() -> None:
    torch.manual_seed(1)
    decoder = TextDecoder(6, vocabulary=7, hidden=5, length=6)
    with torch.no_grad():
        decoder.out.weight.mul_(50)  # confident: an argmax far from any tie
        decoder.out.bias[EOS] += 5  # two of the four texts end early
    pooled = torch.randn(4, 6)
    greedy = decoder(pooled)[:, DECODED].argmax(dim=-1)
    beam = decoder.beam(torch.tanh(decoder.start(pooled))[None], decoder.condition(pooled)[:, None])
    ended = (greedy == EOS).cumsum(dim=1) - (greedy == EOS).long() > 0
    assert torch.equal(beam, greedy.masked_fill(ended, PAD))  # the beam pads after <eos>
    assert (greedy == EOS).any() and ended.any()


@pytest.mark.parametrize("eos_bias", [1.0, -4.0])  # the best texts end early / run full length
def test_a_beam_that_keeps_every_prefix_finds_the_most_probable_text(eos_bias: float) -> None:
    """Beam k = V^(L-1) drops no prefix, so it must return exhaustive search's best text:
    the sum of log-probabilities up to <eos>, <pad> after it."""
    torch.manual_seed(0)
    v, length = 5, 4
    decoder = TextDecoder(4, vocabulary=v, hidden=5, length=length, beam_size=v ** (length - 1))
    decoder.eval()  # beam search decodes in eval mode
    with torch.no_grad():
        decoder.out.weight.mul_(3)
        decoder.out.bias[EOS] += eos_bias
    pooled = torch.randn(16, 4)
    texts = [
        t
        for t in itertools.product(range(v), repeat=length)
        if all(t[i + 1] == PAD for i in range(length - 1) if EOS in t[: i + 1])
    ]
    tokens = torch.tensor(texts)
    kept = ((tokens == EOS).cumsum(dim=1) - (tokens == EOS).long() == 0).float()
    for image, found in zip(pooled, decoder(pooled)[:, DECODED].argmax(dim=-1)):
        forced = decoder(image.expand(len(texts), -1), tokens[:, None])[:, 1]
        log_p = forced.log_softmax(dim=-1).gather(-1, tokens[..., None])[..., 0]
        assert found.tolist() == list(texts[int((log_p * kept).sum(dim=1).argmax())])


def test_beam_size_and_keywords_are_options_that_keep_the_tasks_identity() -> None:
    """Neither changes a weight or a teacher's cache: a checkpoint is rescored with them."""
    task = build_tasks({"report": {**text_task().describe(), "beam_size": 3, "keywords": True}})
    assert task["report"].build_head(8).beam_size == 3
    assert task["report"].identity() == text_task().identity()
    with pytest.raises(ValueError, match="beam_size >= 1"):
        build_tasks({"report": {**text_task().describe(), "beam_size": 0}})


class Decoded(torch.nn.Module):
    """A decoder's slot-0 token ids, as the exported graph gives them."""

    def __init__(self, decoder: TextDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.decoder(pooled)[:, DECODED].argmax(dim=-1)


def test_the_beam_runs_inside_the_exported_graph() -> None:
    """ONNX Runtime gives the beam's token ids that PyTorch gives, at any batch size."""
    torch.manual_seed(0)
    decoded = Decoded(TextDecoder(8, vocabulary=12, hidden=16, length=6, beam_size=3)).eval()
    graph = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's notes on GRUs and tracing
        torch.onnx.export(
            decoded,
            (torch.randn(2, 8),),
            graph,
            input_names=["pooled"],
            dynamic_axes={"pooled": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    session = ort.InferenceSession(graph.getvalue(), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        pooled = torch.randn(batch, 8)
        with torch.inference_mode():
            expected = decoded(pooled).numpy()
        assert np.array_equal(session.run(None, {"pooled": pooled.numpy()})[0], expected)


def test_bleu_of_identical_texts_is_one_and_of_disjoint_texts_zero() -> None:
    task = text_task()
    vocabulary = task.vocabulary
    target = torch.tensor([encode(TEXTS[0], vocabulary, 8)])

    def bleu(text: str) -> dict[str, float]:
        logits = torch.nn.functional.one_hot(torch.tensor([encode(text, vocabulary, 8)]), 12)
        metrics = task.metrics()
        task.update_metrics(metrics, logits.float()[:, None], target, {})
        return {k: float(v) for k, v in metrics.compute().items()}

    assert bleu(TEXTS[0]) == {"bleu4": 1.0, "bleu1": 1.0}
    assert bleu("no cup-to-disc 0.6 no cup-to-disc") == {"bleu4": 0.0, "bleu1": 0.0}
    assert task.higher_is_better()


def keyword_f1(pairs: list[tuple[str, str]]) -> float:
    metric = KeywordF1()
    metric.update([said for said, _ in pairs], [[true] for _, true in pairs])
    return float(metric.compute())


def test_keyword_f1_counts_keywords_over_the_corpus_in_any_order() -> None:
    assert keyword_f1([("cataract, drusen", "drusen ,cataract")]) == 1.0
    assert keyword_f1([("cataract", "normal fundus, drusen")]) == 0.0
    # TP 2 (cataract, normal fundus), FP 1 (drusen), FN 2 (laser spot, glaucoma): 4 / 7.
    partial = [
        ("cataract, drusen", "glaucoma, cataract, laser spot"),
        ("normal fundus", "normal fundus"),
    ]
    assert keyword_f1(partial) == pytest.approx(4 / 7)
    # Summed states (what DDP reduces): two halves merged score as the whole corpus.
    halves = [KeywordF1(), KeywordF1()]
    for metric, (said, true) in zip(halves, partial):
        metric.update([said], [[true]])
    halves[0].merge_state(halves[1])
    assert float(halves[0].compute()) == pytest.approx(4 / 7)


def test_keyword_f1_is_scored_where_the_spec_says_the_texts_are_keywords() -> None:
    texts = ["cataract, laser spot", "normal fundus"]
    vocabulary = build_vocabulary(texts)
    spec = {"kind": "text", "vocabulary": vocabulary, "max_length": 6}
    assert "keyword_f1" not in build_tasks({"k": spec})["k"].metrics()
    task = build_tasks({"k": {**spec, "keywords": True}})["k"]
    target = torch.tensor([encode(texts[0], vocabulary, 6)])
    said = torch.nn.functional.one_hot(
        torch.tensor([encode("laser spot", vocabulary, 6)]), len(vocabulary)
    )
    metrics = task.metrics()
    task.update_metrics(metrics, said.float()[:, None], target, {})
    assert float(metrics.compute()["keyword_f1"]) == pytest.approx(2 / 3)  # TP 1, FN 1


def test_word_kd_gradient_is_t_times_student_minus_teacher_probabilities() -> None:
    task = text_task(length=3, top_k=12)  # k = V: the teacher's whole distribution
    torch.manual_seed(0)
    teacher_logits = torch.randn(1, 1, 3, 12)
    teacher = task.teacher_output(teacher_logits)
    teacher[0, :, 0] = torch.tensor([5.0, 6.0, float(PAD)])  # two positions, then padding
    student = torch.randn(1, 3, 3, 12, requires_grad=True)
    t = 2.0
    word_kd(task, student, teacher, t).sum().backward()
    p_s = (student[0, TEACHER] / t).softmax(dim=-1)
    p_t = (teacher_logits[0, DECODED] / t).softmax(dim=-1)
    expected = t * (p_s - p_t) / 2
    expected[2] = 0  # a padded position adds nothing
    assert torch.allclose(student.grad[0, TEACHER], expected.detach(), atol=1e-5)
    assert student.grad[0, REFERENCE].abs().sum() == 0


@pytest.fixture(scope="module")
def teacher(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher (one epoch, 64 px) with the demo's tasks and ``REPORT``."""
    run = tmp_path_factory.mktemp("text") / "teacher"
    return fit(load_config("teacher", [*tiny_overrides(synth_root, run), REPORT]))


@pytest.mark.integration
def test_text_task_teacher_cache_distill_evaluate(
    teacher: Path, synth_root: Path, tmp_path: Path
) -> None:
    saved = torch.load(teacher, map_location="cpu", weights_only=False)
    vocabulary = saved["hyper_parameters"]["config"]["tasks"]["report"]["vocabulary"]
    assert "retinopathy" in vocabulary  # learned from the synthetic reports, kept in the ckpt

    cfg = distill_cfg(synth_root, tmp_path, f"cache.teacher=[{teacher}]", REPORT)
    cache_teacher(cfg)
    row = TeacherCache(cfg.kd.cache_dir, build_tasks({"report": cfg.tasks.report}))
    assert row.nbytes_per_sample()["report"] == 12 * (1 + 2 * 4) * 4

    for loss in ("word", "sequence"):
        run = tmp_path / loss
        student = fit(
            distill_cfg(
                synth_root,
                run,
                REPORT,
                f"kd.cache_dir={cfg.kd.cache_dir}",
                f"kd.tasks.report.loss={loss}",
            )
        )
        metrics = json.loads((run / "metrics_val.json").read_text())["metrics"]
        assert 0 <= metrics["val/report/bleu4"] <= 1
    scores = evaluate(str(student), "test", [])
    assert 0 <= scores["test/report/bleu4"] <= 1 and "test/report/bleu1" in scores
    # Rescored by beam search with keyword F1: options of the checkpoint's task, with intervals.
    out = tmp_path / "beam.json"
    options = ["tasks.report.beam_size=3", "tasks.report.keywords=true"]
    rescored = evaluate(str(student), "test", options, out=str(out), bootstrap=20)
    assert 0 <= rescored["test/report/keyword_f1"] <= 1
    assert "test/report/keyword_f1" in json.loads(out.read_text())["ci"]

    # Another vocabulary: the cache is refused.
    other = distill_cfg(
        synth_root,
        tmp_path / "other",
        REPORT,
        f"kd.cache_dir={cfg.kd.cache_dir}",
        f"tasks.report.vocabulary={json.dumps(vocabulary[:-1])}",
    )
    with pytest.raises(StaleCacheError, match="tasks differs"):
        open_checked_cache(other, build_tasks({**other.tasks}))


@pytest.mark.integration
def test_a_student_on_a_fraction_of_the_labels_learns_its_teachers_vocabulary(
    synth_root: Path, tmp_path: Path
) -> None:
    """The vocabulary is learned from every training text whatever ``data.label_fraction``:
    otherwise the scarce-label student's task would differ from its teacher's and the teacher's
    cache would be refused."""
    learned = [
        distill_cfg(synth_root, tmp_path, REPORT, f"data.label_fraction={f}").tasks.report
        for f in (1.0, 0.25)
    ]
    assert learned[0].vocabulary == learned[1].vocabulary


@pytest.mark.integration
def test_predict_prints_and_writes_each_images_text(
    teacher: Path, synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    images = [s.image for s in read_manifest(synth_root)[:2]]
    vocabulary = set(load_net(teacher)[1]["report"].vocabulary)
    printed = []
    for image in images:
        payload = predict(teacher, image, tmp_path / Path(image).stem)
        text = payload["predictions"][0]["tasks"]["report"]["text"]
        assert set(tokenize(text)) <= vocabulary
        printed.append(text)
    out = capsys.readouterr().out
    assert all(f"  report         {text}\n" in out for text in printed)


@pytest.mark.integration
def test_export_runs_the_decoder_in_the_graph(teacher: Path, tmp_path: Path) -> None:
    """ONNX Runtime gives the greedy decode's token ids that PyTorch gives, at any batch size,
    and the metadata names the vocabulary that reads them."""
    out = export(teacher, tmp_path)
    net, tasks, cfg = load_net(teacher)
    meta = json.loads((out / "metadata.json").read_text())["tasks"]["report"]
    assert meta["names"] == tasks["report"].vocabulary
    assert meta["shape"] == ["batch", tasks["report"].spec.max_length]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    index = list(tasks).index("report")
    for batch in (2, 3):
        image = torch.randn(batch, 3, cfg.data.image_size, cfg.data.image_size)
        with torch.inference_mode():
            expected = net(image)["report"][:, DECODED].argmax(dim=-1)
        got = session.run(None, {"image": image.numpy()})[index]
        assert np.array_equal(got, expected.numpy())


def test_a_text_task_whose_text_no_sample_carries_is_refused_when_the_data_is_read() -> None:
    samples = [Sample(f"s{i}", f"p{i}", f"s{i}.png", texts={"report": TEXTS[i]}) for i in (0, 1)]
    spec = {"kind": "text", "vocabulary": build_vocabulary(TEXTS)}
    check_labels(samples, build_tasks({"report": spec}), teacher_covers=False)
    with pytest.raises(ValueError, match=r"'findings'.*no sample.*'texts': \['report'\]"):
        check_labels(samples, build_tasks({"findings": spec}), teacher_covers=False)
