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
"""

from .align import Alignment, align_pair, encode, pack, pair_rows
from .attention import HeadAttention, head_attention
from .cli import main
from .loading import InspectError, load_model, load_vocab, token_names
from .pairs import Pair, build_example, find_pairs, sample_pairs

__all__ = [
    "Alignment",
    "HeadAttention",
    "InspectError",
    "Pair",
    "align_pair",
    "build_example",
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
