"""`embed`: cosine of the query's embedding to each expert card (FAISS over card vectors)."""

from moerge.router.sequence import SequenceRouter


class EmbedRouter(SequenceRouter):
    name = "embed"

    def scores(self, query):
        q = self.ctx.embed([query])[0]
        return self.ctx.card_index.search(q), {}
