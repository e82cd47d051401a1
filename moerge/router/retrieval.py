"""`retrieval`: max cosine of the query to each expert's stored examples (PHATGOOSE's baseline).

At most `max_examples` (1000) examples per expert are used; experts without examples fall
back to their card vector so that they can still be chosen.
"""

import numpy as np

from moerge.router.sequence import SequenceRouter


class RetrievalRouter(SequenceRouter):
    name = "retrieval"
    max_examples = 1000

    def scores(self, query):
        q = self.ctx.embed([query])[0]
        out = []
        for name, vec in list(self.ctx.vectors.items()):
            ex = vec.examples[: self.max_examples] if vec.examples is not None else vec.card[None, :]
            out.append((name, float(np.max(ex @ q))))
        out.sort(key=lambda kv: (-kv[1], kv[0]))
        return out, {}
