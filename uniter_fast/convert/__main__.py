"""Command line: convert feature sources into WebDataset shards, and verify shard sets.

    python -m uniter_fast.convert lmdb --img-db IMG_DB --txt-db TXT_DB --out DIR
    python -m uniter_fast.convert butd-tsv --tsv FILE [--tsv FILE ...] --captions JSON \\
        --vocab vocab.txt --fields image_id,image_w,image_h,num_boxes,boxes,features,cls_prob \\
        [--karpathy-split SPLIT[,SPLIT...]] --out DIR
    python -m uniter_fast.convert npz-captions --npz-dir DIR --captions JSON --vocab vocab.txt \\
        [--karpathy-split SPLIT[,SPLIT...]] --out DIR
    python -m uniter_fast.convert task-lmdb --task vqa|ve|nlvr2 --img-db IMG_DB --txt-db TXT_DB \\
        --out DIR
    python -m uniter_fast.convert vqa-json --questions JSON [--annotations JSON] --npz-dir DIR \\
        --vocab vocab.txt --out DIR
    python -m uniter_fast.convert ve-jsonl --jsonl FILE --npz-dir DIR --vocab vocab.txt --out DIR
    python -m uniter_fast.convert nlvr2-jsonl --jsonl FILE --npz-dir DIR --vocab vocab.txt --out DIR
    python -m uniter_fast.convert re-refs --refs REFS.p|REFS.json --instances JSON \\
        --split train|val|testA|testB|test --gt-npz-dir DIR --det-npz-dir DIR --vocab vocab.txt \\
        --out DIR
    python -m uniter_fast.convert re-lmdb --txt-db TXT_DB --gt-img-db IMG_DB --det-img-db IMG_DB \\
        [--split SPLIT] --out DIR
    python -m uniter_fast.convert vcr-jsonl --jsonl FILE --gt-npz-dir DIR --det-npz-dir DIR \\
        [--metadata-dir DIR] --vocab vocab.txt [--missing-soft-labels uniform] --out DIR
    python -m uniter_fast.convert vcr-lmdb --txt-db TXT_DB --gt-img-db IMG_DB --det-img-db IMG_DB \\
        [--missing-soft-labels uniform] --out DIR
    python -m uniter_fast.convert verify DIR_OR_PATTERN [--manifest PATH] [--deep]

`python -m uniter_fast.convert SUBCOMMAND --help` explains each. Exit status: 0 done (verify:
clean), 1 refused or failed (verify: problems found), 2 bad command line.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from ..data.schema import MAX_REGIONS, MIN_REGIONS
from .common import ConvertError, ConvertOptions, RegionPolicy, parse_size, run_conversion

PROG = "python -m uniter_fast.convert"

_COMMON_HELP = """
Output: DIR/{prefix}-NNNNNN.tar shards (one sample per image: fp16 features, 7-d boxes, fp16
soft labels, its captions as token ids), DIR/manifest.json (arguments, vocabulary, region
selection, shards with sha256, totals, skips by reason, histograms). Every file is written under
a temporary name and renamed when whole.

Resuming: a killed conversion leaves DIR/.convert-journal.json; running the same command again
verifies the finished shards and continues after the last one, giving byte-identical output. A
different command on that DIR, or any command on a finished DIR, is refused unless --overwrite.

Regions kept per image: clamp(#(conf > 0.2), 10, 100), top by confidence. Captions over 60
tokens are left out; images left without captions are skipped. Bad source records are skipped
and counted by reason; more than --max-bad-fraction of them fails the conversion.
"""


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def _add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    g.add_argument("--prefix", default="shard", help="shard names: PREFIX-NNNNNN.tar (shard)")
    g.add_argument("--dataset", default="", help="dataset name stored in each sample's meta")
    g.add_argument(
        "--shard-size",
        type=_size,
        default=parse_size("256MB"),
        help="roll a shard over before it passes this size: 256MB (default), 1GiB, bytes",
    )
    g.add_argument(
        "--max-samples", type=_positive_int, default=None, help="at most this many images a shard"
    )
    g.add_argument(
        "--max-bad-fraction",
        type=_fraction,
        default=0.01,
        help="fail when more than this fraction of source images (or captions) is bad (0.01)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished or different conversion in --out instead of refusing",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    r = p.add_argument_group("region selection")
    r.add_argument("--conf-threshold", type=float, default=0.2, help="(0.2)")
    r.add_argument("--min-regions", type=_positive_int, default=MIN_REGIONS, help="(10)")
    r.add_argument("--max-regions", type=_positive_int, default=MAX_REGIONS, help="(100)")


def _karpathy_split(text: str) -> tuple[str, ...]:
    from .captions import parse_karpathy_split

    try:
        return parse_karpathy_split(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_caption_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("captions")
    g.add_argument(
        "--captions",
        type=Path,
        required=True,
        help='COCO-style caption JSON: {"images": [{"id", "file_name", "width", "height"}], '
        '"annotations": [{"image_id", "caption"}]}; or one of Karpathy\'s split files '
        "(dataset_coco.json, dataset_flickr30k.json) with --karpathy-split",
    )
    g.add_argument(
        "--karpathy-split",
        type=_karpathy_split,
        default=None,
        metavar="SPLIT[,SPLIT...]",
        help="the splits of Karpathy's split file to convert, among train, restval, val, test "
        "(e.g. train,restval); required for those files, refused for COCO ones. Image id: "
        "cocoid, else the filename stem (Flickr30k); caption ids: sentid; text: raw",
    )
    g.add_argument(
        "--vocab",
        type=Path,
        required=True,
        help="WordPiece vocab.txt of the model (bert-base-cased: 28996 lines, [UNK]=100, "
        "[CLS]=101, [SEP]=102, [MASK]=103); checked, refused otherwise",
    )
    g.add_argument("--lowercase", action="store_true", help="lowercase (uncased vocabularies)")
    g.add_argument(
        "--missing-soft-labels",
        choices=("refuse", "uniform"),
        default="refuse",
        help="without soft labels: refuse (default), or fill in a uniform distribution over "
        "classes 1..1600 (MRC targets meaningless; recorded in the manifest)",
    )


def _add_soft_label_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--missing-soft-labels",
        choices=("refuse", "uniform"),
        default="refuse",
        help="an image without soft labels: skip it, counted (refuse, the default: MRC-kl needs "
        "them), or fill in a uniform distribution over classes 1..1600 (recorded in the "
        "manifest)",
    )


def _wrap(text: str) -> str:
    # The raw formatter keeps the epilog's layout; descriptions are wrapped here instead.
    return textwrap.fill(text, 92)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=_wrap(
            "Convert region features and captions into uniter-fast WebDataset shards, "
            "or verify a shard set."
        ),
        epilog=_COMMON_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "lmdb",
        help="the UNITER reference's image DB + text DB (LMDB)",
        description=_wrap(
            "Convert the reference's LMDB databases. IMG_DB: keys are image file "
            "names, values .npz (features, norm_bb, conf, soft_labels) or msgpack_numpy maps "
            "(decoded without pickle). TXT_DB: lz4-compressed msgpack examples with input_ids and "
            "img_fname, beside meta.json (its special ids must be ours) and txt2img.json. One "
            "sample per image with all its captions, in image DB key order."
        ),
        epilog=_COMMON_HELP,
        formatter_class=fmt,
    )
    p.add_argument("--img-db", type=Path, required=True, help="image LMDB directory")
    p.add_argument("--txt-db", type=Path, required=True, help="text LMDB directory")
    _add_output_args(p)

    p = sub.add_parser(
        "butd-tsv",
        help="bottom-up-attention TSV features + COCO-style captions",
        description=_wrap(
            "Convert bottom-up-attention TSV files (no header; base64 float32 arrays) "
            "with captions from a COCO-style JSON, tokenised with --vocab. Boxes in pixels are "
            "normalised by image_w/image_h. Confidence: objects_conf, else max of cls_prob over "
            "classes 1..1600, else the first regions in file order. Images in TSV order."
        ),
        epilog=_COMMON_HELP,
        formatter_class=fmt,
    )
    p.add_argument(
        "--tsv",
        type=Path,
        action="append",
        required=True,
        help="a TSV file; repeat for several (converted in the order given)",
    )
    p.add_argument(
        "--fields",
        default="image_id,image_w,image_h,num_boxes,boxes,features",
        help="the TSV's column order, comma-separated; append cls_prob (soft labels [n, 1601]) "
        "and/or objects_conf when the file has them (default: the standard six)",
    )
    _add_caption_args(p)
    _add_output_args(p)

    p = sub.add_parser(
        "npz-captions",
        help="a directory of per-image .npz + COCO-style captions",
        description=_wrap(
            "Convert per-image .npz files (features, norm_bb or pixel boxes, conf, "
            "soft_labels; read without pickle) named <file_name stem>.npz or <image id>.npz, with "
            "captions from a COCO-style JSON tokenised with --vocab. Images in order of id."
        ),
        epilog=_COMMON_HELP,
        formatter_class=fmt,
    )
    p.add_argument("--npz-dir", type=Path, required=True, help="directory of per-image .npz")
    _add_caption_args(p)
    _add_output_args(p)

    for task, what in (("ve", "SNLI-VE"), ("nlvr2", "NLVR2")):
        p = sub.add_parser(
            f"{task}-jsonl",
            help=f"{what} JSONL + per-image .npz -> {task} task shards",
            description=_wrap(
                f"Convert the public {what} JSONL with per-image .npz features into {task} "
                "task shards (one sample per image"
                + (" pair" if task == "nlvr2" else "")
                + ", holding every text about it); see uniter_fast/convert/tasks.py for the "
                "fields read and the file names of the features."
            ),
            epilog=_wrap(
                "Resumable and atomic like every conversion (a killed run continues with the "
                "same command); bad lines and images are skipped and counted by reason in "
                "DIR/manifest.json."
            ),
            formatter_class=fmt,
        )
        p.add_argument("--jsonl", type=Path, required=True, help=f"the {what} JSONL file")
        p.add_argument("--npz-dir", type=Path, required=True, help="directory of per-image .npz")
        p.add_argument("--vocab", type=Path, required=True, help="WordPiece vocab.txt")
        p.add_argument("--lowercase", action="store_true", help="uncased vocabularies")
        _add_output_args(p)

    p = sub.add_parser(
        "task-lmdb",
        help="the reference's txt_db + img_db of VQA, SNLI-VE or NLVR2 -> task shards",
        description=_wrap(
            "Convert a downstream task's databases in the reference's formats (the text DB's "
            "input_ids, img_fname and target; the image DB's .npz or msgpack features) into task "
            "shards, one sample per image (NLVR2: image pair) holding every example about it; "
            "see uniter_fast/convert/tasks.py."
        ),
        epilog=_wrap("Resumable and atomic; bad entries skipped and counted by reason."),
        formatter_class=fmt,
    )
    p.add_argument("--task", required=True, choices=("vqa", "ve", "nlvr2"))
    p.add_argument("--img-db", type=Path, required=True, help="image DB (LMDB directory)")
    p.add_argument("--txt-db", type=Path, required=True, help="text DB (LMDB + meta.json)")
    p.add_argument("--num-answers", type=_positive_int, default=3129, help="VQA answers (3129)")
    _add_output_args(p)

    p = sub.add_parser(
        "re-refs",
        help="refer's refs(unc).p / refs(umd).p + COCO instances + per-image .npz -> re shards",
        description=_wrap(
            "Convert the public referring-expression files (RefCOCO, RefCOCO+, RefCOCOg) into "
            "re task shards: one sample per image with its ground-truth boxes (one region per "
            "COCO annotation, in annotation order), its detected boxes and every referring "
            "sentence of --split about it (target: the referred annotation's index). The refs "
            "pickle is read by a restricted unpickler: plain lists, dicts, strings and numbers "
            "only; a pickle asking for any class or function is refused. Features: "
            "<id>.npz or the reference's visual_grounding_coco_gt_<id:012>.npz / "
            "visual_grounding_det_coco_<id:012>.npz; see uniter_fast/convert/refexp.py."
        ),
        epilog=_wrap(
            "Resumable and atomic like every conversion; images whose ground-truth region count "
            "differs from their annotation count, and other bad entries, are skipped and counted "
            "by reason in DIR/manifest.json. The region options apply to the detected boxes; "
            "ground-truth boxes are all kept."
        ),
        formatter_class=fmt,
    )
    p.add_argument(
        "--refs", type=Path, required=True, help="refs(unc).p / refs(umd).p, or a JSON export"
    )
    p.add_argument("--instances", type=Path, required=True, help="COCO instances.json")
    p.add_argument(
        "--split",
        required=True,
        choices=("train", "val", "testA", "testB", "test"),
        help="the refs' split to convert",
    )
    p.add_argument("--gt-npz-dir", type=Path, required=True, help=".npz of ground-truth boxes")
    p.add_argument("--det-npz-dir", type=Path, required=True, help=".npz of detected boxes")
    p.add_argument("--vocab", type=Path, required=True, help="WordPiece vocab.txt")
    p.add_argument("--lowercase", action="store_true", help="uncased vocabularies")
    _add_output_args(p)

    p = sub.add_parser(
        "re-lmdb",
        help="the reference's RE txt_db + ground-truth and detected img_dbs -> re shards",
        description=_wrap(
            "Convert the reference's referring-expression databases into re task shards: the "
            "text DB (lz4 msgpack examples keyed by sent_id, with images.json, refs.json, "
            "annotations.json, meta.json beside it) and the image DBs keyed "
            "visual_grounding_coco_gt_<id:012>.npz (--gt-img-db) and "
            "visual_grounding_det_coco_<id:012>.npz (--det-img-db). One sample per image; "
            "target = images[image_id].ann_ids.index(ann_id); see "
            "uniter_fast/convert/refexp.py."
        ),
        epilog=_wrap(
            "Resumable and atomic; bad entries skipped and counted by reason. The region options "
            "apply to the detected boxes; ground-truth boxes are all kept."
        ),
        formatter_class=fmt,
    )
    p.add_argument("--txt-db", type=Path, required=True, help="RE text DB (LMDB + JSON files)")
    p.add_argument("--gt-img-db", type=Path, required=True, help="ground-truth box image DB")
    p.add_argument("--det-img-db", type=Path, required=True, help="detected box image DB")
    p.add_argument(
        "--split",
        choices=("train", "val", "testA", "testB", "test"),
        default=None,
        help="keep only examples whose ref (refs.json) is of this split (default: all; the "
        "reference writes one text DB per split)",
    )
    _add_output_args(p)

    p = sub.add_parser(
        "vcr-jsonl",
        help="VCR annotations JSONL + ground-truth and detected per-image .npz -> vcr shards",
        description=_wrap(
            "Convert the public VCR annotations (train.jsonl, val.jsonl, test.jsonl) into vcr "
            "task shards: one sample per movie frame with its ground-truth boxes (all of them, "
            "region k = object k), its detected boxes, both with soft labels, and every "
            "question about it with its 4 answers and 4 rationales. Object references become "
            "tokens by one rule: a person is the tag id 28996 + its rank among the frame's "
            "persons (capped at 80), any other object the WordPiece ids of its class name, "
            "several objects joined by 'and'. Features: <img_fn with / as _>.npz or <img_fn "
            "stem>.npz; see uniter_fast/convert/vcr.py."
        ),
        epilog=_wrap(
            "Resumable and atomic like every conversion; frames whose ground-truth region count "
            "differs from their object count, without a size or soft labels, and other bad "
            "entries are skipped and counted by reason in DIR/manifest.json. The region options "
            "apply to the detected boxes; ground-truth boxes are all kept."
        ),
        formatter_class=fmt,
    )
    p.add_argument("--jsonl", type=Path, required=True, help="the VCR annotations JSONL")
    p.add_argument("--gt-npz-dir", type=Path, required=True, help=".npz of ground-truth boxes")
    p.add_argument("--det-npz-dir", type=Path, required=True, help=".npz of detected boxes")
    p.add_argument(
        "--metadata-dir",
        type=Path,
        default=None,
        help="VCR's image folder holding each frame's metadata JSON (metadata_fn; its width and "
        "height come first); default: the sizes come from the npz's image_w/image_h",
    )
    p.add_argument("--vocab", type=Path, required=True, help="WordPiece vocab.txt")
    p.add_argument("--lowercase", action="store_true", help="uncased vocabularies")
    _add_soft_label_arg(p)
    _add_output_args(p)

    p = sub.add_parser(
        "vcr-lmdb",
        help="the reference's VCR txt_db + ground-truth and detected img_dbs -> vcr shards",
        description=_wrap(
            "Convert the reference's VCR databases into vcr task shards: the text DB (lz4 "
            "msgpack examples keyed by annot id with input_ids, input_ids_as, input_ids_rs, "
            "qa_target, qar_target and img_fname = [gt name, det name], beside meta.json) and "
            "the two image DBs. Examples are grouped by ground-truth image into one sample "
            "each; token ids (tags already mapped) are kept as they are; see "
            "uniter_fast/convert/vcr.py."
        ),
        epilog=_wrap(
            "Resumable and atomic; bad entries skipped and counted by reason. The region options "
            "apply to the detected boxes; ground-truth boxes are all kept."
        ),
        formatter_class=fmt,
    )
    p.add_argument("--txt-db", type=Path, required=True, help="VCR text DB (LMDB + meta.json)")
    p.add_argument("--gt-img-db", type=Path, required=True, help="ground-truth box image DB")
    p.add_argument("--det-img-db", type=Path, required=True, help="detected box image DB")
    _add_soft_label_arg(p)
    _add_output_args(p)

    p = sub.add_parser(
        "vqa-json",
        help="VQA v2 questions (+ annotations) JSON + per-image .npz -> vqa task shards",
        description=_wrap(
            "Convert VQA v2's questions and annotations JSON with per-image .npz features into "
            "vqa task shards (one sample per image, holding its questions); answers normalised "
            "as the VQA evaluation does, soft scores min(1, 0.3 x count); see "
            "uniter_fast/convert/vqa.py."
        ),
        epilog=_wrap(
            "The answer vocabulary (--answers, or built from the annotations) is written to "
            "DIR/ans2label.json. Resumable and atomic; bad entries skipped and counted."
        ),
        formatter_class=fmt,
    )
    p.add_argument("--questions", type=Path, required=True, help="the questions JSON")
    p.add_argument("--annotations", type=Path, help="the annotations JSON (not for test)")
    p.add_argument("--answers", type=Path, help="ans2label.json to use (else built)")
    p.add_argument(
        "--min-answer-count",
        type=_positive_int,
        default=9,
        help="a built vocabulary keeps answers seen this often (9)",
    )
    p.add_argument("--npz-dir", type=Path, required=True, help="directory of per-image .npz")
    p.add_argument("--vocab", type=Path, required=True, help="WordPiece vocab.txt")
    p.add_argument("--lowercase", action="store_true", help="uncased vocabularies")
    _add_output_args(p)

    p = sub.add_parser(
        "verify",
        help="check a shard set (decode, schema, unique keys, manifest checksums)",
        description=_wrap(
            "Decode every sample through the allow-list reader (members, shapes, "
            "dtypes, finite values, token ids), check keys are unique across the set and, with a "
            "manifest (DIR/manifest.json, or --manifest), the shard names, counts, sizes and "
            "sha256. Prints a per-shard table and the problems; exit 0 when clean, 1 otherwise."
        ),
    )
    p.add_argument("target", help="a shard directory, a shard file, or a brace/glob pattern")
    p.add_argument("--manifest", type=Path, default=None, help="manifest to check against")
    p.add_argument(
        "--deep",
        action="store_true",
        help="also check boxes (x1<=x2, w/h/area columns), soft labels sum to 1, meta names",
    )
    p.add_argument("--max-problems", type=_positive_int, default=50, help="problems listed (50)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _source(args: argparse.Namespace, dataset: str, policy: RegionPolicy):
    if args.command == "re-refs":
        from .refexp import RefsSource

        return RefsSource(
            args.refs,
            args.instances,
            args.split,
            args.gt_npz_dir,
            args.det_npz_dir,
            args.vocab,
            dataset=dataset,
            lowercase=args.lowercase,
            policy=policy,
        )
    if args.command == "re-lmdb":
        from .refexp import ReLmdbSource

        return ReLmdbSource(
            args.txt_db,
            args.gt_img_db,
            args.det_img_db,
            split=args.split,
            dataset=dataset,
            policy=policy,
        )
    if args.command == "vcr-jsonl":
        from .vcr import VcrJsonlSource

        return VcrJsonlSource(
            args.jsonl,
            args.gt_npz_dir,
            args.det_npz_dir,
            args.vocab,
            metadata_dir=args.metadata_dir,
            dataset=dataset,
            lowercase=args.lowercase,
            missing_soft_labels=args.missing_soft_labels,
            policy=policy,
        )
    if args.command == "vcr-lmdb":
        from .vcr import VcrLmdbSource

        return VcrLmdbSource(
            args.txt_db,
            args.gt_img_db,
            args.det_img_db,
            dataset=dataset,
            missing_soft_labels=args.missing_soft_labels,
            policy=policy,
        )
    if args.command == "task-lmdb":
        from .tasks import TaskLmdbSource

        return TaskLmdbSource(
            args.task,
            args.img_db,
            args.txt_db,
            num_answers=args.num_answers,
            dataset=dataset,
            policy=policy,
        )
    if args.command == "vqa-json":
        from .vqa import VqaJsonSource

        return VqaJsonSource(
            args.questions,
            args.npz_dir,
            args.vocab,
            args.out,
            annotations=args.annotations,
            answers=args.answers,
            min_answer_count=args.min_answer_count,
            dataset=dataset,
            lowercase=args.lowercase,
            policy=policy,
        )
    if args.command in ("ve-jsonl", "nlvr2-jsonl"):
        from .tasks import TaskJsonlSource

        return TaskJsonlSource(
            args.command.split("-")[0],
            args.jsonl,
            args.npz_dir,
            args.vocab,
            dataset=dataset,
            lowercase=args.lowercase,
            policy=policy,
        )
    if args.command == "lmdb":
        from .lmdb import LmdbSource

        return LmdbSource(args.img_db, args.txt_db, dataset=dataset, policy=policy)
    if args.command == "butd-tsv":
        from .butd_tsv import ButdTsvSource

        return ButdTsvSource(
            args.tsv,
            args.captions,
            args.vocab,
            dataset=dataset,
            fields=args.fields,
            lowercase=args.lowercase,
            missing_soft_labels=args.missing_soft_labels,
            policy=policy,
            karpathy_split=args.karpathy_split,
        )
    from .captions import NpzCaptionsSource

    return NpzCaptionsSource(
        args.npz_dir,
        args.captions,
        args.vocab,
        dataset=dataset,
        lowercase=args.lowercase,
        missing_soft_labels=args.missing_soft_labels,
        karpathy_split=args.karpathy_split,
        policy=policy,
    )


def _verify(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .verify import verify_shards

    try:
        report = verify_shards(
            args.target,
            manifest=args.manifest,
            deep=args.deep,
            progress=False if args.no_progress else None,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"{parser.prog} verify: error: {e}", file=sys.stderr)
        return 1
    print("\n".join(report.lines(args.max_problems)))
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "verify":
        return _verify(args, parser)
    try:
        policy = RegionPolicy(args.conf_threshold, args.min_regions, args.max_regions)
        opts = ConvertOptions(
            out=args.out,
            prefix=args.prefix,
            dataset=args.dataset,
            shard_bytes=args.shard_size,
            max_samples=args.max_samples,
            max_bad_fraction=args.max_bad_fraction,
            overwrite=args.overwrite,
            progress=False if args.no_progress else None,
            policy=policy,
        )
        if args.command == "butd-tsv":
            from .butd_tsv import parse_fields

            args.fields = parse_fields(args.fields)
    except ValueError as e:
        parser.error(str(e))
    try:
        manifest = run_conversion(_source(args, opts.dataset, policy), opts)
    except ConvertError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 1
    totals = manifest["totals"]
    print(
        f"wrote {totals['shards']} shard(s) to {opts.out}: {totals['images']} images, "
        f"{totals['pairs']} pairs, {totals['bytes']} bytes; manifest {opts.out / 'manifest.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
