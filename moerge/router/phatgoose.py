"""`phatgoose`: token routing with post-hoc trained gates (moerge/experts/gates.py).
At inference x and v are standardised, logit = x̂ · v̂ / √d, top-2, softmax over the two."""

from moerge.router.token import TokenRouter


class PhatgooseRouter(TokenRouter):
    name = "phatgoose"
    mode = "phatgoose"
    role = "gate"
