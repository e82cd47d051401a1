"""Every routing method, by name: the one table that `make_router` and `method_names` read."""

from moerge.router.arrow import ArrowRouter
from moerge.router.base import Router
from moerge.router.base_method import BaseRouter
from moerge.router.chain import ChainRouter
from moerge.router.embed import EmbedRouter
from moerge.router.feedback import FeedbackRouter
from moerge.router.glider import GliderRouter
from moerge.router.glider_global import GliderGlobalRouter
from moerge.router.joint import JointRouter
from moerge.router.merge import MergeCatRouter, MergeLinearRouter, MergeTiesRouter
from moerge.router.moe_method import MoeRouter
from moerge.router.oracle import OracleRouter
from moerge.router.phatgoose import PhatgooseRouter
from moerge.router.retrieval import RetrievalRouter
from moerge.router.verify import VerifyRouter

METHODS: dict[str, type[Router]] = {cls.name: cls for cls in (
    BaseRouter, OracleRouter, RetrievalRouter, EmbedRouter, GliderGlobalRouter,
    ArrowRouter, PhatgooseRouter, GliderRouter, MergeLinearRouter, MergeTiesRouter, MergeCatRouter,
    FeedbackRouter, MoeRouter, JointRouter,
)}
METHODS[ChainRouter.name] = ChainRouter     # wraps a sequence router: one step per skill asked for
METHODS[VerifyRouter.name] = VerifyRouter   # wraps a sequence router: checks the expert's answer
