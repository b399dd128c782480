"""Model and run configs: the reference's JSON keys, validation that names the key."""

from __future__ import annotations

import json
import re

import pytest

from uniter_fast.config import REPO_ROOT, RunConfig, UniterConfig

REFERENCE_BASE = {
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "type_vocab_size": 2,
    "vocab_size": 28996,
}


def test_reference_json_loads_as_is(tmp_path):
    path = tmp_path / "uniter-base.json"
    path.write_text(json.dumps(REFERENCE_BASE))
    cfg = UniterConfig.from_json(path)
    assert cfg == UniterConfig.from_json("configs/model/uniter-base.json")
    assert {k: cfg.to_dict()[k] for k in REFERENCE_BASE} == REFERENCE_BASE
    assert cfg.layer_norm_eps == 1e-12 and cfg.head_dim == 64


def test_shipped_configs():
    large = UniterConfig.from_json("configs/model/uniter-large.json")
    assert (
        large.num_hidden_layers,
        large.hidden_size,
        large.num_attention_heads,
        large.intermediate_size,
    ) == (24, 1024, 16, 4096)
    tiny = UniterConfig.from_json(REPO_ROOT / "configs/model/uniter-tiny.json")
    assert tiny.vocab_size == 28996 and tiny.hidden_size % tiny.num_attention_heads == 0


def test_round_trip_and_bert_extras(tmp_path):
    cfg = UniterConfig(
        hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=1
    )
    assert UniterConfig.from_dict(cfg.to_dict()) == cfg
    bert = dict(
        REFERENCE_BASE, architectures=["BertForMaskedLM"], model_type="bert", pad_token_id=0
    )
    assert UniterConfig.from_dict(bert).hidden_size == 768
    assert UniterConfig.from_dict({"vocab_size_or_config_json_file": 30522}).vocab_size == 30522


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hiddden_size": 768}, "unknown model config keys.*hiddden_size"),
        ({"num_attention_heads": 5}, "divisible by num_attention_heads"),
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"type_vocab_size": 1}, "type_vocab_size"),
        ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ],
)
def test_model_config_errors(change, message):
    with pytest.raises(ValueError, match=message):
        UniterConfig.from_dict({**REFERENCE_BASE, **change})


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        UniterConfig.from_json(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        UniterConfig.from_json(bad)


def test_quick_start_yaml_is_the_embedded_default():
    assert RunConfig.from_file("configs/pretrain/tiny-cpu.yaml") == RunConfig()


@pytest.mark.parametrize(
    "size, tokens, accum, steps", [("base", 10240, 6, 200_000), ("large", 6144, 4, 500_000)]
)
def test_pretrain_recipes_are_the_references(size, tokens, accum, steps):
    cfg = RunConfig.from_file(f"configs/pretrain/uniter-{size}.yaml")
    assert cfg.model_config == f"configs/model/uniter-{size}.json"
    assert (cfg.data.tokens_per_batch, cfg.optim.grad_accum, cfg.max_steps) == (
        tokens,
        accum,
        steps,
    )
    o = cfg.optim
    assert (o.lr, o.betas, o.weight_decay, o.warmup_steps, o.grad_clip) == (
        5e-5,
        (0.9, 0.98),
        0.01,
        10_000,
        5.0,
    )
    mixes = {d.name: d.mix for d in cfg.data.train}
    assert mixes["coco"] == mixes["sbu"] == {"itm": 6, "mlm": 8, "mrfr": 4, "mrckl": 4}
    assert mixes["vg"] == mixes["cc"] == {"itm": 9, "mlm": 12, "mrfr": 6, "mrckl": 6}
    assert all(s.startswith("???") for d in cfg.data.train for s in d.shards)  # yours to set
    assert cfg.deepspeed_config == "configs/deepspeed/zero2.json"


def test_run_config_validation(tmp_path):
    with pytest.raises(ValueError, match="optim.lrr"):
        RunConfig.from_dict({"optim": {"lrr": 1.0}})
    with pytest.raises(ValueError, match=r"data.train\[coco\].mix: unknown task 'vqa'"):
        RunConfig.from_dict(
            {"data": {"train": [{"name": "coco", "shards": "x.tar", "mix": {"vqa": 1}}]}}
        )
    with pytest.raises(ValueError, match="precision"):
        RunConfig(precision="fp8")
    with pytest.raises(ValueError, match="max_steps"):
        RunConfig(max_steps=0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "max_steps: 10\noptim:\n  warmup_steps: 2\n"
        "data:\n  train:\n    - {name: a, shards: 'a/*.tar'}\n"
    )
    cfg = RunConfig.from_file(recipe)
    assert cfg.max_steps == 10 and cfg.optim.warmup_steps == 2
    assert cfg.optim.lr == 5e-5  # a recipe's optim section starts from the reference's values
    assert cfg.data.train[0].shards == ["a/*.tar"] and cfg.data.train[0].mix["mlm"] == 8.0
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [1, 2")
    with pytest.raises(ValueError, match="broken.yaml: not valid YAML"):
        RunConfig.from_file(broken)


def test_recipe_numbers_may_be_numeric_strings(tmp_path):
    """PyYAML reads `1e-3` (no dot) and quoted numbers as strings: a number is meant, taken."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        'max_steps: "20"\nlog_every: 2.0e1\noptim: {lr: 1e-3, betas: ["0.9", 0.98]}\n'
        "data: {tokens_per_batch: 1e3, max_bad_fraction: 5e-2, val: v.tar}\n"
    )
    cfg = RunConfig.from_file(recipe)
    assert (cfg.max_steps, cfg.log_every, cfg.data.tokens_per_batch) == (20, 20, 1000)
    assert all(isinstance(v, int) for v in (cfg.max_steps, cfg.log_every))
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.9, 0.98)
    assert cfg.data.max_bad_fraction == 0.05 and cfg.data.val == ["v.tar"]


@pytest.mark.parametrize(
    "recipe, message",
    [
        ("max_steps: ten", "max_steps: expected an integer, got 'ten' (str)"),
        ("max_steps: 2.5", "max_steps: expected an integer, got 2.5 (float)"),
        ("max_steps: true", "max_steps: expected an integer, got True (bool)"),
        ("optim: {lr: fast}", "optim.lr: expected a number, got 'fast' (str)"),
        ("optim: {betas: [0.9]}", r"optim.betas: expected a list of 2 numbers, got [0.9]"),
        ("resume: maybe", "resume: expected true or false, got 'maybe' (str)"),
        ("model_config: 5", "model_config: expected a string, got 5 (int)"),
        ("data: {val: [1]}", "data.val[0]: expected a string, got 1 (int)"),
        (
            "data: {train: [{name: coco, shards: x.tar, mix: {itm: lots}}]}",
            "data.train[coco].mix.itm: expected a number, got 'lots'",
        ),
    ],
)
def test_recipe_values_of_the_wrong_type_name_key_value_and_type(recipe, message, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(recipe + "\n")
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        RunConfig.from_file(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
