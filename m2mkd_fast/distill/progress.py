"""Progress over the units of a reproduce run, told by the parent process whatever the number of
worker processes: one log line per finished unit and, on a terminal, a tqdm bar over the units."""

from __future__ import annotations

import sys
import time
from typing import Callable


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def unit_label(unit: tuple) -> str:
    """A reproduce unit as the log names it: ``("m2mkd", "nac", 1)`` → ``m2mkd nac seed 1``,
    ``("incubate", 2)`` → ``incubate teacher module 2``, ``("teacher",)`` → ``train-teacher + split``."""
    if unit[0] == "incubate":
        return f"incubate teacher module {unit[1]}"
    if len(unit) == 3:
        return f"{unit[0]} {unit[1]} seed {unit[2]}"
    return {"meta": "pretrain-meta", "teacher": "train-teacher + split"}.get(unit[0], unit[0])


class UnitProgress:
    """Counts finished units: ``done(unit)`` logs ``[k/N] <unit> — elapsed 3 min 10 s, ETA 9 min 30 s``.

    The ETA assumes the units left take as long on average as those done (a unit found done
    already counts as one that took no time)."""

    def __init__(self, total: int, log: Callable[[str], None], bar: bool = False):
        self.total, self.finished, self.start, self.log = total, 0, time.time(), log
        self.bar = None
        if bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="reproduce", unit="unit", file=sys.stderr, dynamic_ncols=True)

    def done(self, unit: tuple):
        self.finished += 1
        elapsed = time.time() - self.start
        eta = elapsed * (self.total - self.finished) / self.finished
        line = f"[{self.finished}/{self.total}] {unit_label(unit)} — elapsed {duration(elapsed)}, ETA {duration(eta)}"
        if self.bar is None:
            self.log(line)
            return
        from tqdm import tqdm

        with tqdm.external_write_mode(file=sys.stderr):
            self.log(line)
        self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()
