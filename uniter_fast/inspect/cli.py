"""`python -m uniter_fast.inspect {align,attention}`: the command line (see the package doc)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.shards import ShardFormatError
from .align import TEXT_ROWS, Alignment, align_pair, pack
from .attention import head_attention
from .loading import InspectError, caption_text, load_model, load_vocab, token_names
from .pairs import DATA_KINDS, Pair, data_kind, find_pairs, sample_pairs
from .render import (
    AlignmentView,
    IndexEntry,
    draw_alignment,
    draw_attention,
    load_canvas,
    write_index,
)

PROG = "python -m uniter_fast.inspect"
SORTS = ("order", "wra", "itm")
# The recomputed attention must give the layer's own context to within this (fp32 matmuls).
ATTENTION_TOLERANCE = 1e-3


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a train.py run folder (model_reference.pt + config.yaml) or a weights file "
        "(then --model-config is needed)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="pretraining shards or VCR task shards: a file, folder, glob or {a..b}",
    )
    p.add_argument(
        "--data-kind",
        choices=DATA_KINDS,
        default="auto",
        help="pretrain: pretraining shards (a pair is a caption); vcr: VCR task shards (a pair "
        "is a question: [CLS] q [SEP] a [SEP] r [SEP] as the VCR pretraining stage builds it); "
        "auto: as the first sample says (default)",
    )
    p.add_argument("--out", required=True, help="output folder (created): PNGs and index.html")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--pairs",
        type=_positive,
        default=None,
        help="random (image, caption) pairs, or VCR questions (default 8)",
    )
    which.add_argument(
        "--keys",
        nargs="+",
        metavar="KEY",
        help="sample keys: KEY (caption or question 0) or KEY/j",
    )
    p.add_argument("--model-config", help="model JSON (for a weights file; overrides a run's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random pairs (default 0)")
    p.add_argument("--vocab", help="vocab.txt (one WordPiece token per line) to show words")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="See what a trained UNITER aligns and attends to."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    align = sub.add_parser(
        "align",
        help="WRA transport plans: which words the plan ties to which regions",
        description="For each pair: the IPOT transport plan between text tokens and regions "
        "(heat map) and the regions drawn on the image, labelled with their best-aligned token; "
        "the WRA distance and the ITM P(match). Writes pair-NNN.png, index.html and pairs.json.",
    )
    _common(align)
    align.add_argument("--images", help="folder of images: <meta file_name or key>.jpg/.png")
    align.add_argument(
        "--boxes", type=_positive, default=12, help="regions drawn on the image (default 12)"
    )
    align.add_argument(
        "--text-rows",
        choices=TEXT_ROWS,
        default="all",
        help="all: every text position, [CLS] and [SEP] included, as WRA in training (default); "
        "words: the caption's tokens only (a different transport problem)",
    )
    align.add_argument(
        "--sort",
        choices=SORTS,
        default="order",
        help="index order: as chosen (default), by WRA distance (lowest first) or by ITM "
        "P(match) (highest first)",
    )
    attention = sub.add_parser(
        "attention",
        help="one layer's, one head's attention map per pair",
        description="For each pair: the attention probabilities of --layer/--head over "
        "[CLS] words [SEP] regions. Writes pair-NNN.png and index.html.",
    )
    _common(attention)
    attention.add_argument("--layer", type=_non_negative, required=True, help="0-based layer")
    attention.add_argument("--head", type=_non_negative, required=True, help="0-based head")
    return parser


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InspectError(f"--device {name!r}: not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InspectError(f"--device {name}: CUDA is not available here")
    return device


def _pairs(args) -> tuple[list[Pair], str]:
    """The chosen pairs and the kind of shards they come from."""
    kind = data_kind(args.data, args.data_kind)
    if args.keys:
        return find_pairs(args.data, args.keys, kind=kind), kind
    pairs = sample_pairs(
        args.data, args.pairs or 8, seed=args.seed, progress=not args.quiet, kind=kind
    )
    return pairs, kind


def pair_caption(pair: Pair, vocab: list[str] | None) -> str:
    """The pair's text as words: the caption, or VCR's question | answer | rationale."""
    return " | ".join(caption_text(token_names(part, vocab)) for part in pair.text_parts())


def _progress(items, args, what: str):
    return tqdm(
        items, desc=what, unit="pair", file=sys.stderr, disable=args.quiet or len(items) < 2
    )


def _alignment_record(a: Alignment, tokens: list[str], caption: str, png: str) -> dict:
    pair = a.pair
    record = {
        "png": png,
        "key": pair.key,
        "kind": pair.kind,
        # the caption's index, or (VCR) the question's
        "caption_index": pair.caption,
        "caption": caption,
        "tokens": tokens,
        "token_ids": [int(a.input_ids[i]) for i in a.text_index],
    }
    if a.txt_type_ids is not None:
        record["token_types"] = [int(a.txt_type_ids[i]) for i in a.text_index]
    if pair.kind == "vcr":
        record["question_id"] = pair.item["id"]
        record["ground_truth_regions"] = pair.ground_truth_regions
    return {
        **record,
        "regions": a.num_regions,
        "region_labels": pair.region_labels(),
        "wra_distance": a.wra_distance,
        "itm_match_prob": a.itm_match,
        "text_rows": a.text_rows,
        # per region: the token it sends most mass to, and that mass (what the boxes are
        # labelled and ranked by)
        "region_best_token": [tokens[i] for i in a.best_text_row],
        "region_peak_mass": a.peak_mass.tolist(),
        "plan": a.plan.tolist(),
    }


def _sorted(records: list[dict], sort: str) -> list[dict]:
    if sort == "wra":
        return sorted(records, key=lambda r: r["wra_distance"])
    if sort == "itm":
        return sorted(records, key=lambda r: -(r["itm_match_prob"] or 0.0))
    return records


def _regions_text(pair: Pair) -> str:
    gt = pair.ground_truth_regions
    if not gt:
        return str(pair.num_regions)
    return f"{pair.num_regions} ({gt} ground-truth, {pair.num_regions - gt} detected)"


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def run_align(args) -> int:
    vocab = load_vocab(args.vocab) if args.vocab else None
    model, notes = load_model(
        args.checkpoint, model_config=args.model_config, device=_device(args.device)
    )
    for note in notes:
        print(f"{PROG}: warning: {note}", file=sys.stderr)
    pairs, kind = _pairs(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, pair in enumerate(_progress(pairs, args, "align")):
        a = align_pair(model, pair, text_rows=args.text_rows)
        tokens = token_names(a.input_ids[a.text_index], vocab)
        png = f"pair-{i:03d}.png"
        caption = pair_caption(pair, vocab)
        record = _alignment_record(a, tokens, caption, png)
        itm = _fmt(a.itm_match, 3)
        view = AlignmentView(
            plan=a.plan,
            tokens=tokens,
            boxes=pair.regions()[1][:, :4],
            title=f"{pair.name}: {record['caption']}",
            stats=f"WRA distance {a.wra_distance:.4f}    ITM P(match) {itm}",
            canvas=load_canvas(args.images, pair.key, pair.record.meta),
            max_boxes=args.boxes,
            note="" if args.text_rows == "all" else "text rows: words only (no [CLS] / [SEP])",
            region_labels=pair.region_labels(),
            ground_truth=pair.ground_truth_regions,
        )
        draw_alignment(view, out / png)
        records.append(record)
    by_name = {f"pair-{i:03d}.png": pair for i, pair in enumerate(pairs)}
    records = _sorted(records, args.sort)
    model_info = {
        "checkpoint": str(args.checkpoint),
        "model": type(model).__name__,
        "data": str(args.data),
        "data_kind": kind,
        "wra_beta": model.wra_beta,
        "wra_iterations": model.wra_iterations,
        "text_rows": args.text_rows,
        "sort": args.sort,
        "seed": args.seed,
    }
    (out / "pairs.json").write_text(json.dumps({**model_info, "pairs": records}, indent=1) + "\n")
    write_index(
        out / "index.html",
        "Word-region alignment (WRA transport plans)",
        [(k, str(v)) for k, v in model_info.items()],
        [
            IndexEntry(
                png=r["png"],
                key=f"{r['key']}/{r['caption_index']}",
                caption=r["caption"],
                stats=[
                    ("WRA distance", f"{r['wra_distance']:.4f}"),
                    ("ITM P(match)", _fmt(r["itm_match_prob"], 3)),
                    ("regions", _regions_text(by_name[r["png"]])),
                ],
            )
            for r in records
        ],
    )
    if not args.quiet:
        print(f"{PROG}: wrote {len(records)} pairs to {out / 'index.html'}", file=sys.stderr)
    return 0


def run_attention(args) -> int:
    vocab = load_vocab(args.vocab) if args.vocab else None
    model, _ = load_model(
        args.checkpoint,
        model_config=args.model_config,
        device=_device(args.device),
        need_pretraining=False,
    )
    pairs, kind = _pairs(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, pair in enumerate(_progress(pairs, args, "attention")):
        batch = pack(model, pair)
        att = head_attention(model, batch, args.layer, args.head)
        error = att.max_error()
        if not error <= ATTENTION_TOLERANCE:
            raise RuntimeError(
                f"the recomputed attention of layer {args.layer}, head {args.head} does not "
                f"reproduce the layer's output for {pair.name} (max error {error:.2e})"
            )
        num_text = int(batch.txt_len[0])
        tokens = token_names(batch.input_ids.cpu().numpy(), vocab)
        labels = tokens + pair.region_labels()
        png = f"pair-{i:03d}.png"
        caption = pair_caption(pair, vocab)
        draw_attention(
            att.probs.cpu().double().numpy(),
            labels,
            num_text,
            f"{pair.name}: layer {args.layer}, head {args.head}: {caption}",
            out / png,
            ground_truth=pair.ground_truth_regions,
        )
        text_to_regions = float(att.probs[:num_text, num_text:].sum(dim=1).mean())
        entries.append(
            IndexEntry(
                png=png,
                key=pair.name,
                caption=caption,
                stats=[
                    ("text tokens", str(num_text)),
                    ("regions", _regions_text(pair)),
                    ("mean attention of text queries on regions", f"{text_to_regions:.3f}"),
                ],
            )
        )
    write_index(
        out / "index.html",
        f"Attention maps, layer {args.layer}, head {args.head}",
        [
            ("checkpoint", str(args.checkpoint)),
            ("model", type(model).__name__),
            ("data", str(args.data)),
            ("data_kind", kind),
            ("seed", str(args.seed)),
        ],
        entries,
    )
    if not args.quiet:
        print(f"{PROG}: wrote {len(entries)} pairs to {out / 'index.html'}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (2 for bad input, with a message naming it)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "align":
            return run_align(args)
        return run_attention(args)
    except (InspectError, ShardFormatError, OSError) as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
