"""J. S. Bach's chorales from music21's corpus, as piano rolls and melody tokens (no download).

The JSB Chorales benchmark (Boulanger-Lewandowski, Bengio & Vincent, ICML 2012) holds 382 of the
four-part chorales as piano rolls: 88 keys (MIDI 21–108), one frame per quarter note, a key on
when a voice sounds at the frame's time, split 229 / 76 / 77 into train / valid / test.
``music21`` (PyPI) ships the chorales' MusicXML in its corpus; :func:`load_chorales` builds the
same representation from it at run time:

- **which chorales**: every ``bach/*.mxl`` of the corpus with a Soprano, an Alto, a Tenor and a
  Bass part (instrument parts that double them are dropped), less the files whose piano roll
  repeats another's (:data:`DUPLICATES`, found by hashing every roll) — 400 chorales with
  music21 10.5, against the benchmark's 382;
- **frames**: frame t is quarter-note time t from the score's first beat; a key is on when a note
  of one of the four voices sounds at that instant (notes shorter than a quarter that do not
  cover one are dropped, as in the benchmark's sampling);
- **split**: the kept files in name order, permuted with ``numpy.random.default_rng(0)``, cut
  60 / 20 / 20 % into train / valid / test (the benchmark's proportions). The published split
  is a list of MIDI files that cannot be matched to music21's files one by one, so numbers on
  this split and the published ones differ by the draw as well as by the 18 extra chorales.

Melody tokens (``form="melody"``): the soprano line per quarter-note frame as one token of a
vocabulary of :data:`MELODY_VOCAB` — ``0`` rest, ``1`` hold (the previous frame's note goes on),
``2 + p − 57`` a new note of MIDI pitch p in the soprano's range 57–81 (A3–A5) — MusicVAE's
note-on / hold / rest encoding at quarter-note resolution.

Parsing all chorales takes about a minute; the arrays are cached (``$LVMKIT_CACHE``, else
``$XDG_CACHE_HOME/lvmkit``, else ``~/.cache/lvmkit``) under a key of the music21 version, so it
happens once. :func:`to_midi` writes a piano roll or a melody to a MIDI file to listen to.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lvmkit.base import check_choice

NUM_KEYS = 88
LOWEST_KEY = 21  # MIDI A0: key 0 of the piano roll
SOPRANO_LOW, SOPRANO_HIGH = 57, 81  # every soprano note of the corpus lies in A3–A5
REST, HOLD = 0, 1
MELODY_VOCAB = 2 + SOPRANO_HIGH - SOPRANO_LOW + 1  # rest, hold, 25 pitches
SPLITS = ("train", "valid", "test")
FORMS = ("pianoroll", "melody")
SPLIT_SEED = 0
VOICES = ("soprano", "alto", "tenor", "bass")
# Files whose piano roll is identical to another's (found by hashing all rolls, music21 10.5):
# the later name of each pair is dropped. "-inst" files are instrumental copies of a chorale.
DUPLICATES = frozenset({"bwv190.7-inst", "bwv398", "bwv274"})
_FORMAT = 1  # bump when the arrays' meaning changes: old caches are then ignored
_log = logging.getLogger("lvmkit")

INSTALL_HINT = (
    "the chorales come from music21's corpus; install it with `pip install music21` "
    "(or `pip install 'lvmkit[music]'`)"
)


@dataclass(frozen=True)
class Sequences:
    """Padded sequences: ``x`` (N, T, 88) float 0/1 piano rolls or (N, T) long tokens, zero past
    each sequence's end; ``lengths`` (N,) frames per sequence; ``names`` the chorales' files.

    ``data`` is what :func:`lvmkit.fit` and :func:`lvmkit.evaluate` take: ``{"x", "lengths"}``.
    """

    x: torch.Tensor
    lengths: torch.Tensor
    names: tuple[str, ...]
    form: str

    @property
    def data(self) -> dict[str, torch.Tensor]:
        return {"x": self.x, "lengths": self.lengths}

    @property
    def num_frames(self) -> int:
        return int(self.lengths.sum())

    @property
    def data_dim(self) -> int:
        """Keys per frame (piano rolls) or the vocabulary size (tokens)."""
        return NUM_KEYS if self.form == "pianoroll" else MELODY_VOCAB

    def __len__(self) -> int:
        return len(self.lengths)

    def take(self, n: int) -> Sequences:
        """The first ``n`` sequences, trimmed to their longest."""
        lengths = self.lengths[:n]
        t = int(lengths.max())
        return Sequences(self.x[:n, :t], lengths, self.names[:n], self.form)


def require_music21() -> Any:
    try:
        import music21
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return music21


def cache_dir() -> Path:
    """Where parsed data sets are kept: ``$LVMKIT_CACHE``, ``$XDG_CACHE_HOME/lvmkit`` or
    ``~/.cache/lvmkit``."""
    if os.environ.get("LVMKIT_CACHE"):
        return Path(os.environ["LVMKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lvmkit"


def load_chorales(split: str = "train", *, form: str = "pianoroll") -> Sequences:
    """The chorales of ``split`` ("train", "valid" or "test") as piano rolls (``form=
    "pianoroll"``) or soprano melody tokens (``form="melody"``); see the module docstring.

    Example::

        >>> from lvmkit.music import load_chorales
        >>> train = load_chorales("train")
        >>> train.x.shape[-1], train.x.shape[0] == len(train.lengths)
        (88, True)
    """
    split = check_choice("split", split, SPLITS)
    form = check_choice("form", form, FORMS)
    arrays = _cached_arrays()
    pick = np.flatnonzero(arrays["split"] == SPLITS.index(split))
    starts = np.concatenate([[0], np.cumsum(arrays["lengths"])])
    lengths = arrays["lengths"][pick]
    t_max = int(lengths.max())
    if form == "pianoroll":
        x = torch.zeros(len(pick), t_max, NUM_KEYS)
        source = arrays["rolls"]
    else:
        x = torch.zeros(len(pick), t_max, dtype=torch.long)
        source = arrays["melody"]
    for row, i in enumerate(pick):
        frames = torch.from_numpy(source[starts[i] : starts[i + 1]].astype(np.int64))
        x[row, : len(frames)] = frames.to(x.dtype)
    names = tuple(str(arrays["names"][i]) for i in pick)
    return Sequences(x, torch.from_numpy(lengths.astype(np.int64)), names, form)


def chorale_files() -> list[Path]:
    """The corpus files considered, in name order (before the four-voice check)."""
    music21 = require_music21()
    files = [p for p in music21.corpus.getComposer("bach") if Path(p).suffix == ".mxl"]
    return sorted((Path(p) for p in files if Path(p).stem not in DUPLICATES), key=lambda p: p.stem)


def _cached_arrays() -> dict[str, np.ndarray]:
    music21 = require_music21()
    key = hashlib.sha1(f"{music21.__version__}/{_FORMAT}".encode()).hexdigest()[:12]
    path = cache_dir() / f"jsb-chorales-{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError, KeyError):
            _log.warning("the chorale cache %s is unreadable; parsing the corpus again", path)
    _log.info("parsing Bach's chorales from music21's corpus (once; cached in %s)", path)
    arrays = parse_chorales(chorale_files())
    path.parent.mkdir(parents=True, exist_ok=True)
    from lvmkit.inference.checkpoint import atomic_write

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return arrays


def parse_chorales(files: list[Path]) -> dict[str, np.ndarray]:
    """Piano rolls, melody tokens and the split of the four-voice chorales among ``files``
    (concatenated frames, with ``lengths``, ``names`` and ``split`` per chorale)."""
    music21 = require_music21()
    rolls, melodies, names = [], [], []
    for path in files:
        score = music21.corpus.parse(str(path))
        parts = {}
        for part in score.parts:
            name = (part.partName or "").strip().lower()
            if name in VOICES:
                parts[name] = part
        if len(parts) != len(VOICES):
            continue  # not a four-voice chorale (a second soprano, a keyboard piece)
        frames = int(np.ceil(float(score.highestTime)))
        roll = np.zeros((frames, NUM_KEYS), dtype=np.uint8)
        for voice in VOICES:
            for note, a, b in _sounding(parts[voice]):
                for pitch in note.pitches:
                    roll[a:b, pitch.midi - LOWEST_KEY] = 1
        rolls.append(roll)
        melodies.append(_melody(parts["soprano"], frames))
        names.append(path.stem)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(names))
    split = np.empty(len(names), dtype=np.int8)
    cuts = np.round(np.array([0.6, 0.8]) * len(names)).astype(int)
    split[order[: cuts[0]]], split[order[cuts[0] : cuts[1]]], split[order[cuts[1] :]] = 0, 1, 2
    return {
        "rolls": np.concatenate(rolls),
        "melody": np.concatenate(melodies),
        "lengths": np.array([len(r) for r in rolls], dtype=np.int64),
        "names": np.array(names),
        "split": split,
    }


def _sounding(part: Any) -> list[tuple[Any, int, int]]:
    """Each note of ``part`` with the frames [a, b) whose instants it covers."""
    out = []
    for note in part.flatten().notes:
        start = float(note.offset)
        a, b = int(np.ceil(start)), int(np.ceil(start + float(note.quarterLength)))
        if b > a:
            out.append((note, a, b))
    return out


def _melody(part: Any, frames: int) -> np.ndarray:
    tokens = np.full(frames, REST, dtype=np.uint8)
    for note, a, b in _sounding(part):
        midi = note.pitches[-1].midi
        if not SOPRANO_LOW <= midi <= SOPRANO_HIGH:
            raise ValueError(f"soprano note {midi} outside {SOPRANO_LOW}–{SOPRANO_HIGH}")
        tokens[a:b] = HOLD
        tokens[a] = 2 + midi - SOPRANO_LOW
    return tokens


def melody_to_pitches(tokens: Any) -> list[int | None]:
    """MIDI pitch sounding at each frame of a melody (``None`` for a rest); hold continues."""
    out: list[int | None] = []
    current: int | None = None
    for token in np.asarray(tokens).tolist():
        if token == REST:
            current = None
        elif token != HOLD:
            current = int(token) - 2 + SOPRANO_LOW
        out.append(current)
    return out


def to_midi(sequence: Any, path: str | Path, *, form: str = "pianoroll", bpm: float = 80) -> Path:
    """Write one piano roll (T, 88) or one melody (T,) tokens to a MIDI file, one frame per
    quarter note; a key held over consecutive frames is one note (as the chorale sings it).

    Example::

        >>> import torch, tempfile, pathlib
        >>> roll = torch.zeros(4, 88); roll[:, 39] = 1  # middle C for a whole bar
        >>> to_midi(roll, pathlib.Path(tempfile.mkdtemp()) / "c.mid").stat().st_size > 0
        True
    """
    music21 = require_music21()
    form = check_choice("form", form, FORMS)
    values = np.asarray(torch.as_tensor(sequence).detach().cpu())
    if form == "pianoroll":
        if values.ndim != 2 or values.shape[1] != NUM_KEYS:
            raise ValueError(f"a piano roll has shape (T, {NUM_KEYS}); got {values.shape}")
        lines = [
            [LOWEST_KEY + k if values[t, k] > 0.5 else None for t in range(len(values))]
            for k in range(NUM_KEYS)
        ]
    else:
        if values.ndim != 1:
            raise ValueError(f"a melody is one token per frame, shape (T,); got {values.shape}")
        lines = [melody_to_pitches(values)]
    score = music21.stream.Score()
    score.insert(0, music21.tempo.MetronomeMark(number=bpm))
    part = music21.stream.Part()
    for line in lines:
        t = 0
        while t < len(line):
            pitch, end = line[t], t + 1
            if pitch is not None:
                # a roll's key held over frames is one note (a roll cannot tell a repeat); a
                # melody's note goes on while its tokens say hold
                while end < len(line) and (
                    values[end] == HOLD if form == "melody" else line[end] == pitch
                ):
                    end += 1
                part.insert(float(t), music21.note.Note(midi=pitch, quarterLength=end - t))
            t = end
    score.insert(0, part)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    score.write("midi", fp=str(path))
    return path
