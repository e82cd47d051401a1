"""`glider`: PHATGOOSE's local logits plus α times the global (glider-global) cosine of the request
to each expert's card, the same bias for every token and module of that request.

α large makes the global choice dominate (task retrieval, best on held-in tasks); α small
keeps token routing in charge (best on unseen tasks). α can be:
- a number;
- `"calibrated"` (default): the α that `moerge calibrate` chose on held-in development
  prompts (moerge/router/calibrate.py); when the pool has no calibrated α, the `auto` rule;
- `"auto"`: `alpha_high` when the global router is confident (its top score clears its
  calibrated abstain threshold plus `margin`), `alpha_low` otherwise.
"""

from __future__ import annotations

from moerge.router.glider_global import GliderGlobalRouter
from moerge.router.token import TokenRouter


class GliderRouter(TokenRouter):
    name = "glider"
    mode = "phatgoose"
    role = "gate"

    def __init__(self, top_k: int = 2, temperature: float = 1.0, alpha: float | str = "calibrated",
                 alpha_high: float = 100.0, alpha_low: float = 3.0, margin: float = 0.1, abstain: bool = False):
        super().__init__(top_k, temperature)
        self.alpha, self.alpha_high, self.alpha_low, self.margin = alpha, alpha_high, alpha_low, margin
        self.abstain = abstain

    def fit(self, ctx):
        super().fit(ctx)
        self.global_router = GliderGlobalRouter(use_calibration=False).fit(ctx)
        return self

    def request_bias(self, query, names):
        ranked, detail = self.global_router.scores(query)
        cos = dict(ranked)
        top = ranked[0][1] if ranked else 0.0
        thr = self.ctx.threshold("glider-global")
        mode = self.alpha
        if mode == "calibrated":
            cal = self.ctx.calibration.alpha
            mode = float(cal) if cal is not None else "auto"
        if mode == "auto":
            confident = thr is not None and top >= thr + self.margin
            alpha = self.alpha_high if confident else self.alpha_low
        else:
            alpha = float(mode)
        bias = {n: alpha * cos.get(n, 0.0) for n in names}
        out = {"alpha": alpha, "global_top": ranked[0][0] if ranked else None, "global_score": top,
               "instruction": detail.get("instruction")}
        if self.abstain and thr is not None and top < thr:
            out["abstain"] = True
        return bias, out
