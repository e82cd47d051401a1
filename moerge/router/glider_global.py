"""`glider-global`: an LLM writes a task instruction for the query; it is embedded and matched
against the expert cards.

The score of an expert is the mean of two cosines to its card: of the query, and of the
instruction written together with the query. With a small instruct LLM as the writer the
instruction alone is often vague or wrong (with its earlier few-shot examples it wrote "Answer a
factual science question" for a capital-city query), so it is evidence added to the query's, not a
replacement for it.
"""

from moerge.router.sequence import SequenceRouter


class GliderGlobalRouter(SequenceRouter):
    name = "glider-global"

    def scores(self, query):
        writer = self.ctx.instruction_writer
        if writer is None:
            raise RuntimeError("glider-global needs an instruction writer (the base instruct model)")
        instruction, cached = writer.write(query)
        q_query, q_both = self.ctx.embed([query, f"{instruction}\n{query}"])
        by_query = self.ctx.card_index.all_scores(q_query)
        by_both = self.ctx.card_index.all_scores(q_both)
        scores = sorted(((n, 0.5 * (by_query[n] + by_both.get(n, 0.0))) for n in by_query),
                        key=lambda kv: (-kv[1], kv[0]))
        return scores, {"instruction": instruction, "instruction_cached": cached}
