"""See what a trained UNITER aligns and attends to: `python -m uniter_fast.inspect`.

    # WRA transport plans of 8 random pairs (seeded), words by regions, boxes on the images
    python -m uniter_fast.inspect align --checkpoint runs/tiny --data data/synthetic \\
        --out inspect/align --pairs 8 [--images IMAGES] [--vocab vocab.txt] [--boxes 12]
    # chosen pairs (caption 0, or caption j with KEY/j); a weights file needs its model JSON
    python -m uniter_fast.inspect align --checkpoint uniter-base.pt \\
        --model-config configs/model/uniter-base.json --data 'shards/coco-{000000..000003}.tar' \\
        --out inspect/coco --keys coco_391895 coco_522418/2
    # one layer's, one head's attention over [CLS] words [SEP] regions
    python -m uniter_fast.inspect attention --checkpoint runs/tiny --data data/synthetic \\
        --out inspect/attn --layer 1 --head 0 --pairs 4
    # the VCR pretraining stage: its run folder and "vcr" task shards (a pair is a question)
    python -m uniter_fast.inspect align --checkpoint runs/vcr-stage2 --data shards/vcr/val \\
        --out inspect/vcr --pairs 8 [--images vcr1images] [--data-kind vcr]

Each command writes `pair-NNN.png` per pair and `index.html` (self-contained; it lists every
pair with its picture, key, caption and numbers); `align` writes `pairs.json` too (the numbers
and each plan as nested lists). The checkpoint is a `train.py` run folder (`model_reference.pt`
and `config.yaml`: the model is built as the trainer builds it) or a weights file with
`--model-config`. Needs matplotlib: `pip install 'uniter-fast[inspect]'`.

What `align` computes, per pair (`align.align_pair`): the pair packed as the "pairs" task, the
encoder run in eval mode, the cosine cost and IPOT plan of `uniter_fast.ops.ot` between the text
rows and the region rows with the model's `wra_beta` and `wra_iterations`, the WRA distance
`sum(C * T)`, and the ITM head's P(match) on the pooled [CLS]. The text rows are the ones WRA
reads in training: every text position, [CLS] and [SEP] included (`--text-rows words` leaves
those two out). Without `--vocab`, tokens show as `#<id>`.

VCR (`--data` "vcr" task shards, found by `--data-kind auto` from the first sample; the checkpoint
a `train.py --task pretrain-vcr` run, a `UniterForVcrPretraining`): a pair is question j of a
frame (`KEY/j`), the sequence the second pretraining stage encodes, [CLS] q [SEP] a_gt [SEP]
r_gt [SEP] with token types 0 / 2 / 3 (`uniter_fast.tasks.vcr.pretrain_example`), and the
frame's ground-truth boxes (named by meta "objects"; a person also by the p of its tag) then its
detected boxes (dashed). Object tags show as `<person p>`; the index's caption is question |
answer | rationale; `--images` also finds a frame by its meta image_id (the img_fn). That stage
trains neither WRA nor ITM: the plan and P(match) describe the encoder under the first stage's
heads and settings.
"""

from .align import Alignment, align_pair, encode, pack, pair_rows
from .attention import HeadAttention, head_attention
from .cli import main
from .loading import InspectError, load_model, load_vocab, token_names
from .pairs import DATA_KINDS, Pair, build_example, data_kind, find_pairs, sample_pairs

__all__ = [
    "DATA_KINDS",
    "Alignment",
    "HeadAttention",
    "InspectError",
    "Pair",
    "align_pair",
    "build_example",
    "data_kind",
    "encode",
    "find_pairs",
    "head_attention",
    "load_model",
    "load_vocab",
    "main",
    "pack",
    "pair_rows",
    "sample_pairs",
    "token_names",
]
