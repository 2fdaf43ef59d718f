"""n-gram language models for CTC decoding: a small ARPA builder and a CTC prefix beam search with
word-level KenLM shallow fusion (score = log P_ctc + alpha * ln P_lm + beta * words).

Why our own code: pyctcdecode (what transformers' Wav2Vec2ProcessorWithLM uses) pins numpy < 2,
which the rest of our stack (datasets, pandas) no longer installs with, and KenLM's estimator
`lmplz` is a C++ program that pip cannot install. The KenLM *query* library (pip `kenlm`) is used
as is. For corpora beyond a few million words build the ARPA with `lmplz -o 5 --prune 0 0 1` and
give it to `--lm` the same way; `build_arpa` is for training transcripts of modest size and tests.
"""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .errors import UserError
from .text import PAD_TOKEN, WORD_DELIMITER

LN10 = math.log(10.0)
NEG_INF = -math.inf


class LMError(UserError, ValueError):
    """A language model or decoder setting that cannot be used; says what to change."""


def build_arpa(sentences: Iterable[str], path: str | Path, order: int = 3) -> dict:
    """Interpolated Kneser-Ney n-gram model (one discount per order, D = n1 / (n1 + 2 n2)) of
    whitespace-tokenised sentences, written as ARPA. Returns counts of n-grams per order."""
    if order < 1:
        raise LMError(f"order {order}: give 1 or more")
    raw: list[collections.Counter] = [collections.Counter() for _ in range(order + 1)]
    num = 0
    for s in sentences:
        words = s.split()
        if not words:
            continue
        num += 1
        seq = ["<s>"] + words + ["</s>"]
        for k in range(1, order + 1):
            for i in range(len(seq) - k + 1):
                g = tuple(seq[i:i + k])
                if g != ("<s>",):
                    raw[k][g] += 1
    if not num:
        raise LMError("no text to build a language model from")
    # counts per order: raw at the top order and for n-grams starting with <s>; continuation counts below
    counts: list[collections.Counter] = [collections.Counter() for _ in range(order + 1)]
    counts[order] = raw[order]
    for k in range(1, order):
        cont = collections.Counter(g[1:] for g in raw[k + 1])
        for g, c in raw[k].items():
            counts[k][g] = c if g[0] == "<s>" else cont.get(g, 0) or c
    discount = [0.0] * (order + 1)
    for k in range(1, order + 1):
        n1 = sum(1 for c in counts[k].values() if c == 1)
        n2 = sum(1 for c in counts[k].values() if c == 2)
        discount[k] = min(0.9, max(0.1, n1 / (n1 + 2 * n2))) if n1 + n2 else 0.5
    ctx_total: list[collections.Counter] = [collections.Counter() for _ in range(order + 1)]
    ctx_types: list[collections.Counter] = [collections.Counter() for _ in range(order + 1)]
    for k in range(1, order + 1):
        for g, c in counts[k].items():
            ctx_total[k][g[:-1]] += c
            ctx_types[k][g[:-1]] += 1
    vocab = sorted({g[0] for g in counts[1]} | {"<unk>"})
    prob: list[dict] = [dict() for _ in range(order + 1)]
    total1, types1 = ctx_total[1][()], ctx_types[1][()]
    uniform = 1.0 / len(vocab)
    for w in vocab:
        c = counts[1].get((w,), 0)
        prob[1][(w,)] = max(c - discount[1], 0) / total1 + discount[1] * types1 / total1 * uniform
    for k in range(2, order + 1):
        for g, c in counts[k].items():
            h = g[:-1]
            lower = prob[k - 1][g[1:]]  # every suffix of a seen n-gram is a seen (k-1)-gram
            prob[k][g] = (max(c - discount[k], 0) + discount[k] * ctx_types[k][h] * lower) / ctx_total[k][h]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\\data\\\n")
        f.write(f"ngram 1={len(vocab) + 1}\n")
        for k in range(2, order + 1):
            f.write(f"ngram {k}={len(prob[k])}\n")
        for k in range(1, order + 1):
            f.write(f"\n\\{k}-grams:\n")
            entries = sorted(prob[k].items())
            if k == 1:
                entries = [(("<s>",), 0.0)] + entries
            for g, p in entries:
                lp = -99.0 if g == ("<s>",) else math.log10(p)
                line = f"{lp:.6f}\t{' '.join(g)}"
                if k < order and g in ctx_total[k + 1]:
                    bo = discount[k + 1] * ctx_types[k + 1][g] / ctx_total[k + 1][g]
                    line += f"\t{math.log10(bo):.6f}"
                f.write(line + "\n")
        f.write("\n\\end\\\n")
    tmp.replace(path)
    return {"sentences": num, "order": order, **{f"{k}-grams": len(prob[k]) for k in range(1, order + 1)}}


def shard_transcripts(shard_dir: str | Path) -> Iterable[str]:
    """The normalised transcripts of a shard set, shard by shard."""
    from .data.index import iter_shard

    shards = sorted(Path(shard_dir).glob("*.tar"))
    if not shards:
        raise LMError(f"{shard_dir}: no shards (*.tar) there")
    for t in shards:
        for _, files in iter_shard(t):
            yield json.loads(files["json"])["text"]


class LanguageModel:
    """A KenLM model (ARPA or binary) queried word by word; natural-log probabilities."""

    def __init__(self, path: str | Path, unk_score_offset: float = -10.0):
        try:
            import kenlm
        except ImportError:
            raise LMError("decoding with a language model needs the kenlm package: pip install 'asr-dist[lm]'") from None
        if not Path(path).is_file():
            raise LMError(f"{path}: no such language model file (ARPA or KenLM binary)")
        try:
            self.model = kenlm.Model(str(path))
        except (OSError, RuntimeError) as e:
            raise LMError(f"{path}: KenLM cannot read it ({e})") from None
        self.kenlm = kenlm
        self.path = str(path)
        self.unk_score_offset = unk_score_offset
        self._cache: dict = {}

    def start(self):
        s = self.kenlm.State()
        self.model.BeginSentenceWrite(s)
        return s

    def score(self, state, word: str):
        """(ln P(word | state), next state); words the model does not know get unk_score_offset more."""
        key = (id(state), word)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is state:
            return hit[1], hit[2]
        out = self.kenlm.State()
        lp = self.model.BaseScore(state, word, out) * LN10
        if word not in self.model:
            lp += self.unk_score_offset
        self._cache[key] = (state, lp, out)
        return lp, out

    def end(self, state) -> float:
        out = self.kenlm.State()
        return self.model.BaseScore(state, "</s>", out) * LN10


class BeamSearchDecoder:
    """CTC prefix beam search, optionally fused with a word n-gram model. Called like GreedyDecoder:
    logits (B, F, V) and frame lengths (B,) in, B transcripts out (words joined by single spaces)."""

    def __init__(self, vocab: dict[str, int], lm: LanguageModel | str | None = None, beam_width: int = 32,
                 alpha: float = 0.5, beta: float = 1.0, token_min_logp: float = -8.0):
        if beam_width < 1:
            raise LMError(f"--beam-width {beam_width}: give 1 or more")
        self.id_to_token = {i: t for t, i in vocab.items()}
        self.blank = vocab[PAD_TOKEN]
        self.delim = vocab.get(WORD_DELIMITER)
        self.lm = LanguageModel(lm) if isinstance(lm, (str, Path)) else lm
        self.beam_width, self.alpha, self.beta, self.token_min_logp = beam_width, alpha, beta, token_min_logp
        self.chars = {i: ("" if len(t) != 1 else t) for i, t in self.id_to_token.items() if i not in (self.blank, self.delim)}

    def settings(self) -> dict:
        return {"decoder": "beam", "beam_width": self.beam_width, "lm": self.lm.path if self.lm else None,
                "lm_alpha": self.alpha, "lm_beta": self.beta}

    def __call__(self, logits: torch.Tensor, frame_lengths: torch.Tensor) -> list[str]:
        logp = torch.log_softmax(logits.float(), dim=-1).cpu().numpy()
        return [self.decode(row[:n]) for row, n in zip(logp, frame_lengths.tolist())]

    def decode(self, logp: np.ndarray) -> str:
        """One utterance: log-probabilities (F, V)."""
        if self.lm:
            self.lm._cache.clear()
        # a beam: prefix of collapsed tokens -> [log P(prefix, ends in blank), log P(prefix, ends in a token)]
        # plus, per prefix, its text state: (finished words, partial word, lm score, lm state)
        start = ((), "", 0.0, self.lm.start() if self.lm else None)
        beams: dict[tuple, list[float]] = {(): [0.0, NEG_INF]}
        text: dict[tuple, tuple] = {(): start}
        for frame in logp:
            cand = np.nonzero(frame >= self.token_min_logp)[0]
            if cand.size == 0:
                cand = np.array([int(frame.argmax())])
            nxt: dict[tuple, list[float]] = collections.defaultdict(lambda: [NEG_INF, NEG_INF])
            for prefix, (pb, pnb) in beams.items():
                total = np.logaddexp(pb, pnb)
                last = prefix[-1] if prefix else None
                for c in cand.tolist():
                    p = float(frame[c])
                    if c == self.blank:
                        e = nxt[prefix]
                        e[0] = np.logaddexp(e[0], total + p)
                        continue
                    ext = prefix + (c,)
                    if c == last:  # a repeat collapses unless a blank separated it
                        e = nxt[prefix]
                        e[1] = np.logaddexp(e[1], pnb + p)
                        e = nxt[ext]
                        e[1] = np.logaddexp(e[1], pb + p)
                    else:
                        e = nxt[ext]
                        e[1] = np.logaddexp(e[1], total + p)
                    if ext not in text:
                        text[ext] = self._extend(text[prefix], c)
            scored = sorted(nxt.items(), key=lambda kv: -(np.logaddexp(*kv[1]) + self._bonus(text[kv[0]])))
            beams = dict(scored[:self.beam_width])
        best, best_score = "", NEG_INF
        for prefix, (pb, pnb) in beams.items():
            words, partial, lm_score, state = text[prefix]
            n = len(words)
            if partial:
                if self.lm:
                    lp, state = self.lm.score(state, partial)
                    lm_score += lp
                n += 1
            if self.lm and n:
                lm_score += self.lm.end(state)
            s = np.logaddexp(pb, pnb) + self.alpha * lm_score + self.beta * n
            if s > best_score:
                best, best_score = " ".join(words + ((partial,) if partial else ())), s
        return best

    def _extend(self, state: tuple, token: int) -> tuple:
        words, partial, lm_score, lm_state = state
        if token == self.delim:
            if not partial:
                return state
            if self.lm:
                lp, lm_state = self.lm.score(lm_state, partial)
                lm_score += lp
            return words + (partial,), "", lm_score, lm_state
        return words, partial + self.chars.get(token, ""), lm_score, lm_state

    def _bonus(self, state: tuple) -> float:
        return self.alpha * state[2] + self.beta * len(state[0])


LM_DIR = "language_model"


def _arpa_unigrams(path: Path) -> list[str]:
    words, inside = [], False
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("\\1-grams:"):
                inside = True
            elif inside and (not line or line.startswith("\\")):
                break
            elif inside:
                w = line.split("\t")[1]
                if w not in ("<s>", "</s>", "<unk>"):
                    words.append(w)
    return words


def attach(model_dir: str | Path, lm_path: str | Path, alpha: float = 0.5, beta: float = 1.0) -> Path:
    """Store an n-gram LM inside an exported model directory, in the layout transformers'
    Wav2Vec2ProcessorWithLM (pyctcdecode) reads: language_model/{the model, unigrams.txt, attrs.json} and
    alphabet.json. `asr-dist evaluate` and `transcribe` then decode with it unless given --no-lm."""
    import shutil

    model_dir, lm_path = Path(model_dir), Path(lm_path)
    if not (model_dir / "vocab.json").exists():
        raise LMError(f"{model_dir}: not a model directory exported by training (no vocab.json)")
    LanguageModel(lm_path)  # readable?
    target = model_dir / LM_DIR
    target.mkdir(exist_ok=True)
    for old in target.iterdir():
        old.unlink()
    shutil.copyfile(lm_path, target / lm_path.name)
    if lm_path.suffix == ".arpa":
        (target / "unigrams.txt").write_text("\n".join(_arpa_unigrams(lm_path)) + "\n", encoding="utf-8")
    (target / "attrs.json").write_text(json.dumps({"alpha": alpha, "beta": beta, "unk_score_offset": -10.0,
                                                   "score_boundary": True}, indent=1) + "\n")
    vocab = json.loads((model_dir / "vocab.json").read_text(encoding="utf-8"))
    special = {PAD_TOKEN: "", WORD_DELIMITER: " "}
    labels = [special.get(t, t if len(t) == 1 else "⁇") for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    (model_dir / "alphabet.json").write_text(json.dumps({"labels": labels, "is_bpe": False}, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
    for name in ("processor_config.json", "preprocessor_config.json"):  # transformers 5 and 4 layouts
        pre = model_dir / name
        if pre.exists():
            cfg = json.loads(pre.read_text())
            cfg["processor_class"] = "Wav2Vec2ProcessorWithLM"
            pre.write_text(json.dumps(cfg, indent=2) + "\n")
    return target / lm_path.name


def attached(model_dir: str | Path) -> dict | None:
    """The LM stored in a model directory by ``attach``: {"lm", "alpha", "beta"}, or None."""
    d = Path(model_dir) / LM_DIR
    if not (d / "attrs.json").exists():
        return None
    files = [p for p in d.iterdir() if p.suffix in (".arpa", ".bin", ".binary")]
    if not files:
        return None
    attrs = json.loads((d / "attrs.json").read_text())
    return {"lm": str(files[0]), "alpha": attrs.get("alpha", 0.5), "beta": attrs.get("beta", 1.0)}
