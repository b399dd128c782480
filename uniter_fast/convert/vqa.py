"""VQA v2 from its public JSON files plus per-image .npz features -> vqa task shards.

    python -m uniter_fast.convert vqa-json \\
        --questions v2_OpenEnded_mscoco_train2014_questions.json \\
        --annotations v2_mscoco_train2014_annotations.json --npz-dir coco_npz \\
        --vocab bert-base-cased-vocab.txt --out shards/vqa/train --prefix vqa_train
    python -m uniter_fast.convert vqa-json --questions ..._test2015_questions.json \\
        --answers shards/vqa/train/ans2label.json --npz-dir ... --vocab ... --out shards/vqa/test

Questions: `{"questions": [{"question_id", "image_id", "question"}]}`. Annotations (absent for
the test split): `{"annotations": [{"question_id", "multiple_choice_answer", "answers":
[{"answer"}, ... ten of them]}]}`. Features: `<npz-dir>/<image_id>.npz`, or any .npz whose name
ends in the image id (COCO's `COCO_train2014_000000000009.npz`).

Answers are normalised as the VQA evaluation normalises them (punctuation, number words to
digits, articles dropped, contractions restored: `normalize_answer`), and each question's soft
score for an answer is the usual `min(1, 0.3 x count)` over its ten human answers (0.3, 0.6,
0.9, 1.0 for 1, 2, 3, 4+). The answer vocabulary is `--answers` (an `ans2label.json`, e.g. the
reference's 3129 answers), or built here from the normalised `multiple_choice_answer`s seen at
least `--min-answer-count` times (9, which gives the reference's 3129 on train + val); it is
written to `<out>/ans2label.json` either way, and the shards' meta records its size. Answers
outside the vocabulary add nothing to the targets (a question with none keeps zero targets, as
the reference's preprocessing keeps it).

Skipped and counted by reason: question entries that are malformed ("decode"), empty questions
("empty_caption"), annotations of unknown questions ("unknown_question"); images without
features ("no_features") or with bad ones. Resumable, atomic, with a manifest.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

from ..data.schema import BERT_BASE_CASED, Vocab
from ..data.task_shards import TaskRecord
from .captions import WordPiece, read_task_npz
from .common import (
    ConvertError,
    GroupedSource,
    RegionPolicy,
    SkipRecord,
    Stats,
    Unit,
    input_fingerprint,
    write_json_atomic,
)

# The VQA evaluation's normalisation tables (vqaEval.py), as data.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
_PUNCT = [
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
]  # fmt: skip
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _digits_articles(text: str) -> str:
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's answer normalisation, as the reference's preprocessing applies it
    (punctuation, then number words, articles and contractions; commas dropped)."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(answer)).replace(",", "")


_SCORES = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9}


def soft_score(count: int) -> float:
    """A human answer given `count` times of ten: 0.3 per annotator, 1 from four on."""
    return _SCORES.get(count, 1.0)


def _image_id_of(name: str) -> int | None:
    digits = re.search(r"(\d+)$", Path(name).stem)
    return int(digits.group(1)) if digits else None


class VqaJsonSource(GroupedSource):
    """VQA v2 questions (+ annotations) with per-image .npz features (module docstring)."""

    kind = "vqa-json"

    def __init__(
        self,
        questions: str | Path,
        npz_dir: str | Path,
        vocab_file: str | Path,
        out: str | Path,
        *,
        annotations: str | Path | None = None,
        answers: str | Path | None = None,
        min_answer_count: int = 9,
        dataset: str = "",
        lowercase: bool = False,
        policy: RegionPolicy | None = None,
        vocab: Vocab = BERT_BASE_CASED,
    ) -> None:
        self.questions_path = Path(questions)
        self.annotations_path = Path(annotations) if annotations else None
        self.answers_path = Path(answers) if answers else None
        self.npz_dir = Path(npz_dir)
        self.vocab_file = Path(vocab_file)
        self.out = Path(out)
        self.min_answer_count = min_answer_count
        self.dataset = dataset
        self.lowercase = lowercase
        self.policy = policy or RegionPolicy()
        self.vocab = vocab

    def _load(self, path: Path, key: str) -> list:
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConvertError(f"{path}: cannot be read as JSON ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(key), list):
            raise ConvertError(f'{path}: expected {{"{key}": [...]}}')
        return obj[key]

    def open(self) -> None:
        if not self.npz_dir.is_dir():
            raise ConvertError(f"{self.npz_dir}: not a directory")
        self.tokenizer = WordPiece(self.vocab_file, lowercase=self.lowercase, vocab=self.vocab)
        self._npz: dict[int, str] = {}
        for entry in sorted(os.scandir(self.npz_dir), key=lambda e: e.name):
            image_id = _image_id_of(entry.name) if entry.name.endswith(".npz") else None
            if image_id is not None:
                self._npz.setdefault(image_id, entry.name)
        self.bad_lines: list[tuple[str, str, str]] = []
        questions: dict[int, dict] = {}
        for i, q in enumerate(self._load(self.questions_path, "questions")):
            ok = isinstance(q, dict) and all(
                isinstance(q.get(k), t) and not isinstance(q.get(k), bool)
                for k, t in (("question_id", int), ("image_id", int), ("question", str))
            )
            if not ok:
                self.bad_lines.append(
                    ("decode", f"questions[{i}]", "lacks question_id, image_id or question")
                )
                continue
            questions[q["question_id"]] = {"image_id": q["image_id"], "question": q["question"]}
        mc: Counter[str] = Counter()
        self.human: dict[int, list[str]] = {}
        if self.annotations_path is not None:
            for i, a in enumerate(self._load(self.annotations_path, "annotations")):
                qid = a.get("question_id") if isinstance(a, dict) else None
                if qid not in questions:
                    self.bad_lines.append(
                        (
                            "unknown_question",
                            f"annotations[{i}]",
                            f"question {qid!r} is not in the questions file",
                        )
                    )
                    continue
                raw = a.get("answers")
                if not isinstance(raw, list) or not all(
                    isinstance(x, dict) and isinstance(x.get("answer"), str) for x in raw
                ):
                    self.bad_lines.append(
                        ("decode", f"question {qid}", "answers is not a list of {answer: str}")
                    )
                    continue
                self.human[qid] = [normalize_answer(x["answer"]) for x in raw]
                if isinstance(a.get("multiple_choice_answer"), str):
                    mc[normalize_answer(a["multiple_choice_answer"])] += 1
        if self.answers_path is not None:
            from ..evaluate.formats import read_answer_vocabulary

            try:
                self.answers = read_answer_vocabulary(self.answers_path)
            except (OSError, ValueError) as e:
                raise ConvertError(f"--answers: {e}") from None
        elif self.annotations_path is not None:
            self.answers = sorted(a for a, n in mc.items() if n >= self.min_answer_count)
            if not self.answers:
                raise ConvertError(
                    f"no answer occurs {self.min_answer_count} times: lower "
                    "--min-answer-count or pass --answers"
                )
        else:
            raise ConvertError(
                "without --annotations (a test split), pass --answers (the training ans2label.json)"
            )
        self.label = {a: i for i, a in enumerate(self.answers)}
        self.groups: dict[int, list[int]] = {}
        for qid in sorted(questions):
            self.groups.setdefault(questions[qid]["image_id"], []).append(qid)
        self.questions = questions
        self.keys = sorted(self.groups)

    def identity(self) -> dict:
        inputs = [input_fingerprint(self.questions_path), input_fingerprint(self.vocab_file)]
        for path in (self.annotations_path, self.answers_path):
            if path is not None:
                inputs.append(input_fingerprint(path))
        inputs.append({"path": str(self.npz_dir.resolve()), "npz_files": len(self._npz)})
        return {
            "kind": self.kind,
            "arguments": {
                "questions": str(self.questions_path.resolve()),
                "annotations": str(self.annotations_path.resolve())
                if self.annotations_path
                else None,
                "answers": str(self.answers_path.resolve()) if self.answers_path else None,
                "min_answer_count": self.min_answer_count,
                "npz_dir": str(self.npz_dir.resolve()),
                "vocab": str(self.vocab_file.resolve()),
                "lowercase": self.lowercase,
            },
            "inputs": inputs,
        }

    def _fill(self, unit: Unit, image_id: int) -> None:
        qids = self.groups[image_id]
        unit.captions_seen = len(qids)
        name = self._npz.get(image_id)
        if name is None:
            raise SkipRecord("no_features", None, f"has no .npz in {self.npz_dir}")
        feat, loc, unit.conf_source = read_task_npz(self.npz_dir / name, self.policy)
        ids = self.tokenizer.encode([self.questions[q]["question"] for q in qids])
        items = []
        for qid, tokens in zip(qids, ids, strict=True):
            tokens = [int(t) for t in tokens]
            if not tokens:
                unit.left_out.append(
                    ("empty_caption", str(qid), "the question tokenises to nothing")
                )
                continue
            item = {"id": str(qid), "input_ids": tokens}
            if qid in self.human:
                counts = Counter(a for a in self.human[qid] if a in self.label)
                item["answers"] = [
                    [self.label[a], soft_score(n)] for a, n in sorted(counts.items())
                ]
            items.append(item)
        if not items:
            raise SkipRecord("no_caption_left", "question", "every question was left out")
        meta = {"dataset": self.dataset, "image_id": image_id, "num_classes": len(self.answers)}
        unit.record = TaskRecord(str(image_id), "vqa", [(feat, loc)], items, meta)

    def final_counts(self, stats: Stats) -> None:
        # The vocabulary the targets index, beside the shards (evaluation reads it back).
        write_json_atomic(self.out / "ans2label.json", self.label)
        super().final_counts(stats)

    def describe(self) -> dict:
        return {"vocab": self.tokenizer.describe(), "soft_labels": "not stored (task shards)"}


__all__ = ["VqaJsonSource", "normalize_answer", "soft_score"]
