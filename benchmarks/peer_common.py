"""What benchmarks/peers.py's runner and its report share: the rows, the sampling settings, and
the quality measure (W2 against fresh checkerboard draws, its ratio to the floor)."""

from __future__ import annotations

import torch

from flowmatch.cli import STF_DEFAULTS
from flowmatch.data.toy2d import checkerboard
from flowmatch.metrics import off_support, prdc, w2

ROWS = {  # --libs name -> the row's label
    "flowmatch": "flowmatch",
    "flowmatch-bf16": "flowmatch (bf16)",
    "flowmatch-bf16-compile": "flowmatch (bf16, compile)",
    "flowmatch-defaults": "flowmatch (defaults)",
    "flowmatch-distilled": "flowmatch (2-RF, distilled)",
    "torchcfm": "torchcfm",
    "torchcfm-ot": "torchcfm-ot",
    "flow_matching": "flow_matching (Meta)",
    "rectified-flow": "rectified-flow-pytorch",
    "flowmatch-meanflow": "flowmatch (MeanFlow)",
    "flowmatch-shortcut": "flowmatch (shortcut)",
    "rectified-flow-meanflow": "rectified-flow-pytorch (MeanFlow)",
    "rectified-flow-meanflow-recipe": "rectified-flow-pytorch (MeanFlow, flowmatch's recipe)",
    "notebook": "notebook (plain torch)",
}
DEFAULT_LIBS = [k for k in ROWS if k not in ("notebook", "flowmatch-bf16-compile", "rectified-flow-meanflow-recipe")]
# one-step generators trained from scratch: judged during training at one step, and compared with
# each other (and the distilled pipeline) in their own verdicts
FROM_SCRATCH_ONE_STEP = ("flowmatch-meanflow", "flowmatch-shortcut", "rectified-flow-meanflow",
                         "rectified-flow-meanflow-recipe")
# peer rows trained by flowmatch's own recipe for their objective (TrainConfig's batch, learning-rate
# schedule, clipping and EMA) instead of the plain loop: row -> the TrainConfig of that objective
RECIPE_ROWS = {"rectified-flow-meanflow-recipe": {"objective": "meanflow"}}
# rows that train with what `flowmatch train` does for their objective rather than the peers' plain
# loop: TrainConfig's defaults, and for flow matching on these vectors the command line's stable
# target with its steps (cli.STF_DEFAULTS)
FM_DEFAULT_ROWS = {"flowmatch-defaults": dict(STF_DEFAULTS), "flowmatch-meanflow": {"objective": "meanflow"},
                   "flowmatch-shortcut": {"objective": "shortcut"}}


def eval_nfe(lib: str) -> int:
    """The NFE of the W2 evaluations during training (the time to the target)."""
    return 1 if lib in FROM_SCRATCH_ONE_STEP else 100
# TrainConfig changes of the speed rows: the notebook's network as the peers train it (raw
# coordinates in, velocity out), so that their steps/s compare; flowmatch-defaults has the rest.
_PEERS_NET = {"fourier": 0, "prediction": "velocity"}
FM_SETTINGS = {"flowmatch": _PEERS_NET, "flowmatch-bf16": {**_PEERS_NET, "precision": "bf16"},
               "flowmatch-bf16-compile": {**_PEERS_NET, "precision": "bf16", "compile": True}}
SPEED_ROWS = [k for k in FM_SETTINGS]  # same work as the peers: their steps/s compare
NFES = (1, 2, 4, 8, 100)
N_FINAL = 4000  # samples for the NFE table, dopri5 and the sampling time
REF_SEEDS, PARTNER_SEEDS = (1, 2, 3), (4, 5, 6)  # fresh draws; the training points use seed 0
SEED = 0


# ---------------------------------------------------------------- quality: W2 / floor


def references(n: int) -> list[torch.Tensor]:
    return [checkerboard(n, torch.Generator().manual_seed(s)) for s in REF_SEEDS]


def w2_floor(n: int) -> float:
    """Mean W2 between 3 pairs of independent ``n``-point draws of the continuous checkerboard."""
    pairs = zip(references(n), PARTNER_SEEDS)
    return sum(w2(a, checkerboard(n, torch.Generator().manual_seed(s))) for a, s in pairs) / len(REF_SEEDS)


class Quality:
    """W2 of a sample set against the 3 reference draws of its size, its ratio to the floor, and
    the measures that see blur: the share off the checkerboard's cells (the data: 0) and
    precision/recall against the first reference."""

    def __init__(self, floors: dict[int, float]):
        self.floors = floors
        self.refs = {n: references(n) for n in floors}

    def __call__(self, x: torch.Tensor) -> dict:
        n = len(x)
        d = sum(w2(x, r) for r in self.refs[n]) / len(self.refs[n])
        pr = prdc(self.refs[n][0], x)
        return {"w2": d, "ratio": d / self.floors[n], "off": off_support("checkerboard", x),
                "precision": pr["precision"], "recall": pr["recall"]}
