"""The live view's keys, in one table: LiveApp.handle_key dispatches through it (each binding names
the app's method that acts), live.keys is checked against it, and the help overlay is drawn from it."""
from __future__ import annotations

from dataclasses import dataclass

#: The cursor's moves (rows, columns) per key; capitals and shift+arrows move by 3.
MOVES = {"i": (-1, 0), "k": (1, 0), "j": (0, -1), "l": (0, 1),
         "up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}


@dataclass(frozen=True)
class Binding:
    keys: tuple[str, ...]  # key names as handle_key gets them: a character, or an arrow's name
    shown: str             # the keys as the help overlay writes them
    does: str              # the help overlay's words
    action: str            # LiveApp.key_<action>(name) acts


BINDINGS = (
    Binding(tuple(MOVES) + ("I", "K", "J", "L"), "arrows / i j k l", "move the selected unit (capitals: by 3)",
            "move"),
    Binding(("u", "o"), "u / o", "previous / next layer", "layer"),
    Binding(("b",), "b", "back mode: off, gradient, deconv, guided", "back"),
    Binding(("n",), "n", "back image raw / as a norm", "back_norm"),
    Binding(("a",), "a", "grid: activations / back diffs", "back_diffs"),
    Binding(("d",), "d", "freeze the backprop unit while the cursor roams", "freeze_unit"),
    Binding(("s",), "s", "pattern mode: every unit's optimized image (atlas)", "pattern"),
    Binding(("z",), "z", "zoom: the selected unit fills the grid pane", "zoom"),
    Binding(("x",), "x", "attention: each head, from the unit's strongest token", "attention"),
    Binding(("t", "T"), "t / T", "boost: per-channel / gamma", "boost"),
    Binding(("f",), "f", "freeze the frame", "freeze_frame"),
    Binding(("c",), "c", "camera / files", "camera"),
    Binding(("e", "w"), "e / w", "next / previous file", "step_file"),
    Binding(("0",), "0", "crop / stretch the input", "crop"),
    Binding(("h",), "h", "this help", "help"),
    Binding(("q", "escape"), "q", "quit", "quit"),
)

_BY_KEY = {k: b for b in BINDINGS for k in b.keys}

#: (keys, what they do) for the help overlay
HELP = [(b.shown, b.does) for b in BINDINGS]


def binding(name: str) -> Binding | None:
    """The binding of a key name ('o', 'L', 'shift+left'), or None for a key that does nothing."""
    return _BY_KEY.get(name[len("shift+"):] if name.startswith("shift+") else name)


def valid_keys() -> str:
    return ", ".join(k for b in BINDINGS for k in b.keys) + " (shift+ before an arrow moves by 3)"
