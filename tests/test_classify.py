"""Text classification: a tiny pretrained model + head, trained, saved, reloaded and served at /v1/classify.

References: a naive one-sentence-at-a-time loop (no padding) for pooling, sklearn.metrics for accuracy and
macro-F1, and a real `lmforge serve` subprocess driven over HTTP for the endpoint.
"""

import json

import httpx
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from lmforge.apps.classifier import (
    CLASSIFY_FILE,
    HEAD_FILE,
    Ensemble,
    load_classifier,
    new_classifier,
    predict,
    save_classifier,
)
from lmforge.apps.classify import (
    ClassifyConfig,
    ClassifyDataError,
    accuracy,
    body_param_groups,
    cross_folds,
    macro_f1,
    read_labelled,
    train_classifier,
    train_ensemble,
)
from lmforge.checkpoint import CheckpointError, save_model
from lmforge.cli import main as cli_main
from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.serve.process import start_server, stop_server
from lmforge.tokenizer import train_tokenizer

POSITIVE = [
    "great phone, works well",
    "i love this place",
    "excellent food and a lovely view",
    "very good value",
    "the best movie i have seen",
    "wonderful acting, great story",
    "nice and friendly staff",
    "love it",
]
NEGATIVE = [
    "terrible phone, broke in a day",
    "i hate this place",
    "awful food and a rude waiter",
    "very bad value",
    "the worst movie i have seen",
    "boring acting, dull story",
    "slow and unfriendly staff",
    "hate it",
]
TEXTS = ["short", "a much longer sentence that needs padding when batched with short ones", "good", "not good at all"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random 'pretrained' model folder with a BPE tokenizer (it has an EOS, appended to each text)."""
    folder = tmp_path_factory.mktemp("classify") / "base"
    tok = train_tokenizer("bpe", (POSITIVE + NEGATIVE + TEXTS) * 5, 300)
    torch.manual_seed(0)
    save_model(
        folder,
        Transformer(
            ModelConfig.from_name("gpt-nano", vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=64)
        ),
        tok,
    )
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("classify_data") / "tiny_labelled.txt"
    lines = [f"{t}\t1" for t in POSITIVE] + [f"{t}\t0" for t in NEGATIVE]
    path.write_text("\n".join(lines * 2) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def classifier_dir(base, data_file, tmp_path_factory):
    """A classifier trained through the CLI (full fine-tuning, a few steps)."""
    out = tmp_path_factory.mktemp("classify_out") / "sentiment"
    assert (
        cli_main(
            [
                "classify",
                "train",
                str(base),
                "--data",
                str(data_file),
                "--out",
                str(out),
                "--epochs",
                "2",
                "--batch-size",
                "8",
                "--test-fraction",
                "0.25",
                "--pooling",
                "mean",
            ]
        )
        == 0
    )
    return out


def test_train_save_reload_gives_identical_probabilities(base, data_file, tmp_path):
    examples = read_labelled(data_file)
    clf, encoder = new_classifier(base, ["negative", "positive"], "last", head_only=False)
    before = {k: v.clone() for k, v in clf.body.state_dict().items()}
    summary = train_classifier(
        clf,
        encoder,
        examples,
        None,
        ClassifyConfig(pooling="last", epochs=2, batch_size=8, head_epochs=20, patience=None),
        log=lambda s: None,
    )
    assert len(summary["history"]) == 3
    assert any(not torch.equal(before[k], v) for k, v in clf.body.state_dict().items())  # the body was trained
    probs = predict(clf, encoder, TEXTS)
    save_classifier(tmp_path / "clf", clf, encoder.tokenizer, {"base": str(base)})
    assert {CLASSIFY_FILE, HEAD_FILE, "config.json", "model.safetensors"} <= {
        p.name for p in (tmp_path / "clf").iterdir()
    }
    again, encoder2, meta = load_classifier(tmp_path / "clf")
    assert meta["labels"] == ["negative", "positive"] and meta["pooling"] == "last"
    assert torch.equal(predict(again, encoder2, TEXTS), probs)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(TEXTS)))


def test_head_only_leaves_the_body_alone(base, data_file):
    examples = read_labelled(data_file)
    clf, encoder = new_classifier(base, ["negative", "positive"], "mean", head_only=True)
    before = {k: v.clone() for k, v in clf.body.state_dict().items()}
    train_classifier(clf, encoder, examples, None, ClassifyConfig(head_only=True, head_epochs=30), log=lambda s: None)
    assert all(torch.equal(before[k], v) for k, v in clf.body.state_dict().items())
    assert clf.head.weight.abs().sum() > 0  # the head learned something (it starts at zero)
    pred = predict(clf, encoder, [e.text for e in examples]).argmax(-1).tolist()
    assert accuracy([e.label for e in examples], pred) > 0.5


@pytest.mark.parametrize("pooling", ["last", "mean", "max", "concat"])
def test_padding_does_not_change_a_sentence(base, pooling):
    clf, encoder = new_classifier(base, ["negative", "positive"], pooling, head_only=True)
    torch.manual_seed(1)
    torch.nn.init.normal_(clf.head.weight, std=1.0)
    batched = predict(clf, encoder, TEXTS, batch_size=len(TEXTS))  # one right-padded batch
    with torch.no_grad():  # naive: each sentence alone, pooled by hand
        naive = []
        for text in TEXTS:
            h = clf.body.hidden(torch.tensor([encoder.ids(text)]))[0]  # (T, C)
            pooled = {
                "last": h[-1],
                "mean": h.mean(0),
                "max": h.max(0).values,
                "concat": torch.cat([h[-1], h.mean(0), h.max(0).values]),
            }[pooling]
            naive.append(clf.head(pooled).softmax(-1))
    torch.testing.assert_close(batched, torch.stack(naive), atol=1e-5, rtol=1e-5)


def test_layer_decay_scales_each_layer_down_from_the_top(base, data_file):
    clf, encoder = new_classifier(base, ["negative", "positive"], "last", head_only=False)
    groups = body_param_groups(clf.body, 1e-3, 0.5)  # 2 layers: embeddings, block 0, block 1 + final norm
    assert [g["lr"] for g in groups] == pytest.approx([2.5e-4, 5e-4, 1e-3])
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in clf.body.parameters())  # each parameter exactly once
    before = {k: v.clone() for k, v in clf.body.state_dict().items()}
    train_classifier(
        clf,
        encoder,
        read_labelled(data_file),
        None,
        ClassifyConfig(epochs=1, batch_size=8, head_epochs=5, patience=None, layer_decay=0.0),
        log=lambda s: None,
    )
    after = clf.body.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("blocks.1.", "norm_f")) for k in changed)  # only the top learned


def test_ensemble_averages_its_members_and_reloads(base, data_file, tmp_path):
    examples = read_labelled(data_file)
    clf, encoder = new_classifier(base, ["negative", "positive"], "concat", head_only=False, dropout=0.1)
    model, summary = train_ensemble(
        clf,
        encoder,
        examples,
        None,
        ClassifyConfig(pooling="concat", epochs=1, batch_size=8, head_epochs=5, patience=None, ensemble=3),
        log=lambda s: None,
    )
    assert isinstance(model, Ensemble) and len(model.members) == 3 and summary["kept"] == [0, 1, 2]
    each = [predict(m, encoder, TEXTS) for m in model.members]
    assert not torch.equal(each[0], each[1])  # different seeds, different members
    probs = predict(model, encoder, TEXTS)
    torch.testing.assert_close(probs, torch.stack(each).mean(0))
    save_classifier(tmp_path / "ens", model, encoder.tokenizer, {"base": str(base)})
    again, encoder2, meta = load_classifier(tmp_path / "ens")
    assert meta["members"] == ["member-1", "member-2"] and isinstance(again, Ensemble)
    torch.testing.assert_close(predict(again, encoder2, TEXTS), probs)


def test_cross_fit_members_each_hold_out_their_own_fold(base, data_file):
    examples = read_labelled(data_file)
    splits = cross_folds(examples, 4, seed=0)
    helds = [held for _, held in splits]
    assert sorted(id(e) for h in helds for e in h) == sorted(id(e) for e in examples)  # a partition
    assert all(
        len(fit) + len(held) == len(examples) and not {id(e) for e in fit} & {id(e) for e in held}
        for fit, held in splits
    )
    clf, encoder = new_classifier(base, ["negative", "positive"], "mean", head_only=False)
    model, summary = train_ensemble(
        clf,
        encoder,
        examples[:24],
        examples[24:],
        ClassifyConfig(pooling="mean", epochs=1, batch_size=8, head_epochs=5, ensemble=4, cross_fit=True),
        log=lambda s: None,
    )
    assert isinstance(model, Ensemble) and len(model.members) == 4 and summary["out_of_fold"]
    right = sum(
        int(predict(m, encoder, [e.text]).argmax(-1).item() == e.label)
        for m, (_, held) in zip(model.members, splits)
        for e in held
    )
    assert summary["best_val_acc"] == pytest.approx(right / len(examples))  # each scored by the member without it


def test_cli_trains_an_ensemble(base, data_file, tmp_path, capsys):
    out = tmp_path / "ens"
    assert (
        cli_main(
            [
                "classify",
                "train",
                str(base),
                "--data",
                str(data_file),
                "--out",
                str(out),
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--ensemble",
                "2",
                "--pooling",
                "concat",
                "--layer-decay",
                "0.8",
                "--label-smoothing",
                "0.1",
            ]
        )
        == 0
    )
    meta = json.loads((out / CLASSIFY_FILE).read_text())
    assert meta["config"]["ensemble"] == 2 and len(meta["training"]["members"]) == 2
    capsys.readouterr()
    assert cli_main(["classify", "predict", str(out), "--text", "love it"]) == 0
    assert capsys.readouterr().out.split("\t")[0] in ("negative", "positive")


def test_metrics_match_sklearn():
    y_true = [0, 1, 2, 2, 1, 0, 0, 2, 1, 1, 0, 2]
    y_pred = [0, 2, 2, 2, 1, 0, 1, 0, 1, 1, 0, 1]
    assert accuracy(y_true, y_pred) == pytest.approx(accuracy_score(y_true, y_pred))
    assert macro_f1(y_true, y_pred, 3) == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    never = [0, 0, 0, 1]  # label 1 never predicted: its F1 is 0, as sklearn's (zero_division=0)
    assert macro_f1([0, 1, 0, 1], never, 2) == pytest.approx(
        f1_score([0, 1, 0, 1], never, average="macro", zero_division=0)
    )


@pytest.mark.parametrize(
    "content, message",
    [
        (b"fine\t1\nok\t0\nbad \xff byte\t0\n", ":3: not valid UTF-8"),
        (b"fine\t1\nno label here\n", ":2: no label"),
        (b"fine\t1\nok\t0\nhm\t0\nwhat\t2\n", ":4: label '2' is not one of 0, 1"),
        (b"fine\t1\n\t0\n", ":2: the text before the label is empty"),
    ],
)
def test_bad_data_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(ClassifyDataError, match=str(path).replace("\\", "\\\\") + message):
        read_labelled(path)


def test_cli_predict_and_eval(classifier_dir, data_file, capsys):
    meta = json.loads((classifier_dir / CLASSIFY_FILE).read_text())
    assert meta["split"] == {"train": 22, "val": 2, "test": 8, "seed": 0} and 0 <= meta["test"]["accuracy"] <= 1
    capsys.readouterr()
    assert cli_main(["classify", "predict", str(classifier_dir), "--text", "love it", "hate it"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    label, probs, text = lines[0].split("\t")
    assert label in ("negative", "positive") and text == "love it"
    assert sum(float(p.split("=")[1]) for p in probs.split()) == pytest.approx(1, abs=1e-3)
    assert cli_main(["classify", "eval", str(classifier_dir), "--data", str(data_file)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["n"] == 32 and 0 <= scores["macro_f1"] <= 1


def test_cli_errors_are_clear(base, tmp_path, capsys):
    assert cli_main(["classify", "predict", str(base), "--text", "hi"]) == 1  # a model, not a classifier
    assert "holds no classify.json" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text("ok\t1\nnope\tmaybe\n", encoding="utf-8")
    assert cli_main(["classify", "train", str(base), "--data", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert f"{bad}:2: label 'maybe'" in capsys.readouterr().err
    with pytest.raises(CheckpointError):
        load_classifier(base)


# ---------------------------------------------------------------------------------------------- the endpoint


@pytest.fixture(scope="module")
def classify_server(classifier_dir):
    proc, url = start_server(str(classifier_dir), "--log-level", "warning")  # the folder is found to be one
    yield url
    stop_server(proc)


def test_classify_endpoint(classify_server, classifier_dir):
    clf, encoder, _ = load_classifier(classifier_dir)
    r = httpx.post(classify_server + "/v1/classify", json={"input": TEXTS, "model": "sentiment"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
    expected = predict(clf, encoder, TEXTS)
    for d, p in zip(body["data"], expected.tolist()):
        assert set(d["probabilities"]) == {"negative", "positive"}
        assert sum(d["probabilities"].values()) == pytest.approx(1, abs=1e-6)
        assert d["label"] == max(d["probabilities"], key=d["probabilities"].get)
        assert list(d["probabilities"].values()) == pytest.approx(p, abs=1e-6)  # the same as in-process
    assert body["usage"]["prompt_tokens"] == sum(len(encoder.ids(t)) for t in TEXTS)
    one = httpx.post(classify_server + "/v1/classify", json={"input": "love it"}, timeout=60).json()
    assert len(one["data"]) == 1 and one["data"][0]["index"] == 0


@pytest.mark.parametrize(
    "payload, fragment",
    [
        ({"input": []}, "input is empty"),
        ({"input": ""}, "empty text"),
        ({"input": ["ok", "  "]}, "input[1] is an empty text"),
        ({"input": ["ok"] * 257}, "at most 256"),
        ({"input": "word " * 200}, "this classifier reads at most 64"),
        ({"input": 5}, "input"),
        ({}, "input"),
    ],
)
def test_classify_validation_errors_are_400s(classify_server, payload, fragment):
    r = httpx.post(classify_server + "/v1/classify", json=payload, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "input" and fragment in error["message"]
    assert error["type"] == "invalid_request_error"


def test_classify_unknown_model_is_404(classify_server):
    r = httpx.post(classify_server + "/v1/classify", json={"input": "hi", "model": "nope"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_server_without_classifier_says_so(base):
    proc, url = start_server(str(base), "--log-level", "warning")
    try:
        r = httpx.post(url + "/v1/classify", json={"input": "hi"}, timeout=60)
    finally:
        stop_server(proc)
    assert r.status_code == 404
    assert "--classifier" in r.json()["error"]["message"]
