"""Import every routing method so that it registers its name."""

from moerge.router import (  # noqa: F401
    arrow, base_method, embed, glider, glider_global, merge, oracle, phatgoose, retrieval,
)
