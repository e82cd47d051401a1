"""`arrow`: data-free token routing. Prototype v_e = top right singular vector of B_e A_e
(computed at registration, moerge/kernels/arrow.py); logit = |x · v_e|; top-k; softmax."""

from moerge.router.token import TokenRouter


class ArrowRouter(TokenRouter):
    name = "arrow"
    mode = "arrow"
    role = "arrow"
