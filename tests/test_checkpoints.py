"""Checkpoint layouts: reference, BERT (gamma/beta) and our own; export back to the reference."""

from __future__ import annotations

import pickle
import re

import pytest
import torch
from conftest import TINY

import uniter_fast as uf
from uniter_fast.authors import model as authors_model

# Every key the reference's pretraining model has, from UNITER_FACTS (layer index as {i}).
REFERENCE_PATTERNS = [
    r"uniter\.embeddings\.(word_embeddings|position_embeddings|token_type_embeddings)\.weight",
    r"uniter\.embeddings\.LayerNorm\.(weight|bias)",
    r"uniter\.img_embeddings\.(img_linear|img_layer_norm|pos_linear|pos_layer_norm|LayerNorm)\.(weight|bias)",
    r"uniter\.img_embeddings\.mask_embedding\.weight",
    r"uniter\.encoder\.layer\.\d+\.attention\.self\.(query|key|value)\.(weight|bias)",
    r"uniter\.encoder\.layer\.\d+\.attention\.output\.(dense|LayerNorm)\.(weight|bias)",
    r"uniter\.encoder\.layer\.\d+\.intermediate\.dense\.(weight|bias)",
    r"uniter\.encoder\.layer\.\d+\.output\.(dense|LayerNorm)\.(weight|bias)",
    r"uniter\.pooler\.dense\.(weight|bias)",
    r"cls\.predictions\.bias",
    r"cls\.predictions\.transform\.(dense|LayerNorm)\.(weight|bias)",
    r"cls\.predictions\.decoder\.weight",
    r"feat_regress\.(weight|bias)",
    r"feat_regress\.net\.[02]\.(weight|bias)",
    r"region_classifier\.net\.[023]\.(weight|bias)",
    r"itm_output\.(weight|bias)",
]


def _random_reference_state(config=TINY) -> dict:
    """A reference-layout state dict with fresh random values (tied keys equal, as saved)."""
    state = authors_model.UniterForPretraining(config).state_dict()
    out = {k: torch.randn_like(v) for k, v in state.items()}
    out["cls.predictions.decoder.weight"] = out["uniter.embeddings.word_embeddings.weight"]
    out["feat_regress.weight"] = out["uniter.img_embeddings.img_linear.weight"]
    return out


def test_export_has_exactly_the_reference_keys():
    exported = uf.export_reference(uf.UniterForPretraining(TINY))
    pattern = re.compile("|".join(f"(?:{p})" for p in REFERENCE_PATTERNS))
    assert all(pattern.fullmatch(k) for k in exported), [
        k for k in exported if not pattern.fullmatch(k)
    ]
    theirs = authors_model.UniterForPretraining(TINY).state_dict()
    assert list(exported) == list(theirs)
    assert all(exported[k].shape == theirs[k].shape for k in theirs)
    assert all(v.dtype == torch.float32 for v in exported.values())


def test_reference_layout_round_trips_exactly(tmp_path):
    source = _random_reference_state()
    path = tmp_path / "uniter-tiny.pt"
    torch.save(source, path)
    model = uf.UniterForPretraining(TINY)
    report = uf.load_pretrained(model, path, verbose=False)
    assert report.layout == "reference"
    assert not report.missing and not report.unexpected and not report.tied_conflicts
    exported = uf.export_reference(model)
    assert list(exported) == list(source)
    for key in source:
        assert torch.equal(exported[key], source[key]), key


def test_own_layout_round_trips_and_is_detected():
    a = uf.UniterForPretraining(TINY)
    b = uf.UniterForPretraining(TINY)
    report = uf.load_pretrained(b, a.state_dict(), verbose=False)
    assert report.layout == "uniter-fast" and not report.missing and not report.unexpected
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


def test_training_checkpoint_wrappers_and_module_prefix(tmp_path):
    source = _random_reference_state()
    wrapped = {"model": {f"module.{k}": v for k, v in source.items()}, "step": 3}
    path = tmp_path / "ckpt.pt"
    torch.save(wrapped, path)
    model = uf.UniterForPretraining(TINY)
    report = uf.load_pretrained(model, path, verbose=False)
    assert not report.missing and not report.unexpected
    assert ("module.itm_output.bias", "itm_output.bias") in report.renamed
    assert torch.equal(uf.export_reference(model)["itm_output.bias"], source["itm_output.bias"])


def test_bert_layout_with_gamma_beta(capsys):
    ref = _random_reference_state()
    bert = {}
    for key, value in ref.items():
        if key.startswith("uniter.img_embeddings") or key.startswith(
            ("feat_regress", "region_classifier", "itm_output")
        ):
            continue  # BERT has no image embedder and no UNITER heads
        if key == "cls.predictions.decoder.weight":
            bert[key] = value
            continue
        key = key.replace("uniter.", "bert.", 1)
        key = re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", key)
        key = re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", key)
        bert[key] = value
    bert["cls.seq_relationship.weight"] = torch.zeros(2, TINY.hidden_size)
    model = uf.UniterForPretraining(TINY)
    report = uf.load_pretrained(model, bert)
    assert report.layout == "bert"
    assert report.unexpected == ["cls.seq_relationship.weight"]
    assert "uniter.img_embeddings.img_linear.weight" in report.missing
    assert "feat_regress.weight" in report.missing and "itm_output.weight" in report.missing
    assert (
        "bert.embeddings.LayerNorm.gamma",
        "uniter.embeddings.LayerNorm.weight",
    ) in report.renamed
    exported = uf.export_reference(model)
    for key in (
        "uniter.embeddings.LayerNorm.weight",
        "uniter.encoder.layer.1.output.LayerNorm.bias",
        "uniter.encoder.layer.0.attention.self.key.weight",
        "cls.predictions.bias",
    ):
        assert torch.equal(exported[key], ref[key]), key
    printed = capsys.readouterr().out
    assert (
        "bert layout" in printed
        and "missing" in printed
        and "cls.seq_relationship.weight" in printed
    )


def test_one_tied_key_fills_both():
    ref = _random_reference_state()
    del ref["cls.predictions.decoder.weight"]
    model = uf.UniterForPretraining(TINY)
    report = uf.load_pretrained(model, ref, verbose=False)
    assert not report.missing
    assert torch.equal(
        model.cls.predictions.decoder.weight, ref["uniter.embeddings.word_embeddings.weight"]
    )


def test_differing_tied_keys_are_reported_and_the_later_one_wins():
    # The authors' load_state_dict copies both keys into one tensor; the later in module order
    # (the decoder) is what remains, and so here.
    ref = _random_reference_state()
    ref["cls.predictions.decoder.weight"] = torch.randn_like(ref["cls.predictions.decoder.weight"])
    model = uf.UniterForPretraining(TINY)
    report = uf.load_pretrained(model, ref, verbose=False)
    assert report.tied_conflicts == [
        ("uniter.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight")
    ]
    theirs = authors_model.UniterForPretraining(TINY)
    theirs.load_state_dict(ref)
    assert torch.equal(
        model.uniter.embeddings.word_embeddings.weight,
        theirs.uniter.embeddings.word_embeddings.weight,
    )


def test_shape_mismatch_names_key_and_shapes():
    ref = _random_reference_state()
    ref["uniter.encoder.layer.0.attention.self.value.weight"] = torch.zeros(5, 7)
    model = uf.UniterForPretraining(TINY)
    before = uf.export_reference(model)
    with pytest.raises(ValueError, match=r"attention\.self\.value\.weight.*\(5, 7\).*\(32, 32\)"):
        uf.load_pretrained(model, ref, verbose=False)
    after = uf.export_reference(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "nothing is copied on error"


def test_pickled_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        pickle.dump({"uniter.pooler.dense.weight": Payload()}, f, protocol=2)
    with pytest.raises(ValueError, match="weights-only"):
        uf.load_pretrained(uf.UniterForPretraining(TINY), path, verbose=False)
    assert not marker.exists()


def test_missing_file_and_non_state_dict(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        uf.load_pretrained(uf.UniterForPretraining(TINY), tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        uf.load_pretrained(uf.UniterForPretraining(TINY), {"step": 3, "lr": 0.1}, verbose=False)


def test_save_reference_loads_into_authors_model(tmp_path):
    model = uf.UniterForPretraining(TINY)
    path = uf.save_reference(model, tmp_path / "out.pt")
    state = torch.load(path, weights_only=True)
    theirs = authors_model.UniterForPretraining(TINY)
    result = theirs.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert not list(tmp_path.glob("*.tmp"))
