"""VQA accuracy: the official VQA v2 metric, the soft-score accuracy, per-type reports, results files.

**Official accuracy** (Antol et al. 2015; Goyal et al. 2017). The reference is the *current*
evaluation code of the VQA authors (github.com/GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` as of the March 2021 commit "Fixed processing
answers bug"; the 2016 revision normalised differently). Per question, with its human answers
(10 in VQA v2) and one predicted answer:

1. every human answer and the prediction have newlines and tabs turned into spaces and are
   trimmed at both ends (`strip_answer`);
2. if the (stripped) human answers are all identical, nothing else happens: the prediction must
   equal that answer character for character (``"yes!"`` scores 1.0 against ten ``"yes!"``,
   ``"Yes"`` scores 0.0 against ten ``"yes"``);
3. otherwise the human answers *and* the prediction each go through `process_punctuation` and
   then `process_digit_article` (`normalize_answer`);
4. for each human answer, the *other* answers are compared with the prediction and
   ``min(1, matches / 3)`` is taken; the question scores the mean of these values. With 10 answers,
   1 matching human gives 0.3 (the 9 subsets holding it score 1/3, the one without it 0), 2 give
   0.6, 3 give 0.9, 4 or more 1.0: LXMERT's soft scores.

The official code leaves out "the other answers" by comparing whole answer records (answer, confidence,
answer id); the ids of a question are distinct in the official files, so exactly one answer is left
out each time, which is what `official_accuracy` does with plain strings.

The official code is Python 2: its regular expressions are compiled without the UNICODE flag, so
``\\d`` means the ASCII digits 0-9 only (here: ``re.ASCII``). Its period pattern opens with a
malformed look-behind (``(?!<=\\d)``, a look-*ahead* for the text "<=digit" at a place that holds
a period, so it never blocks a match) and passes ``re.UNICODE`` (= 32) where ``sub`` takes the
count: at most 32 periods go. Both quirks are kept. Reports are percentages (0-100), overall and
per answer / question type, averaged over questions; the official script rounds them to 2
decimals, we leave that to display.

**Soft-score accuracy** (LXMERT's evaluation when only its label files exist): the soft target
of the arg-max answer (0 / 0.3 / 0.6 / 0.9 / 1.0 from the count of matching humans in LXMERT's
preprocessing), averaged. It follows the official accuracy closely but not exactly: the labels
were computed by a preprocessing step with its own answer normalisation.
"""

from __future__ import annotations

import functools
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------------- normalisation
# Characters the official code deletes (when the text has "p " / " p" or a digit,digit group) or
# replaces by a space (otherwise). '.', "'" and ':' are not among them.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# re.ASCII: the official (Python 2) patterns have no UNICODE flag, so \d is [0-9] there.
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d", re.ASCII)
# A period not followed by a digit is removed ("3.5" keeps its point); the official pattern's
# look-behind is malformed and never fires, and its count argument is re.UNICODE = 32.
_PERIOD = re.compile(r"\.(?!\d)", re.ASCII)
_PERIOD_COUNT = 32
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")


def _contractions() -> dict[str, str]:
    """The official table: apostrophe-less (or half-apostrophe) spellings -> the contraction.

    Written as ``contraction: variants``. Left out: the table's capitalised keys (``Im``,
    ``Ive``, ``Id've``, ``I'dve``), which can never match lower-cased text, and identity entries
    (``let's``, ``she's``). Kept: its one reversed entry, ``somebody'd -> somebodyd``.
    """
    table = """
        ain't: aint | aren't: arent | can't: cant | could've: couldve | couldn't: couldnt
        couldn't've: couldn'tve couldnt've | didn't: didnt | doesn't: doesnt | don't: dont
        hadn't: hadnt | hadn't've: hadnt've hadn'tve | hasn't: hasnt | haven't: havent | he'd: hed
        he'd've: hed've he'dve | he's: hes | how'd: howd | how'll: howll | how's: hows | isn't: isnt
        it'd: itd | it'd've: itd've it'dve | it'll: itll | ma'am: maam | mightn't: mightnt
        mightn't've: mightnt've mightn'tve | might've: mightve | mustn't: mustnt | must've: mustve
        needn't: neednt | not've: notve | o'clock: oclock | oughtn't: oughtnt
        'ow's'at: ow's'at 'ows'at 'ow'sat | shan't: shant | she'd've: shed've she'dve
        should've: shouldve | shouldn't: shouldnt | shouldn't've: shouldnt've shouldn'tve
        somebodyd: somebody'd | somebody'd've: somebodyd've somebody'dve | somebody'll: somebodyll
        somebody's: somebodys | someone'd: someoned | someone'd've: someoned've someone'dve
        someone'll: someonell | someone's: someones | something'd: somethingd
        something'd've: somethingd've something'dve | something'll: somethingll | that's: thats
        there'd: thered | there'd've: thered've there'dve | there're: therere | there's: theres
        they'd: theyd | they'd've: theyd've they'dve | they'll: theyll | they're: theyre
        they've: theyve | 'twas: twas | wasn't: wasnt | we'd've: wed've we'dve | we've: weve
        weren't: werent | what'll: whatll | what're: whatre | what's: whats | what've: whatve
        when's: whens | where'd: whered | where's: wheres | where've: whereve | who'd: whod
        who'd've: whod've who'dve | who'll: wholl | who's: whos | who've: whove | why'll: whyll
        why're: whyre | why's: whys | won't: wont | would've: wouldve | wouldn't: wouldnt
        wouldn't've: wouldnt've wouldn'tve | y'all: yall | y'all'll: yall'll y'allll
        y'all'd've: yall'd've y'alld've y'all'dve | you'd: youd | you'd've: youd've you'dve
        you'll: youll | you're: youre | you've: youve
    """
    out, target = {}, ""
    for token in table.split():
        if token.endswith(":"):
            target = token[:-1]
        elif token != "|":
            out[token] = target
    return out


CONTRACTIONS = _contractions()


def process_punctuation(text: str) -> str:
    """The official punctuation step.

    Each character of `PUNCTUATION` is deleted if the *original* text has it next to a space
    (``"p "`` or ``" p"``) or contains an ASCII digit-comma-digit group (``"1,000"``), else
    replaced by a space; then periods not followed by an ASCII digit are removed (at most 32).
    """
    out = text
    strip_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        if strip_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The official word step: lower-case, split on whitespace, number words -> digits
    (``none``/``zero`` -> ``0`` ... ``ten`` -> ``10``), drop articles, fix contractions, re-join.
    """
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def strip_answer(text: str) -> str:
    """What the official code does to every answer, human or predicted: newlines and tabs become
    spaces, then both ends are trimmed (of any whitespace)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


@functools.lru_cache(maxsize=1 << 16)
def normalize_answer(text: str) -> str:
    """`process_punctuation` then `process_digit_article`: what the official code applies to the
    (stripped) prediction and human answers of a question whose human answers are not all identical.

    Cached: evaluation normalises the same few thousand answer strings over and over.
    """
    return process_digit_article(process_punctuation(text))


def official_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """The official accuracy of one predicted answer, in [0, 1] (the rules in the module docstring).

    Args:
        prediction: the predicted answer string, as the model outputs it (normalised here).
        human_answers: the question's human answers (10 in VQA v2), as in the annotation file.

    Returns:
        The mean over the human answers of ``min(1, matches among the other answers / 3)``.
    """
    if not human_answers:
        raise ValueError("a question needs at least one human answer")
    gts = [strip_answer(a) for a in human_answers]
    pred = strip_answer(prediction)
    if len(set(gts)) > 1:
        gts = [normalize_answer(a) for a in gts]
        pred = normalize_answer(pred)
    matches = sum(a == pred for a in gts)
    # Leaving out answer i removes one match exactly when answer i matched.
    accs = [min(1.0, (matches - (a == pred)) / 3) for a in gts]
    return sum(accs) / len(accs)


# ------------------------------------------------------------------------------------- reports
@dataclass
class AccuracyReport:
    """Accuracy in percent (0-100) overall and per answer / question type.

    Attributes:
        overall: mean accuracy over the questions.
        per_answer_type: ``{answer type: mean}`` (VQA: ``yes/no``, ``number``, ``other``).
        per_question_type: ``{question type: mean}``.
        n: number of questions.
        counts: ``{"answer_type/<t>": n, "question_type/<t>": n}``.
    """

    overall: float
    per_answer_type: dict[str, float] = field(default_factory=dict)
    per_question_type: dict[str, float] = field(default_factory=dict)
    n: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def to_flat(self, prefix: str = "acc") -> dict[str, float]:
        """``{prefix: overall, prefix/answer_type/<t>: ..., prefix/question_type/<t>: ...}`` for logging."""
        out = {prefix: self.overall}
        out.update({f"{prefix}/answer_type/{k}": v for k, v in self.per_answer_type.items()})
        out.update({f"{prefix}/question_type/{k}": v for k, v in self.per_question_type.items()})
        return out

    def __str__(self) -> str:
        per = ", ".join(f"{k}: {v:.2f}" for k, v in sorted(self.per_answer_type.items()))
        return f"{self.overall:.2f} over {self.n} questions ({per})"


def aggregate(
    scores: Sequence[float] | np.ndarray,
    answer_types: Sequence[str] | None = None,
    question_types: Sequence[str] | None = None,
) -> AccuracyReport:
    """Average per-question accuracies (each in [0, 1]) into a percent `AccuracyReport`.

    Args:
        scores: (N,) per-question accuracy.
        answer_types, question_types: N labels each (optional).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = len(s)
    report = AccuracyReport(overall=100.0 * float(s.mean()) if n else 0.0, n=n)
    for kind, labels, dest in (
        ("answer_type", answer_types, report.per_answer_type),
        ("question_type", question_types, report.per_question_type),
    ):
        if labels is None:
            continue
        labels = list(labels)
        if len(labels) != n:
            raise ValueError(f"{len(labels)} {kind}s for {n} scores")
        groups: dict[str, list[float]] = defaultdict(list)
        for lab, v in zip(labels, s):
            groups[lab].append(v)
        for lab, vals in sorted(groups.items()):
            dest[lab] = 100.0 * float(np.mean(vals))
            report.counts[f"{kind}/{lab}"] = len(vals)
    return report


def soft_scores(predictions, targets) -> np.ndarray:
    """Per-question soft score of the predicted answer: ``targets[i, argmax_i]``.

    Args:
        predictions: (N, A) logits / probabilities, or (N,) predicted answer indices.
        targets: (N, A) soft targets (numpy or torch).

    Returns:
        (N,) float64 in [0, 1].
    """
    p, t = _np(predictions), _np(targets)
    idx = p.argmax(1) if p.ndim == 2 else p.astype(np.int64)
    if t.ndim != 2 or len(idx) != len(t):
        raise ValueError(f"targets {t.shape} do not match predictions {p.shape}")
    return t[np.arange(len(t)), idx].astype(np.float64)


def soft_score_accuracy(predictions, targets, answer_types=None, question_types=None) -> AccuracyReport:
    """The soft-score accuracy (LXMERT's) as a percent `AccuracyReport`; see `soft_scores`."""
    return aggregate(soft_scores(predictions, targets), answer_types, question_types)


def evaluate_dataset(dataset, question_ids, predictions) -> AccuracyReport:
    """Soft-score accuracy of predictions on a `tasks.dataset.ArrayDataset`, per answer / question type.

    Args:
        dataset: the dataset the question ids come from (its stored soft labels are the targets).
        question_ids: (N,) ids, e.g. the concatenated ``batch["question_id"]`` of an eval pass.
        predictions: (N, A) logits or (N,) answer indices, in the same order.
    """
    q = _np(question_ids).astype(np.int64).reshape(-1)
    return aggregate(label_scores(dataset, q, predictions), dataset.answer_type_of(q), dataset.question_type_of(q))


def label_scores(dataset, question_ids, predictions) -> np.ndarray:
    """Per question, the stored label score of the predicted answer (0 when it is not a label).

    LXMERT's evaluators for VQA (soft score), GQA (``{answer: 1.0}``: exact match) and NLVR2 (the
    class "True" / "False" as a label of score 1) all average this.

    Args:
        dataset: a `tasks.dataset.ArrayDataset` (its ``label_idx`` / ``label_score`` arrays).
        question_ids: (N,) ids.
        predictions: (N, A) logits or (N,) answer indices, in the same order.

    Returns:
        (N,) float64.
    """
    q = as_ids(question_ids)
    idx = predicted_indices(predictions)
    if len(idx) != len(q):
        raise ValueError(f"{len(q)} question ids for {len(idx)} predictions")
    pos = dataset.positions(q)
    li = np.asarray(dataset.arrays["label_idx"])[pos]
    ls = np.asarray(dataset.arrays["label_score"])[pos]
    return np.where(li == idx[:, None], ls, 0).sum(1).astype(np.float64)


# ------------------------------------------------------------------------- official files / I/O
@dataclass
class Annotation:
    """One question of an official annotation file."""

    answers: list[str]
    answer_type: str
    question_type: str


def load_official_annotations(annotation_file: str | Path) -> dict[int, Annotation]:
    """Read an official VQA v2 annotation file (e.g. ``v2_mscoco_val2014_annotations.json``).

    Its format: ``{"annotations": [{"question_id", "question_type", "answer_type", "answers":
    [{"answer", "answer_confidence", "answer_id"}, ...], ...}, ...]}``.

    Raises:
        FileNotFoundError: naming the file and where it comes from.
        ValueError: naming the file and the entry that lacks a key.
    """
    path = Path(annotation_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"missing {path}: the official VQA v2 annotations (v2_Annotations_Val_mscoco.zip from "
            "https://visualqa.org/download.html); without them use the soft-score accuracy"
        )
    with open(path) as fh:
        data = json.load(fh)
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise ValueError(f"{path}: expected {{'annotations': [...]}} (an official VQA annotation file)")
    out = {}
    for i, a in enumerate(anns):
        try:
            out[int(a["question_id"])] = Annotation(
                answers=[x["answer"] for x in a["answers"]],
                answer_type=a["answer_type"],
                question_type=a["question_type"],
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: annotation {i} lacks {e}") from None
    return out


def official_vqa_accuracy(
    predictions: Mapping[int, str] | Iterable[dict] | str | Path,
    annotations: Mapping[int, Annotation] | str | Path,
) -> AccuracyReport:
    """The official VQA accuracy of predictions, overall and per answer / question type.

    Args:
        predictions: ``{question_id: answer}``, an official results list
            ``[{"question_id", "answer"}]``, or the path of a results JSON.
        annotations: `load_official_annotations` output or the annotation file's path.

    Returns:
        Percent accuracies over the predicted questions (a subset of the annotated ones is fine).

    Raises:
        KeyError: a predicted question id has no annotation (names it).
    """
    anns = annotations if isinstance(annotations, Mapping) else load_official_annotations(annotations)
    preds = _predictions(predictions)
    scores, atypes, qtypes = [], [], []
    for qid, ans in preds.items():
        a = anns.get(qid)
        if a is None:
            raise KeyError(f"question_id {qid} is predicted but not in the annotations")
        scores.append(official_accuracy(ans, a.answers))
        atypes.append(a.answer_type)
        qtypes.append(a.question_type)
    return aggregate(scores, atypes, qtypes)


def results(question_ids, predictions, answers: Sequence[str]) -> list[dict]:
    """Predictions in the official results format ``[{"question_id": int, "answer": str}]``.

    Args:
        question_ids: (N,) ids.
        predictions: (N, A) logits or (N,) answer indices into ``answers``.
        answers: the answer vocabulary.
    """
    q = _np(question_ids).astype(np.int64).reshape(-1)
    p = _np(predictions)
    idx = p.argmax(1) if p.ndim == 2 else p.astype(np.int64)
    if len(q) != len(idx):
        raise ValueError(f"{len(q)} question ids for {len(idx)} predictions")
    return [{"question_id": int(a), "answer": answers[int(b)]} for a, b in zip(q, idx)]


def write_results(path: str | Path, question_ids, predictions, answers: Sequence[str]) -> Path:
    """Write `results` as JSON (the file the VQA test server takes); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = results(question_ids, predictions, answers)
    seen: set[int] = set()
    for r in rows:
        if r["question_id"] in seen:
            raise ValueError(f"question_id {r['question_id']} is predicted twice (deduplicate DDP padding first)")
        seen.add(r["question_id"])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows))
    tmp.replace(path)
    return path


def _predictions(p) -> dict[int, str]:
    if isinstance(p, (str, Path)):
        with open(p) as fh:
            p = json.load(fh)
    if isinstance(p, Mapping):
        return {int(k): v for k, v in p.items()}
    out = {}
    for i, r in enumerate(p):
        try:
            out[int(r["question_id"])] = r["answer"]
        except (KeyError, TypeError):
            raise ValueError(f"result {i} is not {{'question_id': ..., 'answer': ...}}: {r!r}") from None
    return out


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_ids(question_ids) -> np.ndarray:
    """(N,) int64 question ids from a list, numpy array or torch tensor."""
    return _np(question_ids).astype(np.int64).reshape(-1)


def predicted_indices(predictions) -> np.ndarray:
    """(N,) int64 predicted answer indices from (N, A) logits / probabilities or (N,) indices."""
    p = _np(predictions)
    return p.argmax(1) if p.ndim == 2 else p.astype(np.int64).reshape(-1)


def check_unique(question_ids: np.ndarray) -> None:
    """Raise naming the first id predicted more than once (DDP padding repeats a few questions)."""
    ids, counts = np.unique(question_ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"question_id {int(ids[counts > 1][0])} is predicted twice (deduplicate DDP padding first)")
